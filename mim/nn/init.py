"""Initialisers. Each takes an explicit ``torch.Generator`` so that ``init`` is pure:
the same seed gives the same parameters."""
from __future__ import annotations

import math

import torch


def trunc_normal(shape, std: float, gen: torch.Generator, a: float = -2.0, b: float = 2.0):
    """Normal(0, std) truncated to [a, b] in absolute units, as timm's ``trunc_normal_``
    (whose bounds are absolute, so with std=0.02 it is effectively untruncated)."""
    t = torch.empty(shape)
    # Inverse-CDF sampling, the method of timm / PyTorch's trunc_normal_.
    lo = 0.5 * (1.0 + math.erf(a / std / math.sqrt(2.0)))
    hi = 0.5 * (1.0 + math.erf(b / std / math.sqrt(2.0)))
    t.uniform_(2 * lo - 1, 2 * hi - 1, generator=gen)
    t.erfinv_().mul_(std * math.sqrt(2.0)).clamp_(min=a, max=b)
    return t


def normal(shape, std: float, gen: torch.Generator):
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def xavier_uniform(shape, gen: torch.Generator):
    """Glorot uniform for a torch-layout weight ``(out, in, *kernel)``; conv kernels are
    treated as a linear layer over ``in * prod(kernel)`` inputs, as MAE's patch embedding."""
    fan_out = shape[0]
    fan_in = math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def lecun_uniform_conv(shape, gen: torch.Generator):
    """PyTorch's default Conv2d/Linear init (kaiming_uniform with a=sqrt(5))."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def zeros(shape):
    return torch.zeros(shape)


def ones(shape):
    return torch.ones(shape)


def linear(in_dim: int, out_dim: int, gen: torch.Generator, std: float = 0.02, bias: bool = True,
           kind: str = "trunc_normal"):
    """A linear layer sub-tree ``{"weight": (out, in), "bias": (out,)}``."""
    if kind == "trunc_normal":
        w = trunc_normal((out_dim, in_dim), std, gen)
    elif kind == "xavier_uniform":
        w = xavier_uniform((out_dim, in_dim), gen)
    elif kind == "zeros":
        w = zeros((out_dim, in_dim))
    else:
        raise ValueError(f"unknown linear init {kind!r}")
    p = {"weight": w}
    if bias:
        p["bias"] = zeros((out_dim,))
    return p


def norm(dim: int):
    return {"weight": ones((dim,)), "bias": zeros((dim,))}
