"""Layer functions: ``f(params, x, ...)`` with parameters in torch layouts."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear(p, x):
    return F.linear(x, p["weight"], p.get("bias"))


def layer_norm(p, x, eps: float = 1e-6):
    return F.layer_norm(x, x.shape[-1:], p["weight"], p.get("bias"), eps)


def patch_embed(p, x, patch: int):
    """``(B, C, H, W)`` -> ``(B, N, D)`` tokens; ``p = {"proj": conv weight/bias}``."""
    x = F.conv2d(x, p["proj"]["weight"], p["proj"].get("bias"), stride=patch)
    return x.flatten(2).transpose(1, 2)


def drop_path(x, rate: float, train: bool):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample.

    The draw uses the default generator, which the train step seeds from
    (seed, step, rank), so a step stays a deterministic function of its inputs."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    # empty_like of a slice of x, not torch.empty: under vmap (mim.train.members) the mask
    # then carries the member axis, and each member draws its own.
    mask = torch.empty_like(x[(slice(None),) + (slice(0, 1),) * (x.ndim - 1)],
                            memory_format=torch.contiguous_format)
    mask = mask.bernoulli_(keep)
    return x * mask / keep


def attention(p, x, heads: int, attn_bias: Optional[torch.Tensor] = None,
              attn_drop: float = 0.0, train: bool = False):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    ``p`` holds ``qkv`` (fused, timm layout) and ``proj``. A BEiT-style ``q_bias`` /
    ``v_bias`` pair (no key bias) is honoured when present. ``attn_bias`` is added to
    the attention logits (relative position bias, shifted-window masks)."""
    B, N, C = x.shape
    bias = p["qkv"].get("bias")
    if bias is None and "q_bias" in p:
        bias = torch.cat([p["q_bias"], torch.zeros_like(p["v_bias"]), p["v_bias"]])
    qkv = F.linear(x, p["qkv"]["weight"], bias)
    # split (whose backward is one cat into a contiguous gradient) rather than the usual
    # reshape-permute-unbind, whose backward stacks and then copies to undo the permute.
    q, k, v = (t.view(B, N, heads, C // heads).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    # q, k, v already have the compute dtype. Autocast is left off around the kernel: under
    # torch.func.grad with autocast, the CPU backward of a trainable bias (relative position
    # tables) fails with "expected scalar type Float but found BFloat16" (torch 2.14).
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                             dropout_p=attn_drop if train else 0.0)
    out = out.transpose(1, 2).reshape(B, N, C)
    return linear(p["proj"], out)


def mlp(p, x, drop: float = 0.0, train: bool = False):
    """Two linears with exact GELU between them (timm's ``Mlp``)."""
    x = F.gelu(linear(p["fc1"], x))
    if drop and train:
        x = F.dropout(x, drop)
    x = linear(p["fc2"], x)
    if drop and train:
        x = F.dropout(x, drop)
    return x


def vit_block(p, x, heads: int, drop_path_rate: float = 0.0, train: bool = False,
              attn_bias: Optional[torch.Tensor] = None, eps: float = 1e-6):
    """Pre-norm transformer block (Dosovitskiy et al. 2021, eq. 2-3), timm layout:
    ``norm1, attn, [ls1.gamma], norm2, mlp, [ls2.gamma]``."""
    y = attention(p["attn"], layer_norm(p["norm1"], x, eps), heads, attn_bias)
    if "ls1" in p:
        y = y * p["ls1"]["gamma"]
    x = x + drop_path(y, drop_path_rate, train)
    y = mlp(p["mlp"], layer_norm(p["norm2"], x, eps))
    if "ls2" in p:
        y = y * p["ls2"]["gamma"]
    return x + drop_path(y, drop_path_rate, train)
