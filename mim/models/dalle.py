"""The encoder of OpenAI's DALL-E discrete VAE (Ramesh et al., 2021), BEiT's visual tokenizer,
as pure functions in the official layout (openai/DALL-E ``dall_e/encoder.py``, ``utils.py``).

``flatten(init(...))`` has exactly the keys of the official ``Encoder.state_dict()`` in the
same order; every convolution holds ``w`` (out, in, k, k) and ``b``::

    blocks.input.{w,b}                                   7x7, 3 -> n_hid
    blocks.group_g.block_i.[id_path.{w,b}]               1x1, only where the width changes
    blocks.group_g.block_i.res_path.conv_{1,2,3,4}.{w,b} 3x3, 3x3, 3x3, 1x1 (width n_out / 4 inside)
    blocks.output.conv.{w,b}                             1x1, 8 n_hid -> vocab_size

Groups 1-4 have widths n_hid, 2 n_hid, 4 n_hid, 8 n_hid; groups 1-3 end in a 2x2 max-pool,
so the logits are ``(B, vocab_size, H / 8, W / 8)``. A block is
``id_path(x) + post_gain * res_path(x)`` with ``post_gain = 1 / n_layers^2`` and
``n_layers = 4 groups x n_blk_per_group`` (1/64 for the released model); ``res_path`` is
ReLU-conv four times, and the output is ReLU then the 1x1 convolution. The input is an RGB
image on [0, 1] mapped to ``0.8 x + 0.1`` (``map_pixels``, logit-Laplace eps 0.1).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import ml_collections
import torch
import torch.nn.functional as F

from mim import tree

GROUP_COUNT = 4          # dall_e/encoder.py: a class constant, not a constructor argument
DOWNSAMPLE = 2 ** (GROUP_COUNT - 1)
LOGIT_LAPLACE_EPS = 0.1  # dall_e/utils.py


def config(**overrides) -> ml_collections.ConfigDict:
    """The released encoder's fields (``Encoder`` defaults: n_hid 256, 2 blocks per group,
    3 input channels, 8192 tokens)."""
    c = ml_collections.ConfigDict(dict(
        name="dalle",
        n_hid=256,
        n_blk_per_group=2,
        input_channels=3,
        vocab_size=8192,
    ))
    c.update(overrides)
    validate(c)
    return c


def validate(cfg) -> None:
    # The official attrs validators ask n_hid >= 64 and vocab_size >= 512; smaller encoders
    # (CPU-sized :tiny runs) keep every other rule, including each block's width being a
    # multiple of 4 (EncoderBlock's n_out % 4).
    if cfg.n_hid < 4 or cfg.n_hid % 4:
        raise ValueError(f"dalle n_hid={cfg.n_hid}: must be a positive multiple of 4")
    if cfg.n_blk_per_group < 1:
        raise ValueError(f"dalle n_blk_per_group={cfg.n_blk_per_group}: must be >= 1")
    if cfg.input_channels < 1:
        raise ValueError(f"dalle input_channels={cfg.input_channels}: must be >= 1")
    if cfg.vocab_size < 2:
        raise ValueError(f"dalle vocab_size={cfg.vocab_size}: must be >= 2")


def post_gain(cfg) -> float:
    return 1.0 / (GROUP_COUNT * cfg.n_blk_per_group) ** 2


def widths(cfg):
    """``[(group name, [(block name, n_in, n_out)]), ...]`` in the official order."""
    out, n_in = [], cfg.n_hid
    for g in range(GROUP_COUNT):
        n_out = cfg.n_hid * 2 ** g
        blocks = []
        for i in range(cfg.n_blk_per_group):
            blocks.append((f"block_{i + 1}", n_in, n_out))
            n_in = n_out
        out.append((f"group_{g + 1}", blocks))
    return out


def param_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """Flat ``{name: shape}`` in the official ``state_dict`` order."""
    out: Dict[str, Tuple[int, ...]] = {}

    def conv(name, n_in, n_out, kw):
        out[f"{name}.w"] = (n_out, n_in, kw, kw)
        out[f"{name}.b"] = (n_out,)

    conv("blocks.input", cfg.input_channels, cfg.n_hid, 7)
    for group, members in widths(cfg):
        for name, n_in, n_out in members:
            pre, n_mid = f"blocks.{group}.{name}", n_out // 4
            if n_in != n_out:
                conv(f"{pre}.id_path", n_in, n_out, 1)
            conv(f"{pre}.res_path.conv_1", n_in, n_mid, 3)
            conv(f"{pre}.res_path.conv_2", n_mid, n_mid, 3)
            conv(f"{pre}.res_path.conv_3", n_mid, n_mid, 3)
            conv(f"{pre}.res_path.conv_4", n_mid, n_out, 1)
    conv("blocks.output.conv", 8 * cfg.n_hid, cfg.vocab_size, 1)
    return out


def init(gen: torch.Generator, cfg) -> dict:
    """dall_e/utils.py ``Conv2d``: weights normal(0, 1 / sqrt(n_in k^2)), zero biases."""
    validate(cfg)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".w"):
            fan_in = shape[1] * shape[2] * shape[3]
            flat[name] = torch.empty(shape).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        else:
            flat[name] = torch.zeros(shape)
    return tree.unflatten(flat)


def _apply_conv(p, x, dtype):
    w = p["w"]
    return F.conv2d(x.to(dtype), w.to(dtype), p["b"].to(dtype), padding=(w.shape[-1] - 1) // 2)


def apply(params, x: torch.Tensor, cfg, float16: bool = False) -> torch.Tensor:
    """Token logits ``(B, vocab_size, H/8, W/8)`` of mapped pixels ``x`` (``0.8 x + 0.1``).

    ``float16``: every convolution but the output one in float16 and the output one in
    float32, which is what the official ``Conv2d`` does when its weights are on a CUDA
    device (``use_float16``); on the CPU the official encoder is all float32."""
    if x.ndim != 4 or x.shape[1] != cfg.input_channels:
        raise ValueError(f"dalle encoder input {tuple(x.shape)}: expected (B, {cfg.input_channels}, H, W)")
    if x.shape[-1] % DOWNSAMPLE or x.shape[-2] % DOWNSAMPLE:
        raise ValueError(f"dalle encoder input {x.shape[-2]}x{x.shape[-1]}: sides must be multiples "
                         f"of {DOWNSAMPLE} (three 2x2 max-pools)")
    dt = torch.float16 if float16 else torch.float32
    gain = post_gain(cfg)
    p = params["blocks"]
    h = _apply_conv(p["input"], x, dt)
    for g, (group, members) in enumerate(widths(cfg)):
        for name, _, _ in members:
            b = p[group][name]
            r = h
            for k in ("conv_1", "conv_2", "conv_3", "conv_4"):
                r = _apply_conv(b["res_path"][k], F.relu(r), dt)
            skip = _apply_conv(b["id_path"], h, dt) if "id_path" in b else h
            h = skip + gain * r
        if g < GROUP_COUNT - 1:
            h = F.max_pool2d(h, kernel_size=2)
    return _apply_conv(p["output"]["conv"], F.relu(h), torch.float32)


def token_ids(params, x: torch.Tensor, cfg, float16: bool = False) -> torch.Tensor:
    """``(B, H/8, W/8)`` int64 token ids: the argmax of the logits (BEiT's
    ``Dalle_VAE.get_codebook_indices``)."""
    return apply(params, x, cfg, float16).argmax(dim=1)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels to the encoder's input range (dall_e/utils.py ``map_pixels``)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


# map_pixels as (x - mean) / std, for pipelines that normalise each image key:
# 0.8 x + 0.1 = (x + 0.125) / 1.25.
INPUT_MEAN = -0.125
INPUT_STD = 1.25
