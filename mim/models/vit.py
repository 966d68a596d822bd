"""Vision Transformer (Dosovitskiy et al., 2021) as pure functions, in timm's layout.

``flatten(init(...))`` has exactly the keys of ``timm.models.VisionTransformer.state_dict()``
for the same configuration, so a timm checkpoint is a tree after ``unflatten``.
"""
from __future__ import annotations

import math
import re


import ml_collections
import torch
import torch.nn.functional as F

from mim import nn
from mim.nn import init as I


def config(**overrides) -> ml_collections.ConfigDict:
    """Default model fields (ViT-B/16 at 224 px, 1000 classes)."""
    c = ml_collections.ConfigDict(dict(
        name="vit",
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        num_classes=1000,
        global_pool="token",      # "token" (class token) or "avg" (mean of patch tokens + fc_norm)
        class_token=True,
        drop_path_rate=0.0,
        layer_scale_init=0.0,     # > 0 adds timm's ls1/ls2 gammas
        head_init_std=0.02,       # 0 -> zeros, as when fine-tuning ImageNet-21k weights
        norm_eps=1e-6,
    ))
    c.update(overrides)
    return c


SIZES = {
    # name: (embed_dim, depth, num_heads)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


def grid_size(cfg) -> int:
    return cfg.img_size // cfg.patch_size


def num_prefix_tokens(cfg) -> int:
    return 1 if cfg.class_token else 0


def init(gen: torch.Generator, cfg) -> dict:
    D = cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    n = grid_size(cfg) ** 2
    p = {}
    if cfg.class_token:
        p["cls_token"] = I.normal((1, 1, D), 1e-6, gen)
    p["pos_embed"] = I.trunc_normal((1, n + num_prefix_tokens(cfg), D), 0.02, gen)
    p["patch_embed"] = {"proj": {
        "weight": I.lecun_uniform_conv((D, cfg.in_chans, cfg.patch_size, cfg.patch_size), gen),
        "bias": I.zeros((D,)),
    }}
    blocks = {}
    for i in range(cfg.depth):
        b = {
            "norm1": I.norm(D),
            "attn": {"qkv": I.linear(D, 3 * D, gen), "proj": I.linear(D, D, gen)},
            "norm2": I.norm(D),
            "mlp": {"fc1": I.linear(D, hidden, gen), "fc2": I.linear(hidden, D, gen)},
        }
        if cfg.layer_scale_init > 0:
            b["ls1"] = {"gamma": torch.full((D,), float(cfg.layer_scale_init))}
            b["ls2"] = {"gamma": torch.full((D,), float(cfg.layer_scale_init))}
        # timm orders ls1 after attn and ls2 after mlp; keep its order for readability.
        order = ["norm1", "attn", "ls1", "norm2", "mlp", "ls2"]
        blocks[str(i)] = {k: b[k] for k in order if k in b}
    p["blocks"] = blocks
    if cfg.global_pool == "avg":
        p["fc_norm"] = I.norm(D)
    else:
        p["norm"] = I.norm(D)
    if cfg.num_classes > 0:
        if cfg.head_init_std > 0:
            p["head"] = I.linear(D, cfg.num_classes, gen, std=cfg.head_init_std)
        else:
            p["head"] = I.linear(D, cfg.num_classes, gen, kind="zeros")
    return p


def embed(p, x, cfg):
    """Patch embedding, class token, position embedding."""
    x = nn.patch_embed(p["patch_embed"], x, cfg.patch_size)
    if cfg.class_token:
        x = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    return x + p["pos_embed"].to(x.dtype)


def pool(p, x, cfg):
    """Pre-logits: the class token after the final norm, or the mean of patch tokens
    followed by ``fc_norm`` (MAE fine-tuning, He et al. 2022 Sec. A.1)."""
    if cfg.global_pool == "avg":
        return nn.layer_norm(p["fc_norm"], x[:, num_prefix_tokens(cfg):].mean(1), cfg.norm_eps)
    return x[:, 0]


def apply(p, x, cfg, train: bool = False, return_blocks: bool = False):
    """Logits and ``aux`` = {pre_logits, tokens, [blocks]}."""
    x = embed(p, x, cfg)
    rates = drop_path_rates(cfg)
    feats = []
    for i in range(cfg.depth):
        x = nn.vit_block(p["blocks"][str(i)], x, cfg.num_heads, rates[i], train, eps=cfg.norm_eps)
        if return_blocks:
            feats.append(x)
    if "norm" in p:
        x = nn.layer_norm(p["norm"], x, cfg.norm_eps)
    pre_logits = pool(p, x, cfg)
    aux = {"pre_logits": pre_logits, "tokens": x}
    if return_blocks:
        aux["blocks"] = feats
    logits = nn.linear(p["head"], pre_logits) if "head" in p else pre_logits
    return logits, aux


def drop_path_rates(cfg):
    """Stochastic depth rate rising linearly with depth (Huang et al. 2016; timm, MAE, BEiT)."""
    if cfg.depth == 1:
        return [cfg.drop_path_rate]
    return [cfg.drop_path_rate * i / (cfg.depth - 1) for i in range(cfg.depth)]


def no_weight_decay(cfg) -> tuple:
    """Names exempt from weight decay beyond 1-D tensors: timm's and MAE's
    ``VisionTransformer.no_weight_decay()`` = {pos_embed, cls_token, dist_token}."""
    del cfg
    return (r"^pos_embed$", r"^cls_token$", r"^dist_token$")


def num_layers(cfg) -> int:
    return cfg.depth


def layer_id(name: str, cfg) -> int:
    """Layer index for layer-wise lr decay (Clark et al. 2020; BEiT, MAE ``lr_decay.py``):
    embeddings are layer 0, block i is layer i + 1, everything after the blocks is layer
    depth + 1."""
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return cfg.depth + 1


def features(params, x, cfg, blocks: bool = False, train: bool = False) -> dict:
    """Encoder features without the head (``train``: with drop path, as a frozen backbone
    left in training mode computes them): ``pooled`` (B, C), the pre-logits as
    :func:`apply` computes them, and with ``blocks`` every block's output tokens
    ``(B, prefix + L, C)`` (before the final norm)."""
    body = {k: v for k, v in params.items() if k != "head"}
    _, aux = apply(body, x, cfg, train=train, return_blocks=blocks)
    out = {"pooled": aux["pre_logits"]}
    if blocks:
        out["blocks"] = aux["blocks"]
    return out


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Bicubic interpolation of the patch part of a position embedding to a new grid,
    keeping the prefix (class token) rows, as MAE/DeiT do when the resolution changes."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.sqrt(grid.shape[1]))
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding with {grid.shape[1]} patch rows is not a square grid")
    if old == new_grid:
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
