"""The train step: ``state, metrics = train_step(state, batch)``.

Gradients come from ``torch.func.grad_and_value`` over the trainable parameters;
the optimizer updates the donated state in place; ``torch.compile`` wraps the step
from the outside where the backend allows it. No host synchronisation happens in
the step, except to skip an fp16 step whose gradients overflowed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from mim import optim, tree
from mim.backend import Backend

# Dynamic loss scaling as torch.amp.GradScaler: start at 2**16, halve on overflow,
# double after 2000 clean steps.
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000


def create_state(params: dict, model_state: dict, opt, trainable: List[str], backend: Backend,
                 sharding=None) -> dict:
    """The whole mutable training state, on the device. With a
    :class:`mim.train.sharding.Sharding`, the optimizer state and master weights hold
    this rank's slices only."""
    dev = backend.device
    params = tree.to(params, dev)
    flat = tree.flatten(params)
    missing = [n for n in trainable if n not in flat]
    if missing:
        raise KeyError(f"trainable names not in params: {missing[:5]}")
    state = {"step": torch.zeros((), dtype=torch.int64, device=dev)}
    if backend.master_weights:
        # O2: the forward sees low-precision params; the optimizer owns fp32 masters.
        state["master"] = {n: flat[n].float().clone() for n in trainable}
        if sharding is not None:
            state["master"] = sharding.local_tree(state["master"])
        params = tree.to(params, dtype=backend.param_dtype)
        flat = tree.flatten(params)
        state["opt"] = opt.init(state["master"])
    else:
        train = {n: flat[n] for n in trainable}
        state["opt"] = opt.init(sharding.local_tree(train) if sharding is not None else train)
    state["params"] = params
    state["model_state"] = tree.to(model_state, dev)
    if backend.loss_scaling:
        state["loss_scale"] = {"scale": torch.tensor(INIT_SCALE, device=dev),
                               "good_steps": torch.zeros((), dtype=torch.int64, device=dev)}
    return state


@dataclasses.dataclass
class StepFns:
    train_step: Callable
    grad_step: Callable
    update_step: Callable
    eager_grad_step: Callable   # never compiled: for FLOP counting and debugging


def split_batch(batch: Dict[str, torch.Tensor], n: int) -> List[Dict[str, torch.Tensor]]:
    if n == 1:
        return [batch]
    parts = {k: v.chunk(n, 0) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def all_reduce_mean(tensors: List[torch.Tensor], world: int,
                    bucket_bytes: int = 25 << 20) -> List[torch.Tensor]:
    """Average gradients over ranks like DDP: tensors packed into ~25 MB buckets of one
    dtype, one all-reduce per bucket (``pmean`` in JAX terms). Returns views into the
    reduced buckets, so no copy goes back (``torch.func`` may return expanded,
    stride-0 gradients that cannot be written in place).

    Unlike DDP, the reduction cannot overlap the backward pass: ``torch.func.grad``
    hands back the whole gradient tree at once, so the buckets are reduced after it."""
    out: List[torch.Tensor] = [None] * len(tensors)
    bucket: List[int] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for i in bucket:
            t = tensors[i]
            out[i] = flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()
        bucket.clear()

    for i, t in enumerate(tensors):
        if bucket and (size >= bucket_bytes or t.dtype != tensors[bucket[0]].dtype):
            flush()
            size = 0
        bucket.append(i)
        size += t.numel() * t.element_size()
    flush()
    return out


def all_reduce_mean_(tensors: List[torch.Tensor], world: int, bucket_bytes: int = 25 << 20):
    """In-place :func:`all_reduce_mean` (the tensors must be writable)."""
    for t, r in zip(tensors, all_reduce_mean(tensors, world, bucket_bytes)):
        t.copy_(r)


def build(loss_fn: Callable, opt, groups: List[optim.Group], schedule: Callable,
          backend: Backend, *, grad_accum: int = 1, clip_grad: Optional[float] = None,
          sharding=None) -> StepFns:
    """``loss_fn(params, model_state, batch, train) -> (loss, (model_state, metrics))``.

    On several ranks the gradients are averaged between ``grad_step`` and
    ``update_step``; with a :class:`mim.train.sharding.Sharding` they are
    reduce-scattered and each rank updates its slice (see that module)."""
    trainable = [n for g in groups for n in g.names]
    trainable_set = set(trainable)

    def scaled_loss(train_params, frozen, model_state, batch, scale):
        params = tree.unflatten({**frozen, **train_params})
        with backend.autocast():
            loss, (model_state, metrics) = loss_fn(params, model_state, batch, True)
        loss = loss.float()
        return loss * scale / grad_accum, (loss.detach(), model_state, metrics)

    grad_fn = torch.func.grad_and_value(scaled_loss, has_aux=True)

    def grad_step(state, batch):
        if backend.master_weights:  # O2: inputs in the parameters' precision
            batch = {k: v.to(backend.param_dtype) if v.is_floating_point() else v for k, v in batch.items()}
        flat = tree.flatten(state["params"])
        train_params = {n: flat[n] for n in trainable}
        frozen = {n: v for n, v in flat.items() if n not in trainable_set}
        scale = state["loss_scale"]["scale"] if "loss_scale" in state else 1.0
        grads, losses, metrics_list = None, [], []
        model_state = state["model_state"]
        for micro in split_batch(batch, grad_accum):
            g, (_, (loss, model_state, metrics)) = grad_fn(train_params, frozen, model_state, micro, scale)
            grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
            losses.append(loss)
            metrics_list.append(metrics)
        state["model_state"] = model_state
        metrics = {k: torch.stack([m[k] for m in metrics_list]).float().mean() for k in metrics_list[0]}
        metrics["loss"] = torch.stack(losses).mean()
        return grads, metrics

    def update_step(state, grads, metrics):
        g = [grads[n].float() if backend.master_weights else grads[n] for n in trainable]
        if "loss_scale" in state:
            g = torch._foreach_div(g, state["loss_scale"]["scale"])
        if clip_grad:
            g, norm = optim.clip_by_global_norm(g, clip_grad)
        else:
            norm = optim.global_norm(g)
        lr = schedule(state["step"])
        gd = dict(zip(trainable, g))
        if backend.master_weights:
            opt.update(state["master"], gd, state["opt"], lr, groups)
            flat = tree.flatten(state["params"])
            torch._foreach_copy_([flat[n] for n in trainable], [state["master"][n] for n in trainable])
        else:
            flat = tree.flatten(state["params"])
            opt.update({n: flat[n] for n in trainable}, gd, state["opt"], lr, groups)
        state["step"].add_(1)
        metrics = dict(metrics, grad_norm=norm, lr=lr)
        return state, metrics

    def train_step(state, batch):
        grads, metrics = grad_step(state, batch)
        return update_step(state, grads, metrics)

    compiled_grad, compiled_update, compiled_train = grad_step, update_step, train_step
    if backend.compile:
        compiled_grad = torch.compile(grad_step)
        compiled_update = torch.compile(update_step)
        compiled_train = torch.compile(train_step)

    needs_host = backend.distributed or backend.loss_scaling
    if not needs_host:
        return StepFns(compiled_train, compiled_grad, compiled_update, grad_step)

    def sharded_update(state, grads, metrics):
        """``update_step`` on this rank's slices, then the slices are all-gathered."""
        g = [grads[n].float() if backend.master_weights else grads[n] for n in trainable]
        if "loss_scale" in state:
            g = torch._foreach_div(g, state["loss_scale"]["scale"])
        norm = sharding.global_norm(g)
        if clip_grad:  # as optim.clip_by_global_norm, with the norm over all slices
            coef = torch.clamp(clip_grad / (norm + 1e-6), max=1.0)
            g = torch._foreach_mul(g, coef.to(g[0].dtype))
        lr = schedule(state["step"])
        flat = tree.flatten(state["params"])
        full = {n: flat[n] for n in trainable}
        shards = state["master"] if backend.master_weights else sharding.local_tree(full)
        opt.update(shards, dict(zip(trainable, g)), state["opt"], lr, groups)
        sharding.all_gather_into_(shards, full)
        state["step"].add_(1)
        return state, dict(metrics, grad_norm=norm, lr=lr)

    def host_step(state, batch):
        grads, metrics = compiled_grad(state, batch)
        if sharding is not None:
            grads = sharding.reduce_scatter_mean({n: grads[n] for n in trainable})
        elif backend.distributed:
            grads = dict(zip(trainable, all_reduce_mean([grads[n] for n in trainable],
                                                        backend.world_size)))
        if "loss_scale" in state:
            ls = state["loss_scale"]
            if sharding is not None:
                finite = sharding.all_finite([grads[n] for n in trainable])
            else:
                finite = torch.stack([torch.isfinite(t).all() for t in grads.values()]).all().item()
            if not finite:  # the one host sync: skip the step, lower the scale
                ls["scale"].mul_(0.5)
                ls["good_steps"].zero_()
                state["step"].add_(1)
                return state, dict(metrics, skipped=torch.ones((), device=ls["scale"].device))
            ls["good_steps"].add_(1)
            grow = (ls["good_steps"] % GROWTH_INTERVAL) == 0
            ls["scale"].mul_(torch.where(grow, 2.0, 1.0))
        if sharding is not None:
            state, metrics = sharded_update(state, grads, metrics)
        else:
            state, metrics = compiled_update(state, grads, metrics)
        if "loss_scale" in state:
            metrics["loss_scale"] = state["loss_scale"]["scale"].clone()
        return state, metrics

    return StepFns(host_step, compiled_grad, compiled_update, grad_step)
