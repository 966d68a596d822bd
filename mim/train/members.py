"""Members: K runs of one experiment that differ only in scalar fields (seed, lr, weight
decay, ...) trained as ONE run whose train state carries a leading member axis.

The train step is the one :func:`mim.train.step.build` makes, transformed by
``torch.func.vmap(..., randomness="different")`` over the member axis of the state and of
the batch (each member reads its own data stream: its own order, augmentations and masks,
from its own seed). Nothing else is a second copy of the step: the loss, the optimizer, the
clipping, the state hooks (MoBY's momentum encoder and queues) and the EMA are member 0's
and are equal for every member, because the fields they read as constants are equal
(:func:`check`). Where the members' values differ, the step reads them through
:class:`MemberSchedule`:
each member's own lr (and weight-decay) schedule, per parameter group, selected by the
member's index inside the vmapped step; the scalars a separate run reads as Python floats
(label smoothing in the loss, MoBY's momentum in its state hook, the EMA decay) reach the
loss and the hooks the same way, as 0-d tensors (:func:`config_view`, :data:`PER_MEMBER`).

What vmap cannot batch here (torch 2.14):

- ``torch._foreach_*`` (the optimizers, clipping, EMA, MoBY's momentum update) have no
  batching rule and no fallback ("Batching rule not implemented for
  aten::_foreach_mul_.Scalar. We could not generate a fallback."): while the vmapped step
  runs, :func:`per_tensor_foreach` replaces them by loops of the same per-tensor ops,
  which is what their CPU kernels run (the same numbers: ``tests/test_vectorize.py``);
- ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward have no batching
  rule: vmap would loop over members (a UserWarning "There is a performance drop because
  we have not yet implemented the batching rule ..."). Attention is independent per
  sample, so :func:`folded_attention` merges the member axis into the batch axis around
  the kernel (attention without a mask; with one, the math path, which vmap batches);
- ``aten::lerp_.Scalar`` and ``aten::addcmul_`` (the per-tensor AdamW and EMA updates)
  fall back to vmap's loop over members, with the same warning: correct, and a small
  share of the step.

docs/sweeps.md lists what members may differ in and what is refused.

Randomness inside the step (drop path, dropout) is drawn per member from one generator
seeded from (member 0's seed, step): different for every member and reproducible, but
not the draws of the member's separate run; everything drawn by the input pipeline (MAE
noise, SimMIM/BEiT masks, augmentations) is the separate run's.

Supported: one process (no DDP / FSDP), ``precision=fp32``, no CUDA graphs; the vmapped
step runs eagerly (``config.compile`` is not applied to it).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Dict, List, Sequence

import torch

from mim import schedules, tree
from mim.cli import UsageMistake
from mim.models.derived import Derived
from mim.train import step as step_lib
from mim.train.setup import Built, Setup, schedule_for

# Fields that members may set each to its own value, and where they act.
VECTORIZABLE = {
    "seed": "initial parameters, data order, augmentations, masks",
    "optim.lr": "lr schedule", "optim.base_lr": "lr schedule", "optim.min_lr": "lr schedule",
    "optim.warmup_init_lr": "lr schedule", "optim.warmup_epochs": "lr schedule",
    "optim.warmup_steps": "lr schedule", "optim.layer_decay": "groups' lr scales",
    "optim.weight_decay": "groups' weight decay", "optim.weight_decay_end": "weight-decay schedule",
    "data.label_smoothing": "the loss (and mixup's targets)", "ema.decay": "the EMA (> 0 for all)",
    "model.contrast_momentum": "MoBY's momentum schedule",
}

# Scalars a separate run reads as Python floats, and the dtype each member's value enters
# the step in (MoBY's momentum schedule is float64: mim.models.moby.momentum).
PER_MEMBER = {"data.label_smoothing": torch.float32, "ema.decay": torch.float32,
              "model.contrast_momentum": torch.float64}

# The foreach ops mim's step, optimizers, EMA and models call (tests/test_vectorize.py
# checks that no other one is used).
FOREACH = ("_foreach_add", "_foreach_add_", "_foreach_addcmul_", "_foreach_copy_", "_foreach_div",
           "_foreach_div_", "_foreach_lerp_", "_foreach_mul", "_foreach_mul_", "_foreach_norm",
           "_foreach_sqrt")


class MemberError(ValueError, UsageMistake):
    """Members that cannot run as one vectorized run; the message names the field."""


# ----------------------------------------------------------------------------------------
# What may differ.


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing(configs: Sequence) -> List[str]:
    """The config fields whose values are not the same for every member."""
    flats = [_flat(c) for c in configs]
    keys = sorted(set().union(*flats))
    return [k for k in keys if any(f.get(k, None) != flats[0].get(k, None) for f in flats[1:])]


def check(configs: Sequence, world_size: int = 1) -> List[str]:
    """Refuse, in one line naming the field, members that differ in anything but
    :data:`VECTORIZABLE` fields, or that run as a vectorized run cannot; returns the
    fields that differ."""
    c = configs[0]
    if world_size > 1:
        raise MemberError(f"--vectorize runs in one process; WORLD_SIZE={world_size} (run each "
                          f"member on its own device without --vectorize)")
    for field, ok, why in (("precision", c.precision == "fp32", "fp32 only"),
                           ("sharding", c.sharding == "none", "no FSDP"),
                           ("cuda_graphs", not c.cuda_graphs, "no CUDA graphs")):
        if not ok:
            raise MemberError(f"--vectorize: config.{field}={c[field]!r}: a vectorized run supports "
                              f"{why}")
    diff = differing(configs)
    if "ema.decay" in diff and min(m.ema.decay for m in configs) <= 0:
        raise MemberError(f"--vectorize: the points differ in ema.decay "
                          f"({', '.join(sorted({repr(m.ema.decay) for m in configs}))}): members may "
                          f"differ in it only where every member averages (ema.decay > 0)")
    for key in diff:
        if key not in VECTORIZABLE:
            values = sorted({repr(_flat(m).get(key)) for m in configs})
            kind = ("it sets shapes or enters the model as a constant" if key.startswith("model.")
                    else "it enters the step as a constant")
            raise MemberError(f"--vectorize: the points differ in {key} ({', '.join(values)}), which "
                              f"members cannot: {kind}; vectorizable: {', '.join(VECTORIZABLE)}")
    return diff


def check_built(builts: Sequence[Built], diff: Sequence[str]) -> None:
    """Same state shapes and the same parameter groups (names, and which decay) for
    every member; ``diff`` names the culprit."""
    culprit = ", ".join(diff) or "no field"
    ref = {k: (v.shape, v.dtype) for k, v in tree.flatten(builts[0].state).items()}
    for b in builts[1:]:
        got = {k: (v.shape, v.dtype) for k, v in tree.flatten(b.state).items()}
        if got != ref:
            bad = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))
            raise MemberError(f"--vectorize: the members' train states differ in shape ({bad[0]}); "
                              f"they differ in {culprit}")
        if [(g.names, g.weight_decay > 0) for g in b.groups] != \
                [(g.names, g.weight_decay > 0) for g in builts[0].groups]:
            raise MemberError(f"--vectorize: the members' parameter groups differ (which parameters "
                              f"share an lr scale, or which decay); they differ in {culprit}")


# ----------------------------------------------------------------------------------------
# The member axis.


def stack(trees: Sequence[dict]) -> dict:
    return tree.map(lambda *xs: torch.stack(xs), *trees)


def member(state: dict, k: int, copy: bool = False) -> dict:
    """Member ``k``'s state: views into the stacked state (updated with it), or copies."""
    return tree.map(lambda t: t[k].clone() if copy else t[k], state)


_INDEX: contextvars.ContextVar = contextvars.ContextVar("mim_member_index", default=None)


def select(values: Sequence, dtype=torch.float32) -> torch.Tensor:
    """Inside the vmapped step: this member's entry of one value per member."""
    index = _INDEX.get()
    if index is None:
        raise RuntimeError("mim.train.members.select outside a vectorized step")
    stacked = torch.stack([torch.as_tensor(v, dtype=dtype, device=index.device) for v in values])
    return stacked.index_select(0, index.view(1)).squeeze(0)


def _override(config, parts: Sequence[str], value):
    head, *rest = parts
    return Derived(config, {head: _override(config[head], rest, value) if rest else value})


def config_view(configs: Sequence, fields: Sequence[str]):
    """``config_of()`` for :meth:`Setup.loss_fn` / :meth:`Setup.state_hooks`: inside the
    vmapped step, member 0's config (read-only, :class:`mim.models.derived.Derived`) with
    each of ``fields`` this member's own value, a 0-d tensor (dtype :data:`PER_MEMBER`).
    None when ``fields`` is empty: the config itself is read."""
    if not fields:
        return None
    values = {key: [_flat(c)[key] for c in configs] for key in fields}

    def config_of():
        view = configs[0]
        for key, vs in values.items():
            view = _override(view, key.split("."), select(vs, PER_MEMBER[key]))
        return view
    return config_of


@dataclasses.dataclass(frozen=True)
class MemberSchedule(schedules.Schedule):
    """Each member's own schedule and group scales / weight decays, read by the step as
    one :class:`mim.schedules.Schedule`."""
    members: tuple = ()
    scales: tuple = ()      # per member, each group's lr scale
    decays: tuple = ()      # per member, each group's weight decay

    def group_lrs(self, step, scales):
        per = [s.group_lrs(step, sc) for s, sc in zip(self.members, self.scales)]
        return [select([p[g] for p in per]) for g in range(len(scales))]

    def group_weight_decays(self, step, decays):
        per = [s.group_weight_decays(step, d) for s, d in zip(self.members, self.decays)]
        return [select([p[g] for p in per]) for g in range(len(decays))]

    def __call__(self, step):
        return select([s(step) for s in self.members])


def member_schedule(schedules_: Sequence[schedules.Schedule], groups: Sequence[list]) -> MemberSchedule:
    """The weight decay is read from the schedule only where members differ in it (or
    schedule it); otherwise the groups' constants apply, as in a separate run."""
    decays = tuple(tuple(g.weight_decay for g in gs) for gs in groups)
    wd = None
    if any(s.weight_decay is not None for s in schedules_) or len(set(decays)) > 1:
        def wd(step):
            return select([s.weight_decay(step) if s.weight_decay is not None else
                           max(d, default=0.0) for s, d in zip(schedules_, decays)])

    def lr(step):
        pairs = [s.lr(step) for s in schedules_]
        return select([p[0] for p in pairs]), select([p[1] for p in pairs])

    return MemberSchedule(lr, wd, tuple(schedules_),
                          tuple(tuple(g.lr_scale for g in gs) for gs in groups), decays)


def _per_tensor(name: str):
    base = name[len("_foreach_"):]
    if base == "norm":
        def op(t, ord=2, dtype=None):  # noqa: A002 - torch's name
            return torch.linalg.vector_norm(t, ord, dtype=dtype)
    else:
        op = getattr(torch.Tensor, base)

    def run(tensors, *args, **kwargs):
        if base.startswith("addc") and len(args) == 3:      # (t1, t2, scalar): value=scalar
            args, kwargs = args[:2], dict(kwargs, value=args[2])
        out = [op(t, *[a[i] if isinstance(a, (list, tuple)) else a for a in args], **kwargs)
               for i, t in enumerate(tensors)]
        return None if base.endswith("_") else out
    return run


@contextlib.contextmanager
def per_tensor_foreach():
    """``torch._foreach_*`` (:data:`FOREACH`) as loops of per-tensor ops, which vmap batches."""
    saved = {n: getattr(torch, n) for n in FOREACH}
    try:
        for n in FOREACH:
            setattr(torch, n, _per_tensor(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch, n, f)


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fold(info, in_dims, *xs):
    """Each input with the member axis first and merged into the batch axis."""
    n = info.batch_size
    out = []
    for x, d in zip(xs, in_dims):
        x = x.expand(n, *x.shape) if d is None else x.movedim(d, 0)
        out.append(x.reshape(n * x.shape[1], *x.shape[2:]))
    return out


class _Attention(torch.autograd.Function):
    """``scaled_dot_product_attention(q, k, v)`` whose vmap rule runs one kernel over
    members x batch (attention is independent per sample) instead of vmap's loop."""

    @staticmethod
    def forward(q, k, v):
        return _SDPA(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        return _AttentionGrad.apply(*ctx.saved_tensors, g)

    @staticmethod
    def vmap(info, in_dims, q, k, v):
        out = _Attention.apply(*_fold(info, in_dims, q, k, v))
        return out.view(info.batch_size, -1, *out.shape[1:]), 0


class _AttentionGrad(torch.autograd.Function):
    """The gradients of :class:`_Attention` (the forward recomputed: the kernel's
    backward then reads its own output and log-sum-exp), folded the same way."""

    @staticmethod
    def forward(q, k, v, g):
        return torch.func.vjp(_SDPA, q, k, v)[1](g)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("mim.train.members: no second derivative of attention")

    @staticmethod
    def vmap(info, in_dims, q, k, v, g):
        outs = _AttentionGrad.apply(*_fold(info, in_dims, q, k, v, g))
        return tuple(o.view(info.batch_size, -1, *o.shape[1:]) for o in outs), (0, 0, 0)


def _folded_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    if attn_mask is None and dropout_p == 0.0 and not is_causal and not kwargs:
        return _Attention.apply(q, k, v)
    # a mask (relative position bias, shifted windows) takes the math path, which vmap batches
    return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)


@contextlib.contextmanager
def folded_attention():
    """``F.scaled_dot_product_attention`` without a mask as :class:`_Attention`."""
    F = torch.nn.functional
    F.scaled_dot_product_attention = _folded_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


def vectorize(train_step, k: int, device) -> callable:
    """``train_step(state, batch)`` over states and batches with a leading axis of ``k``
    members; the metrics come back with that axis."""
    index = torch.arange(k, device=device)

    def one(state, batch, i):
        token = _INDEX.set(i)
        try:
            return train_step(state, batch)
        finally:
            _INDEX.reset(token)

    batched = torch.func.vmap(one, randomness="different")

    def step(state, batch):
        with per_tensor_foreach(), folded_attention():
            return batched(state, batch, index)
    return step


# ----------------------------------------------------------------------------------------
# Building.


@dataclasses.dataclass
class Members:
    setups: List[Setup]
    builts: List[Built]     # each member's groups and optimizer (its state: in ``state``)
    state: dict             # stacked: a leading member axis on every tensor (:func:`member`)
    train_step: callable    # vmapped: ``state, metrics = train_step(state, batch)``
    differing: List[str]


def build(configs: Sequence, workdirs: Sequence[str], total_steps: int, steps_per_epoch: int,
          world_size: int = 1) -> Members:
    """Every member's train state built as its separate run builds it, then stacked, and
    the vmapped step."""
    diff = check(configs, world_size)
    setups = [Setup(c, w) for c, w in zip(configs, workdirs)]
    be = dataclasses.replace(setups[0].be, compile=False)
    builts = [s.build_train(total_steps, steps_per_epoch, backend=be) for s in setups]
    check_built(builts, diff)
    state = stack([b.state for b in builts])
    for b in builts:
        b.state = None      # the stacked state is the only one
    s0, c = setups[0], configs[0]
    schedule = member_schedule([schedule_for(m, total_steps, steps_per_epoch) for m in configs],
                               [b.groups for b in builts])
    ema_decay = c.ema.decay if "ema.decay" not in diff else (
        lambda: select([m.ema.decay for m in configs], PER_MEMBER["ema.decay"]))
    # the loss reads the label smoothing; MoBY's state hook reads its momentum
    loss_of = config_view(configs, [k for k in diff if k == "data.label_smoothing"])
    hooks_of = config_view(configs, [k for k in diff if k == "model.contrast_momentum"])
    fns = step_lib.build(s0.loss_fn(loss_of), builts[0].opt, builts[0].groups, schedule, be,
                         grad_accum=c.grad_accum, clip_grad=c.optim.clip_grad or None,
                         clip_mode=c.optim.clip_mode, input_keys=s0.input_keys(),
                         ema_decay=ema_decay, ema_warmup=c.ema.warmup,
                         **s0.state_hooks(total_steps, hooks_of))
    return Members(setups, builts, state, vectorize(fns.train_step, len(configs), be.device), diff)


def stack_batches(batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
