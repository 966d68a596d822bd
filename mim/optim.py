"""Functional optimizers, schedules and parameter groups.

Optimizer states are trees; updates are multi-tensor (``torch._foreach_*``) and in
place, because the train state is donated to the step. Parameter groups are rules
over flat parameter names (regular expressions), so weight-decay masks, layer-wise
lr decay, freezing and lr multipliers are all config.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Optional, Sequence

import torch

# ---------------------------------------------------------------------------
# Parameter groups


@dataclasses.dataclass
class Group:
    names: List[str]
    lr_scale: float
    weight_decay: float


def no_decay(name: str, shape, patterns: Sequence[str], exempt_1d: bool = True) -> bool:
    """Biases and norm weights (1-D) and names matching ``patterns`` (position
    embeddings, class / mask tokens) are not decayed, as in timm, MAE, BEiT and Swin.
    ``exempt_1d=False`` decays 1-D tensors too, as a plain ``torch.optim`` group does
    (BEiT's run_linear_eval.py: ``AdamW(linear_classifier.parameters(), weight_decay=1e-4)``)."""
    return (exempt_1d and len(shape) <= 1) or any(re.search(p, name) for p in patterns)


def make_groups(shapes: Dict[str, torch.Size], *, weight_decay: float,
                no_decay_patterns: Sequence[str] = (),
                layer_decay: float = 1.0,
                layer_id: Optional[Callable[[str], int]] = None,
                num_layers: int = 0,
                lr_multipliers: Sequence = (), exempt_1d: bool = True,
                weight_decay_rules: Sequence = ()) -> List[Group]:
    """Group trainable parameters by (lr scale, weight decay), in a stable order.

    Layer decay (Clark et al. 2020; BEiT Sec. 3.3): layer ``i`` of ``num_layers + 2``
    gets ``layer_decay ** (num_layers + 1 - i)``. ``lr_multipliers`` is a sequence of
    ``(regex, factor)`` applied on top. ``weight_decay_rules``: ``(regex, value)``, the first
    match gives a decaying name its own weight decay instead of ``weight_decay``."""
    if layer_decay != 1.0 and layer_id is None:
        raise ValueError("optim.layer_decay != 1 needs a model that defines layer ids")
    keyed: Dict[tuple, List[str]] = {}
    for name, shape in shapes.items():
        scale = 1.0
        if layer_decay != 1.0:
            scale = layer_decay ** (num_layers + 1 - layer_id(name))
        for pattern, factor in lr_multipliers:
            if re.search(pattern, name):
                scale *= factor
        wd = 0.0 if no_decay(name, shape, no_decay_patterns, exempt_1d) else next(
            (v for pattern, v in weight_decay_rules if re.search(pattern, name)), weight_decay)
        keyed.setdefault((scale, wd), []).append(name)
    return [Group(names, s, wd) for (s, wd), names in keyed.items()]


def trainable_names(names: Sequence[str], frozen_patterns: Sequence[str]) -> List[str]:
    return [n for n in names if not any(re.search(p, n) for p in frozen_patterns)]


# ---------------------------------------------------------------------------
# Gradient utilities


def global_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    norms = torch._foreach_norm(tensors)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def clip_by_global_norm(grads: List[torch.Tensor], max_norm: float,
                        norm: Optional[torch.Tensor] = None):
    """Gradients scaled so their global L2 norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` semantics, no host sync), and that norm
    (computed here unless given). Not in place: ``torch.func`` may return expanded
    (stride-0) gradients."""
    if norm is None:
        norm = global_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return torch._foreach_mul(grads, coef.to(grads[0].dtype)), norm


# ---------------------------------------------------------------------------
# Optimizers. ``init(params) -> state``; ``update(params, grads, state, lr, groups, wd)``
# updates ``params`` and ``state`` in place. ``params``/``grads`` are flat dicts; ``lr`` is
# one value per group (or one tensor, scaled by each group's ``lr_scale``), ``wd`` one
# weight decay per group (None: each group's own).


def per_group(lr, groups: List[Group], wd=None):
    """Each group's (lr, weight decay) from :meth:`update`'s ``lr`` and ``wd``."""
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr * g.lr_scale for g in groups]
    wds = [g.weight_decay for g in groups] if wd is None else list(wd)
    if len(lrs) != len(groups) or len(wds) != len(groups):
        raise ValueError(f"{len(groups)} parameter groups, {len(lrs)} lrs, {len(wds)} weight decays")
    return zip(groups, lrs, wds)


class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter 2019), torch.optim.AdamW semantics."""

    def __init__(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, params: Dict[str, torch.Tensor]) -> dict:
        return {"count": torch.zeros((), dtype=torch.int64, device=_device(params)),
                "mu": _zeros(params), "nu": _zeros(params)}

    def update(self, params, grads, state, lr, groups: List[Group], wd=None):
        state["count"].add_(1)
        first = lr[0] if isinstance(lr, (list, tuple)) else lr
        t = state["count"].to(first.dtype if torch.is_tensor(first) else torch.float32)
        bc1 = 1 - self.b1 ** t
        bc2 = 1 - self.b2 ** t
        for g, glr, gwd in per_group(lr, groups, wd):
            p = [params[n] for n in g.names]
            d = [grads[n] for n in g.names]
            m = [state["mu"][n] for n in g.names]
            v = [state["nu"][n] for n in g.names]
            if g.weight_decay:
                torch._foreach_mul_(p, 1 - glr * gwd)
            torch._foreach_lerp_(m, d, 1 - self.b1)
            torch._foreach_mul_(v, self.b2)
            torch._foreach_addcmul_(v, d, d, 1 - self.b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, torch.sqrt(bc2))
            torch._foreach_add_(denom, self.eps)
            upd = torch._foreach_div(m, denom)
            torch._foreach_mul_(upd, -glr / bc1)
            torch._foreach_add_(p, upd)


class SGD:
    """SGD with (Nesterov) momentum and coupled L2 weight decay, torch.optim.SGD semantics
    (dampening 0: the first step's buffer equals the gradient)."""

    def __init__(self, momentum: float = 0.9, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("optim.nesterov needs optim.momentum > 0")
        self.momentum, self.nesterov = momentum, nesterov

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64, device=_device(params)),
                "momentum": _zeros(params)}

    def update(self, params, grads, state, lr, groups, wd=None):
        state["count"].add_(1)
        for g, glr, gwd in per_group(lr, groups, wd):
            p = [params[n] for n in g.names]
            d = [grads[n] for n in g.names]
            if g.weight_decay:
                d = (torch._foreach_add(d, torch._foreach_mul(p, gwd)) if torch.is_tensor(gwd)
                     else torch._foreach_add(d, p, alpha=gwd))
            if self.momentum:
                buf = [state["momentum"][n] for n in g.names]
                torch._foreach_mul_(buf, self.momentum)
                torch._foreach_add_(buf, d)
                d = torch._foreach_add(d, buf, alpha=self.momentum) if self.nesterov else buf
            upd = torch._foreach_mul(d, -glr)
            torch._foreach_add_(p, upd)


class LARS:
    """Layer-wise adaptive rate scaling (You et al. 2017) as MAE's linear probe uses it:
    weight decay and the trust ratio apply to matrices only (``ndim > 1``)."""

    def __init__(self, momentum: float = 0.9, trust_coefficient: float = 0.001):
        self.momentum, self.eta = momentum, trust_coefficient

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64, device=_device(params)),
                "momentum": _zeros(params)}

    def update(self, params, grads, state, lr, groups, wd=None):
        state["count"].add_(1)
        for g, glr, gwd in per_group(lr, groups, wd):
            for n in g.names:
                p, d, mu = params[n], grads[n], state["momentum"][n]
                if p.ndim > 1:
                    d = d + gwd * p
                    pn, un = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(un > 0, self.eta * pn / un, one), one)
                    d = d * q
                mu.mul_(self.momentum).add_(d)
                p.add_(mu * (-glr))


OPTIMIZERS = ("adamw", "sgd", "lars")


def create(name: str, cfg) -> object:
    if name == "adamw":
        return AdamW(cfg.b1, cfg.b2, cfg.eps)
    if name == "sgd":
        return SGD(cfg.momentum, cfg.nesterov)
    if name == "lars":
        return LARS(cfg.momentum)
    raise ValueError(f"config.optim.name={name!r}: must be one of {OPTIMIZERS}")


def _zeros(params):
    """Optimizer moments in at least fp32, whatever the parameters' precision."""
    return {k: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            for k, p in params.items()}


def _device(params):
    for p in params.values():
        return p.device
    return torch.device("cpu")
