"""Swin Transformer (Liu et al., 2021) as pure functions, in the official layout.

``flatten(init(...))`` has exactly the learnable keys of microsoft/Swin-Transformer's
``SwinTransformer.state_dict()``: the patch merging of stage ``i`` lives at the END of
stage ``i`` (``layers.i.downsample``), the classifier is ``head``. The official
non-learned buffers (``relative_position_index``, ``attn_mask``) are not parameters
here: they are functions of (window, shift, resolution), computed on demand, so any
input size whose stage resolutions the window divides runs with the same tree.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import ml_collections
import torch

from mim import nn
from mim.nn import init as I
from mim.nn import relpos

# Value the official code adds to logits between tokens from different regions of a
# shifted window (not -inf: the reference's softmax sees -100, and so must ours).
_SHIFT_MASK_VALUE = -100.0


def config(**overrides) -> ml_collections.ConfigDict:
    """Default model fields: Swin-T at 224 px, window 7, 1000 classes."""
    c = ml_collections.ConfigDict(dict(
        name="swin",
        img_size=224,
        patch_size=4,
        in_chans=3,
        embed_dim=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        ape=False,              # absolute position embedding (Sec. 3.2 notes it is optional)
        patch_norm=True,
        drop_path_rate=0.1,
        num_classes=1000,
        norm_eps=1e-5,
    ))
    c.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return c


SIZES = {
    # name: (embed_dim, depths, num_heads), Liu et al. 2021 Sec. 3.3
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def num_stages(cfg) -> int:
    return len(cfg.depths)


def stage_dim(cfg, i: int) -> int:
    return int(cfg.embed_dim * 2 ** i)


def num_features(cfg) -> int:
    return stage_dim(cfg, num_stages(cfg) - 1)


def stride(cfg) -> int:
    """Pixels per token of the last stage (SimMIM's ``encoder_stride``, 32 for Swin-B)."""
    return cfg.patch_size * 2 ** (num_stages(cfg) - 1)


# --------------------------------------------------------------------------- geometry


def window_and_shift(resolution: Tuple[int, int], window: int) -> Tuple[int, int]:
    """Window and shift for a stage: when the feature map is no larger than the window,
    one window covers it and shifting would change nothing (official ``SwinTransformerBlock``
    clips the window to ``min(resolution)`` and sets the shift to 0)."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, window // 2


def stage_geometry(cfg, height: int, width: int) -> List[Tuple[int, int, int, int]]:
    """``(H, W, window, shift)`` per stage for an input image, with clear errors for
    sizes the architecture cannot partition."""
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"input size {height}x{width} is not divisible by patch_size={p}")
    H, W = height // p, width // p
    out = []
    for i in range(num_stages(cfg)):
        if i > 0:
            if H % 2 or W % 2:
                raise ValueError(
                    f"patch merging before stage {i} needs an even resolution, got {H}x{W} "
                    f"(input {height}x{width})")
            H, W = H // 2, W // 2
        w, s = window_and_shift((H, W), cfg.window_size)
        if H % w or W % w:
            raise ValueError(
                f"window_size={w} does not divide the stage {i} resolution {H}x{W} "
                f"(input {height}x{width}, patch_size={p})")
        out.append((H, W, w, s))
    return out


def _shift_attn_mask(H: int, W: int, window: int, shift: int, device) -> torch.Tensor:
    def labels(n):
        # Three bands after the cyclic shift: untouched, last window before the wrap,
        # and the wrapped-in strip of width `shift` (Liu et al. 2021 Sec. 3.2, Fig. 4).
        r = torch.arange(n)
        return (r >= n - window).long() + (r >= n - shift).long()

    region = labels(H)[:, None] * 3 + labels(W)[None, :]          # (H, W)
    region = region.view(H // window, window, W // window, window).permute(0, 2, 1, 3)
    region = region.reshape(-1, window * window)                  # (nW, N)
    different = region[:, :, None] != region[:, None, :]
    return (different.float() * _SHIFT_MASK_VALUE).to(device)


def shift_attn_mask(H: int, W: int, window: int, shift: int, device=None) -> torch.Tensor:
    """``(num_windows, N, N)`` additive mask keeping attention inside each sub-window of a
    cyclically shifted window; equals the official ``attn_mask`` buffer. Cached per
    (shape, device): do not modify it in place."""
    return relpos.cached(_shift_attn_mask, H, W, window, shift, torch.device(device or "cpu"))


# --------------------------------------------------------------------------- init


def _conv_default(out_dim, in_dim, k, gen):
    """PyTorch's default Conv2d init, which the official code leaves on the patch embedding."""
    fan_in = in_dim * k * k
    bound = 1.0 / fan_in ** 0.5
    return {
        "weight": I.lecun_uniform_conv((out_dim, in_dim, k, k), gen),
        "bias": torch.empty(out_dim).uniform_(-bound, bound, generator=gen),
    }


def _block_init(gen, dim, heads, window, cfg):
    hidden = int(dim * cfg.mlp_ratio)
    return {
        "norm1": I.norm(dim),
        "attn": {
            "relative_position_bias_table": I.trunc_normal((relpos.table_rows(window), heads), 0.02, gen),
            "qkv": I.linear(dim, 3 * dim, gen, bias=cfg.qkv_bias),
            "proj": I.linear(dim, dim, gen),
        },
        "norm2": I.norm(dim),
        "mlp": {"fc1": I.linear(dim, hidden, gen), "fc2": I.linear(hidden, dim, gen)},
    }


def init(gen: torch.Generator, cfg) -> dict:
    """Parameters as the official ``_init_weights``: linears trunc-normal(0.02) with zero
    bias, layer norms (1, 0), bias tables trunc-normal(0.02), patch conv PyTorch default.
    Each block's table is sized for the window it uses at ``cfg.img_size``."""
    geometry = stage_geometry(cfg, cfg.img_size, cfg.img_size)
    D = cfg.embed_dim
    p = {}
    if cfg.ape:
        n = (cfg.img_size // cfg.patch_size) ** 2
        p["absolute_pos_embed"] = I.trunc_normal((1, n, D), 0.02, gen)
    p["patch_embed"] = {"proj": _conv_default(D, cfg.in_chans, cfg.patch_size, gen)}
    if cfg.patch_norm:
        p["patch_embed"]["norm"] = I.norm(D)
    layers = {}
    for i, (_, _, window, _) in enumerate(geometry):
        dim = stage_dim(cfg, i)
        stage = {"blocks": {str(j): _block_init(gen, dim, cfg.num_heads[i], window, cfg)
                            for j in range(cfg.depths[i])}}
        if i < num_stages(cfg) - 1:
            stage["downsample"] = {"reduction": I.linear(4 * dim, 2 * dim, gen, bias=False),
                                   "norm": I.norm(4 * dim)}
        layers[str(i)] = stage
    p["layers"] = layers
    p["norm"] = I.norm(num_features(cfg))
    if cfg.num_classes > 0:
        p["head"] = I.linear(num_features(cfg), cfg.num_classes, gen)
    return p


# --------------------------------------------------------------------------- apply


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * num_windows, window * window, C)``, windows row-major
    inside each image, images outermost (the official order, which the mask relies on)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_merge(x: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    C = x.shape[-1]
    x = x.view(-1, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def window_attn_bias(table: torch.Tensor, H: int, W: int, window: int, shift: int,
                     batch: int) -> torch.Tensor:
    """Additive attention bias: relative position bias ``(1, heads, N, N)``, plus the
    shifted-window mask when ``shift > 0``, expanded to ``(batch * num_windows, heads, N, N)``."""
    if table.shape[0] != relpos.table_rows(window):
        raise ValueError(
            f"relative_position_bias_table has {table.shape[0]} rows, window {window} needs "
            f"{relpos.table_rows(window)}; resize it (mim.nn.relpos.resize)")
    bias = relpos.lookup(table, relpos.window_index(window, table.device))  # (1, heads, N, N)
    if not shift:
        return bias
    mask = shift_attn_mask(H, W, window, shift, table.device).to(bias.dtype)
    bias = bias + mask.unsqueeze(1)                                 # (nW, heads, N, N)
    return bias.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, *bias.shape[1:])


def block(p, x, H: int, W: int, heads: int, window: int, shift: int, drop_path_rate: float,
          train: bool, eps: float):
    """(S)W-MSA block (Liu et al. 2021 eq. 3): pre-norm, cyclic shift by ``-shift``,
    window attention with relative position bias, shift back, residual; then the MLP."""
    B, L, C = x.shape
    y = nn.layer_norm(p["norm1"], x, eps).view(B, H, W, C)
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
    bias = window_attn_bias(p["attn"]["relative_position_bias_table"], H, W, window, shift, B)
    y = nn.attention(p["attn"], window_partition(y, window), heads, bias)
    y = window_merge(y, window, H, W)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + nn.drop_path(y.reshape(B, L, C), drop_path_rate, train)
    y = nn.mlp(p["mlp"], nn.layer_norm(p["norm2"], x, eps))
    return x + nn.drop_path(y, drop_path_rate, train)


def patch_merging(p, x, H: int, W: int, eps: float):
    """Concatenate each 2x2 neighbourhood (official order: (0,0), (1,0), (0,1), (1,1) as
    (row, col) offsets), layer norm, linear 4C -> 2C (Liu et al. 2021 Sec. 3.1)."""
    B, L, C = x.shape
    x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # col offset outer
    x = x.reshape(B, (H // 2) * (W // 2), 4 * C)
    return nn.linear(p["reduction"], nn.layer_norm(p["norm"], x, eps))


def drop_path_rates(cfg) -> List[float]:
    """Stochastic depth rising linearly over all blocks of all stages (official ``dpr``)."""
    return list(_linspace(float(cfg.drop_path_rate), int(sum(cfg.depths))))


@torch.compiler.assume_constant_result
def _linspace(end: float, n: int) -> tuple:
    """``torch.linspace(0, end, n)`` as Python floats (the reference's float32 values),
    a constant to a compiled step: computed when it is traced, not in its graph."""
    return tuple(torch.linspace(0, end, n).tolist())


def embed(p, x, cfg, mask: Optional[torch.Tensor] = None,
          mask_token: Optional[torch.Tensor] = None):
    """Patch embedding (+ norm), SimMIM's mask-token substitution, absolute position
    embedding: the order of ``SwinTransformerForSimMIM.forward`` (Xie et al. 2022 Sec. 3)."""
    x = nn.patch_embed(p["patch_embed"], x, cfg.patch_size)
    if "norm" in p["patch_embed"]:
        x = nn.layer_norm(p["patch_embed"]["norm"], x, cfg.norm_eps)
    if mask is not None:
        if mask_token is None:
            if "mask_token" not in p:
                raise ValueError("a mask was given but there is no mask_token (argument or params)")
            mask_token = p["mask_token"]
        if mask.flatten(1).shape != x.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match "
                             f"{x.shape[1]} patch tokens")
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + mask_token.to(x.dtype) * w
    if "absolute_pos_embed" in p:
        if p["absolute_pos_embed"].shape[1] != x.shape[1]:
            raise ValueError(f"absolute_pos_embed has {p['absolute_pos_embed'].shape[1]} positions, "
                             f"the input has {x.shape[1]} patches")
        x = x + p["absolute_pos_embed"].to(x.dtype)
    return x


def apply(p, x, cfg, train: bool = False, mask: Optional[torch.Tensor] = None,
          mask_token: Optional[torch.Tensor] = None):
    """Logits and ``aux`` = {pre_logits (B, C), tokens (B, L, C) after the final norm,
    feature_map (B, C, H, W) of those tokens, stages: per-stage (B, C_i, H_i, W_i) block
    outputs before patch merging}. ``mask`` (B, H/p, W/p) of 0/1 selects patches replaced by
    ``mask_token`` (default ``p["mask_token"]``), as SimMIM's encoder."""
    geometry = stage_geometry(cfg, x.shape[-2], x.shape[-1])
    x = embed(p, x, cfg, mask, mask_token)
    rates = drop_path_rates(cfg)
    stages = []
    k = 0
    for i, (H, W, window, shift) in enumerate(geometry):
        stage = p["layers"][str(i)]
        for j in range(cfg.depths[i]):
            s = shift if j % 2 else 0   # W-MSA and SW-MSA alternate (Sec. 3.2)
            x = block(stage["blocks"][str(j)], x, H, W, cfg.num_heads[i], window, s,
                      rates[k], train, cfg.norm_eps)
            k += 1
        stages.append(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))
        if "downsample" in stage:
            x = patch_merging(stage["downsample"], x, H, W, cfg.norm_eps)
    x = nn.layer_norm(p["norm"], x, cfg.norm_eps)
    H, W = geometry[-1][:2]
    pre_logits = x.mean(1)
    aux = {"pre_logits": pre_logits, "tokens": x,
           "feature_map": x.transpose(1, 2).reshape(x.shape[0], -1, H, W), "stages": stages}
    logits = nn.linear(p["head"], pre_logits) if "head" in p else pre_logits
    return logits, aux


# --------------------------------------------------------------------------- parameter facts


def no_weight_decay(cfg) -> tuple:
    """Names exempt from weight decay beyond 1-D tensors: the official
    ``no_weight_decay()`` = {absolute_pos_embed} and ``no_weight_decay_keywords()`` =
    {relative_position_bias_table}, plus SimMIM's ``mask_token``
    (``SwinTransformerForSimMIM.no_weight_decay``)."""
    del cfg
    return (r"^absolute_pos_embed$", r"^mask_token$", r"relative_position_bias_table")


def num_layers(cfg) -> int:
    """Blocks over all stages; layer ids run 0..num_layers + 1 (SimMIM's
    ``build_finetune_optimizer`` uses ``sum(depths) + 2`` groups)."""
    return sum(cfg.depths)


def num_layer_ids(cfg) -> int:
    """Layer-decay groups, ``num_layers + 2``; kept for mim.models.moby, which reads it."""
    return num_layers(cfg) + 2


def layer_id(name: str, cfg) -> int:
    """Layer index for layer-wise lr decay, as SimMIM's ``get_swin_layer``: mask token and
    patch embedding are 0; block j of stage i is ``sum(depths[:i]) + j + 1``; the patch
    merging at the end of stage i shares the id of that stage's last block; everything
    else (final norm, head, and, as in the reference, ``absolute_pos_embed``) is the top."""
    if name == "mask_token" or name.startswith("patch_embed"):
        return 0
    if name.startswith("layers."):
        parts = name.split(".")
        stage, sub = int(parts[1]), parts[3]
        if sub in ("reduction", "norm"):
            return sum(cfg.depths[:stage + 1])
        return sum(cfg.depths[:stage]) + int(sub) + 1
    return num_layers(cfg) + 1


def features(params, x, cfg, blocks: bool = False, train: bool = False) -> dict:
    """Encoder features without the head (``train``: with drop path, as a frozen backbone
    left in training mode computes them): ``pooled`` (B, C), the mean of the final-normed
    tokens (the pre-logits), and with ``blocks`` each stage's output before its patch
    merging as tokens ``(B, H_i * W_i, C_i)``."""
    body = {k: v for k, v in params.items() if k != "head"}
    _, aux = apply(body, x, cfg, train=train)
    out = {"pooled": aux["pre_logits"]}
    if blocks:
        out["blocks"] = [s.flatten(2).transpose(1, 2) for s in aux["stages"]]
    return out
