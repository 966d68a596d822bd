"""The train step: ``state, metrics = train_step(state, batch)``.

Gradients come from ``torch.func.grad_and_value`` over the trainable parameters;
the optimizer updates the donated state in place; ``torch.compile`` wraps the step
from the outside where the backend allows it. No host synchronisation happens in
the step, except to skip an fp16 step whose gradients overflowed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from mim import optim, schedules, tree
from mim.backend import Backend
from mim.train import ema as ema_lib
from mim.train import graphs

# Dynamic loss scaling as torch.amp.GradScaler: start at 2**16, halve on overflow,
# double after 2000 clean steps.
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000


def create_state(params: dict, model_state: dict, opt, trainable: List[str], backend: Backend,
                 sharding=None, ema: bool = False) -> dict:
    """The whole mutable training state, on the device. With a
    :class:`mim.train.sharding.FSDP`, the trainable parameters (fp32 under the O2
    policies: they are the master weights) and their optimizer state are this rank's
    shards."""
    dev = backend.device
    params = tree.to(params, dev)
    flat = tree.flatten(params)
    missing = [n for n in trainable if n not in flat]
    if missing:
        raise KeyError(f"trainable names not in params: {missing[:5]}")
    state = {"step": torch.zeros((), dtype=torch.int64, device=dev)}
    if sharding is not None:
        train = {n: sharding.shard(flat[n].float() if backend.master_weights else flat[n])
                 for n in trainable}
        rest = tree.to(tree.unflatten({k: v for k, v in flat.items() if k not in train}),
                       dtype=backend.param_dtype)
        params = tree.unflatten({**tree.flatten(rest), **train})
        state["opt"] = opt.init(train)
    elif backend.master_weights:
        # O2: the forward sees low-precision params; the optimizer owns fp32 masters.
        state["master"] = {n: flat[n].float().clone() for n in trainable}
        params = tree.to(params, dtype=backend.param_dtype)
        state["opt"] = opt.init(state["master"])
    else:
        state["opt"] = opt.init({n: flat[n] for n in trainable})
    state["params"] = params
    state["model_state"] = tree.to(model_state, dev)
    if ema:  # the average of the trainable weights, fp32, whole on every rank (mim.train.ema)
        state["ema"] = ema_lib.init({n: flat[n] for n in trainable})
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


def build(loss_fn: Callable, opt, groups: List[optim.Group], schedule: schedules.Schedule,
          backend: Backend, *, grad_accum: int = 1, clip_grad: Optional[float] = None,
          clip_mode: str = "step", sharding=None, cuda_graphs: bool = False, input_keys=("image",),
          before_step: Optional[Callable] = None, after_step: Optional[Callable] = None,
          ema_decay: Union[float, Callable[[], torch.Tensor]] = 0.0,
          ema_warmup: bool = False) -> StepFns:
    """``loss_fn(params, model_state, batch, train) -> (loss, (model_state, metrics))``.

    On several ranks the gradients are averaged between ``grad_step`` and
    ``update_step``. With a :class:`mim.train.sharding.FSDP` the parameters are
    gathered inside the forward and the gradients reduce-scattered by autograd during
    the backward; each rank updates its shards (see that module). ``cuda_graphs``: the
    whole train step is recorded as a CUDA graph and replayed (:mod:`mim.train.graphs`).

    ``schedule`` gives each group's lr (and the decaying groups' weight decay) from the
    step tensor. ``clip_mode``: ``"step"`` clips the accumulated gradient once before the
    update (MAE's and BEiT's loss scalers, ViT-pytorch); ``"micro_batch"`` clips the running
    sum after every micro-batch's backward, as Swin-family loops call ``clip_grad_norm_``
    after each ``loss.backward()`` (SimMIM main_simmim.py / main_finetune.py, MoBY
    moby_linear.py); on several ranks each micro-batch's gradient is then averaged before
    its clip, as DDP's backward does.

    ``ema_decay`` > 0: ``state["ema"]`` (:func:`create_state` with ``ema=True``) moves
    toward the trainable weights after every optimizer step, taken or skipped
    (:mod:`mim.train.ema`). A callable gives the decay as a 0-d tensor inside the step
    (each member's own: :mod:`mim.train.members`).

    ``input_keys``: the batch's image entries, cast for the precision policy
    (:meth:`Backend.cast_inputs`). ``before_step`` / ``after_step``
    ``(params, model_state, step)``: update ``model_state`` in place once per optimizer
    step, before its gradient (``step`` = updates done) or after its parameter update
    (``step`` counts it); ``params`` is the whole tree, in full precision."""
    if cuda_graphs:
        _check_graphable(backend, sharding)
    if clip_mode not in ("step", "micro_batch"):
        raise ValueError(f"clip_mode={clip_mode!r}: must be 'step' or 'micro_batch'")
    clip_micro = bool(clip_grad) and clip_mode == "micro_batch"
    reduce_micro = clip_micro and sharding is None and backend.distributed
    lr_scales = [g.lr_scale for g in groups]
    decays = [g.weight_decay for g in groups]
    trainable = [n for g in groups for n in g.names]
    trainable_set = set(trainable)
    input_keys = frozenset(input_keys)
    ema_on = callable(ema_decay) or ema_decay > 0

    def full_params(state):
        """The whole parameter tree for a state update: the fp32 masters under O2, the
        gathered shards under FSDP."""
        if sharding is not None:
            return sharding.full_params(state["params"])
        if "master" in state:
            return tree.unflatten({**tree.flatten(state["params"]), **state["master"]})
        return state["params"]

    def run_state_hook(hook, state):
        with torch.no_grad():
            hook(full_params(state), state["model_state"], state["step"])

    def scaled_loss(train_params, frozen, model_state, batch, scale):
        return tree_loss(tree.unflatten({**frozen, **train_params}), model_state, batch, scale)

    def tree_loss(params, model_state, batch, scale):
        with backend.autocast():
            loss, (model_state, metrics) = loss_fn(params, model_state, batch, True)
        loss = loss.float()
        obj = loss if scale is None else loss * scale
        if grad_accum > 1:
            obj = obj / grad_accum
        return obj, (loss.detach(), model_state, metrics)

    def split_state(state, batch):
        batch = backend.cast_inputs(batch, input_keys)
        flat = tree.flatten(state["params"])
        train_params = {n: flat[n] for n in trainable}
        frozen = {n: v for n, v in flat.items() if n not in trainable_set}
        scale = state["loss_scale"]["scale"] if "loss_scale" in state else None
        return batch, train_params, frozen, scale

    def clip_running(grads, unscale):
        """``clip_grad_norm_`` of the running sum (``clip_mode="micro_batch"``): its norm
        once divided by ``unscale`` (the loss scale; x world under FSDP, whose shards hold
        the ranks' sum) is at most ``clip_grad``."""
        names = list(grads)
        g = [grads[n] for n in names]
        norm = optim.global_norm(g)
        if sharding is not None:
            norm = sharding.full(norm)
        if unscale is not None:
            norm = norm / unscale
        coef = torch.clamp(clip_grad / (norm + 1e-6), max=1.0)
        return dict(zip(names, torch._foreach_mul(g, coef.to(g[0].dtype)))), norm

    def accumulate(state, batch, grad_of, unscale=None):
        """Sum ``grad_of(micro, model_state)`` over the micro-batches (clipping the running
        sum after each one under ``clip_mode="micro_batch"``); mean metrics."""
        grads, losses, metrics_list, norm = None, [], [], None
        model_state = state["model_state"]
        for micro in split_batch(batch, grad_accum):
            g, loss, model_state, metrics = grad_of(micro, model_state)
            if reduce_micro:
                g = dict(zip(trainable, all_reduce_mean([g[n] for n in trainable], backend.world_size)))
            grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
            if clip_micro:
                grads, norm = clip_running(grads, unscale)
            losses.append(loss)
            metrics_list.append(metrics)
        state["model_state"] = model_state
        metrics = {k: torch.stack([m[k] for m in metrics_list]).float().mean() for k in metrics_list[0]}
        metrics["loss"] = torch.stack(losses).mean()
        if norm is not None:  # the last clip's norm, as the reference logs it
            metrics["grad_norm"] = norm
        return grads, metrics

    if sharding is None:
        grad_fn = torch.func.grad_and_value(scaled_loss, has_aux=True)

        def grad_step(state, batch):
            batch, train_params, frozen, scale = split_state(state, batch)

            def grad_of(micro, model_state):
                g, (_, (loss, model_state, metrics)) = grad_fn(train_params, frozen, model_state, micro, scale)
                return g, loss, model_state, metrics

            return accumulate(state, batch, grad_of, scale)

        eager_grad_step = grad_step
    else:
        def fsdp_grad_step(compiled_forward=None):
            """Eagerly, each parameter is gathered when the model reads it; a compiled
            forward gets them all gathered outside it, as plain tensors."""
            def grad_step(state, batch):
                batch, shards, frozen, scale = split_state(state, batch)
                leaves = {n: p.detach().requires_grad_() for n, p in shards.items()}

                def grad_of(micro, model_state):
                    if compiled_forward is None:
                        with sharding.gathered(leaves, backend.param_dtype, frozen=frozen) as params:
                            obj, (loss, model_state, metrics) = tree_loss(params, model_state, micro, scale)
                    else:
                        with sharding.gathered(leaves, backend.param_dtype) as full:
                            obj, (loss, model_state, metrics) = compiled_forward(
                                full, frozen, model_state, micro, scale)
                            del full
                    g = torch.autograd.grad(obj, [leaves[n] for n in trainable])
                    return dict(zip(trainable, g)), loss, tree.map(torch.Tensor.detach, model_state), metrics

                unscale = None if not clip_micro else (
                    float(sharding.world) if scale is None else scale * sharding.world)
                grads, metrics = accumulate(state, batch, grad_of, unscale)
                # The reduce-scatter summed the ranks' gradients (the loss is not divided
                # before the backward, so fp16 overflows as on one rank): average them.
                shards = torch._foreach_div([grads[n] for n in trainable], float(sharding.world))
                return dict(zip(trainable, shards)), {k: v.detach() for k, v in metrics.items()}
            return grad_step

        grad_step = eager_grad_step = fsdp_grad_step()
        if backend.compile:  # the forward compiles; autograd runs its compiled backward
            grad_step = fsdp_grad_step(torch.compile(scaled_loss))

    def update_step(state, grads, metrics):
        g = [grads[n].float() if backend.master_weights else grads[n] for n in trainable]
        if "loss_scale" in state:
            g = torch._foreach_div(g, state["loss_scale"]["scale"])
        if clip_micro:  # clipped after each micro-batch already; its last norm is logged
            norm = metrics.pop("grad_norm")
        else:
            norm = optim.global_norm(g)
            if sharding is not None:  # the norm of DTensor shards is a partial result
                norm = sharding.full(norm)
            if clip_grad:
                g, norm = optim.clip_by_global_norm(g, clip_grad, norm)
        step = state["step"]
        lrs = schedule.group_lrs(step, lr_scales)
        wds = schedule.group_weight_decays(step, decays) if schedule.weight_decay is not None else None
        gd = dict(zip(trainable, g))
        flat = tree.flatten(state["params"])
        if "master" in state:
            opt.update(state["master"], gd, state["opt"], lrs, groups, wds)
            torch._foreach_copy_([flat[n] for n in trainable], [state["master"][n] for n in trainable])
        else:  # full-precision parameters, or FSDP's fp32 shards
            opt.update({n: flat[n] for n in trainable}, gd, state["opt"], lrs, groups, wds)
        metrics = dict(metrics, grad_norm=norm, lr=schedule(step))
        if schedule.weight_decay is not None:
            metrics["weight_decay"] = schedule.weight_decay(step)
        state["step"].add_(1)
        return state, metrics

    def before(state):
        if before_step is not None:
            run_state_hook(before_step, state)

    def after(state):
        if after_step is not None:
            run_state_hook(after_step, state)
        if ema_on:
            flat = tree.flatten(full_params(state))
            decay = ema_decay() if callable(ema_decay) else ema_decay
            ema_lib.update_(state["ema"], flat, state["step"], decay, ema_warmup)

    def train_step(state, batch):
        before(state)
        grads, metrics = grad_step(state, batch)
        state, metrics = update_step(state, grads, metrics)
        after(state)
        return state, metrics

    compiled_grad, compiled_update, compiled_train = grad_step, update_step, train_step
    if backend.compile:
        if sharding is None:
            compiled_grad = torch.compile(grad_step)
            compiled_train = torch.compile(train_step)
        compiled_update = torch.compile(update_step)

    needs_host = backend.distributed or backend.loss_scaling
    if not needs_host:
        train = graphs.GraphedStep(compiled_train) if cuda_graphs else compiled_train
        return StepFns(train, compiled_grad, compiled_update, eager_grad_step)

    # Under FSDP the hooks gather the parameters (collectives): they stay eager there.
    hooks_compile = backend.compile and sharding is None
    compiled_before = torch.compile(before) if hooks_compile and before_step is not None else before
    compiled_after = (torch.compile(after) if hooks_compile and (after_step is not None or ema_on)
                      else after)

    def host_step(state, batch):
        compiled_before(state)
        grads, metrics = compiled_grad(state, batch)
        if sharding is None and backend.distributed and not reduce_micro:
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
                compiled_after(state)  # once per optimizer step, taken or skipped
                return state, dict(metrics, skipped=torch.ones((), device=ls["scale"].device))
            ls["good_steps"].add_(1)
            grow = (ls["good_steps"] % GROWTH_INTERVAL) == 0
            ls["scale"].mul_(torch.where(grow, 2.0, 1.0))
        state, metrics = compiled_update(state, grads, metrics)
        compiled_after(state)
        if "loss_scale" in state:
            metrics["loss_scale"] = state["loss_scale"]["scale"].clone()
        return state, metrics

    train = graphs.GraphedStep(host_step) if cuda_graphs else host_step
    return StepFns(train, compiled_grad, compiled_update, eager_grad_step)


def _check_graphable(backend: Backend, sharding) -> None:
    if backend.device_type != "cuda":
        raise ValueError(f"config.cuda_graphs needs a CUDA device; this run is on {backend.device_type}")
    if backend.loss_scaling:
        raise ValueError(f"config.cuda_graphs: precision={backend.precision} skips overflowing steps, "
                         f"a decision taken on the host; use bf16 or amp_bf16")
    if sharding is not None:
        raise ValueError("config.cuda_graphs: sharding=fsdp gathers DTensors eagerly; use sharding=none")
