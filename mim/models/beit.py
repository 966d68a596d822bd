"""BEiT-style Vision Transformer (Bao et al., 2022) as pure functions, in the official layout.

This is the ViT of microsoft/unilm ``beit/modeling_finetune.py`` and of microsoft/SimMIM
``models/vision_transformer.py`` (which SimMIM took from BEiT): a class token, optionally
no absolute position embedding, a relative position bias shared by all blocks
(``rel_pos_bias``, BEiT/SimMIM pretraining) or one per block (fine-tuning), query and value
biases without a key bias, and layer scale ``gamma_1`` / ``gamma_2`` (Touvron et al. 2021).

``flatten(init(...))`` has exactly the learnable keys of the official module's
``state_dict()`` in the same order (and those of ``timm.models.beit.Beit``):

    cls_token, [pos_embed], patch_embed.proj.{weight,bias},
    [rel_pos_bias.relative_position_bias_table],
    blocks.i.{[gamma_1, gamma_2], norm1, attn.{[q_bias, v_bias],
              [relative_position_bias_table], qkv.weight, proj}, norm2, mlp.{fc1, fc2}},
    norm | fc_norm, [head]

The official ``relative_position_index`` buffers are not parameters here: they are a
function of the patch grid (:func:`mim.nn.relpos.class_token_index`).
"""
from __future__ import annotations

import math
import re
from typing import Optional

import ml_collections
import torch

from mim import nn
from mim.models import vit
from mim.nn import init as I
from mim.nn import relpos

# Rows for the class-token pairs (mim.nn.relpos.NUM_EXTRA).
NUM_EXTRA = relpos.NUM_EXTRA


def config(**overrides) -> ml_collections.ConfigDict:
    """Default model fields: SimMIM's ViT-B/16 fine-tuning model (configs/vit_base__800ep/
    simmim_finetune__vit_base__img224__800ep.yaml with config.py's VIT defaults), which is
    also BEiT-B's fine-tuning model: relative position bias per block, no absolute position
    embedding, layer scale 0.1, mean pooling with ``fc_norm``, 1000 classes."""
    c = ml_collections.ConfigDict(dict(
        name="beit",
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,                  # q_bias and v_bias (BEiT has no key bias)
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,          # one table per block
        use_shared_rel_pos_bias=False,  # one table for all blocks (``rel_pos_bias``)
        layer_scale_init=0.1,           # gamma_1 / gamma_2 initial value; 0: no layer scale
        drop_path_rate=0.1,
        num_classes=1000,
        global_pool="avg",              # "avg": mean of patch tokens + fc_norm; "token": norm, class token
        init_scale=0.001,               # the head's trunc-normal(0.02) init is scaled by this
        init_trunc_at_std=False,        # True: truncate inits at +-std (BEiT/SimMIM pretraining models)
        norm_eps=1e-6,
    ))
    c.update(overrides)
    validate(c)
    return c


def validate(cfg) -> None:
    if cfg.global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool={cfg.global_pool!r}: must be 'avg' or 'token'")
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"patch_size={cfg.patch_size} does not divide img_size={cfg.img_size}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"num_heads={cfg.num_heads} does not divide embed_dim={cfg.embed_dim}")
    if cfg.layer_scale_init < 0:
        raise ValueError(f"layer_scale_init={cfg.layer_scale_init} must be >= 0 (0: none)")


def grid_size(cfg) -> int:
    return cfg.img_size // cfg.patch_size


def num_relative_distance(grid: int) -> int:
    """Rows of a relative position bias table for a ``grid x grid`` patch grid."""
    return relpos.table_rows(grid, NUM_EXTRA)


def grid_of_table(rows: int) -> int:
    """Patch grid side of a ``((2G-1)^2 + 3, heads)`` table."""
    return relpos.table_size(rows, NUM_EXTRA)


# Re-exported for mim.checkpoints.beit, which reads the index under this name.
relative_position_index = relpos.class_token_index


def rel_pos_bias(table: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, heads, N, N)`` attention-logit bias from a table (BEiT Sec. 2.6)."""
    return relpos.lookup(table, relpos.class_token_index(grid, table.device))


# --------------------------------------------------------------------------- init


def init(gen: torch.Generator, cfg) -> dict:
    """Parameters as the reference initialises them: trunc-normal(0.02) for the class
    token, position embedding, every linear and the patch embedding convolution, zero
    biases, relative position tables and q/v biases, ``gamma = layer_scale_init``, then
    ``attn.proj`` and ``mlp.fc2`` weights of block ``i`` divided by ``sqrt(2 (i + 1))``
    (``fix_init_weight``), and a head scaled by ``init_scale``."""
    validate(cfg)
    D, G = cfg.embed_dim, grid_size(cfg)
    hidden = int(D * cfg.mlp_ratio)
    std = 0.02
    # BEiT's and SimMIM's pretraining models truncate at one standard deviation, the
    # fine-tuning models at timm's absolute [-2, 2] (effectively untruncated).
    lo, hi = (-std, std) if cfg.init_trunc_at_std else (-2.0, 2.0)

    def tn(shape):
        return I.trunc_normal(shape, std, gen, a=lo, b=hi)

    def dense(i, o, bias=True):
        p = {"weight": tn((o, i))}
        if bias:
            p["bias"] = I.zeros((o,))
        return p

    table_rows = num_relative_distance(G)
    p = {"cls_token": tn((1, 1, D))}
    if cfg.use_abs_pos_emb:
        p["pos_embed"] = tn((1, G * G + 1, D))
    p["patch_embed"] = {"proj": {"weight": tn((D, cfg.in_chans, cfg.patch_size, cfg.patch_size)),
                                 "bias": I.zeros((D,))}}
    if cfg.use_shared_rel_pos_bias:
        p["rel_pos_bias"] = {"relative_position_bias_table": I.zeros((table_rows, cfg.num_heads))}
    blocks = {}
    for i in range(cfg.depth):
        b = {}
        if cfg.layer_scale_init > 0:
            # A module's own parameters precede its children's in the official state_dict.
            b["gamma_1"] = torch.full((D,), float(cfg.layer_scale_init))
            b["gamma_2"] = torch.full((D,), float(cfg.layer_scale_init))
        b["norm1"] = I.norm(D)
        attn = {}
        if cfg.qkv_bias:
            attn["q_bias"] = I.zeros((D,))
            attn["v_bias"] = I.zeros((D,))
        if cfg.use_rel_pos_bias:
            attn["relative_position_bias_table"] = I.zeros((table_rows, cfg.num_heads))
        attn["qkv"] = dense(D, 3 * D, bias=False)
        attn["proj"] = dense(D, D)
        b["attn"] = attn
        b["norm2"] = I.norm(D)
        b["mlp"] = {"fc1": dense(D, hidden), "fc2": dense(hidden, D)}
        # fix_init_weight: keep the residual stream's variance from growing with depth.
        scale = math.sqrt(2.0 * (i + 1))
        attn["proj"]["weight"].div_(scale)
        b["mlp"]["fc2"]["weight"].div_(scale)
        blocks[str(i)] = b
    p["blocks"] = blocks
    if cfg.global_pool == "avg":
        p["fc_norm"] = I.norm(D)
    else:
        p["norm"] = I.norm(D)
    if cfg.num_classes > 0:
        head = dense(D, cfg.num_classes)
        head["weight"].mul_(cfg.init_scale)
        p["head"] = head
    return p


# --------------------------------------------------------------------------- forward


def block(p, x, heads: int, drop_path_rate: float, train: bool,
          attn_bias: Optional[torch.Tensor], eps: float):
    """Pre-norm block with layer scale: ``x + gamma_1 * attn(norm1(x))``, then the MLP."""
    y = nn.attention(p["attn"], nn.layer_norm(p["norm1"], x, eps), heads, attn_bias)
    if "gamma_1" in p:
        y = y * p["gamma_1"].to(y.dtype)
    x = x + nn.drop_path(y, drop_path_rate, train)
    y = nn.mlp(p["mlp"], nn.layer_norm(p["norm2"], x, eps))
    if "gamma_2" in p:
        y = y * p["gamma_2"].to(y.dtype)
    return x + nn.drop_path(y, drop_path_rate, train)


def embed(p, x, cfg, mask: Optional[torch.Tensor] = None):
    """Patch embedding, mask-token substitution (BEiT / SimMIM pretraining: masked patch
    embeddings become ``mask_token``, before the class token and any position embedding),
    class token, absolute position embedding."""
    G = grid_size(cfg)
    if x.shape[-2] != cfg.img_size or x.shape[-1] != cfg.img_size:
        raise ValueError(f"input {x.shape[-2]}x{x.shape[-1]} differs from img_size={cfg.img_size} "
                         f"(the position tables are for a {G}x{G} patch grid)")
    t = nn.patch_embed(p["patch_embed"], x, cfg.patch_size)
    if mask is not None:
        if "mask_token" not in p:
            raise ValueError("a mask needs a 'mask_token' parameter")
        w = mask.reshape(t.shape[0], -1, 1).to(t.dtype)
        if w.shape[1] != t.shape[1]:
            raise ValueError(f"mask with {w.shape[1]} entries per image for {t.shape[1]} patches")
        t = t * (1.0 - w) + p["mask_token"].to(t.dtype) * w
    t = torch.cat([p["cls_token"].expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
    if "pos_embed" in p:
        t = t + p["pos_embed"].to(t.dtype)
    return t


def apply(p, x, cfg, train: bool = False, mask: Optional[torch.Tensor] = None,
          return_blocks: bool = False):
    """Logits and ``aux`` = {pre_logits, tokens (after the final norm, class token first),
    [blocks]}. ``mask`` (B, G, G) or (B, G*G) of 0/1 replaces patch embeddings by
    ``p["mask_token"]``. Without a head the logits are the pre-logits."""
    G = grid_size(cfg)
    x = embed(p, x, cfg, mask)
    shared = None
    if "rel_pos_bias" in p:
        shared = rel_pos_bias(p["rel_pos_bias"]["relative_position_bias_table"], G)
    feats = []
    for i, rate in enumerate(vit.drop_path_rates(cfg)):
        b = p["blocks"][str(i)]
        bias = shared
        table = b["attn"].get("relative_position_bias_table")
        if table is not None:
            own = rel_pos_bias(table, G)
            bias = own if bias is None else bias + own
        x = block(b, x, cfg.num_heads, rate, train, bias, cfg.norm_eps)
        if return_blocks:
            feats.append(x)
    if "norm" in p:
        x = nn.layer_norm(p["norm"], x, cfg.norm_eps)
    if cfg.global_pool == "avg":
        pre_logits = nn.layer_norm(p["fc_norm"], x[:, 1:].mean(1), cfg.norm_eps)
    else:
        pre_logits = x[:, 0]
    aux = {"pre_logits": pre_logits, "tokens": x}
    if return_blocks:
        aux["blocks"] = feats
    logits = nn.linear(p["head"], pre_logits) if "head" in p else pre_logits
    return logits, aux


# --------------------------------------------------------------------------- parameter facts


def no_weight_decay(cfg) -> tuple:
    """Names exempt from weight decay beyond 1-D tensors: the reference's
    ``no_weight_decay()`` = {pos_embed, cls_token} (BEiT ``modeling_finetune.py``, SimMIM
    ``vision_transformer.py``). The relative position bias tables are decayed: BEiT exempts
    them only behind a flag, and SimMIM's ``VisionTransformerForSimMIM`` does not add its
    mask token either."""
    del cfg
    return (r"^pos_embed$", r"^cls_token$")


def num_layers(cfg) -> int:
    return cfg.depth


def layer_id(name: str, cfg) -> int:
    """Layer index for layer-wise lr decay, as BEiT's ``get_layer_id_for_vit`` and SimMIM's
    ``get_vit_layer``: embeddings and tokens are layer 0, block i is layer i + 1, and the
    shared relative position bias sits with the head at depth + 1."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("rel_pos_bias"):
        return cfg.depth + 1
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return cfg.depth + 1


def features(params, x, cfg, blocks: bool = False, train: bool = False) -> dict:
    """Encoder features without the head (``train``: with drop path, as a frozen backbone
    left in training mode computes them): ``pooled`` (B, C), the pre-logits as
    :func:`apply` computes them (mean of patch tokens + ``fc_norm``, or the normed class
    token), and with ``blocks`` every block's output tokens ``(B, 1 + G^2, C)``."""
    body = {k: v for k, v in params.items() if k != "head"}
    _, aux = apply(body, x, cfg, train=train, return_blocks=blocks)
    out = {"pooled": aux["pre_logits"]}
    if blocks:
        out["blocks"] = aux["blocks"]
    return out


# --------------------------------------------------------------------------- resizing


def resize_rel_pos_bias(table: torch.Tensor, dst_grid: int) -> torch.Tensor:
    """A ``((2G-1)^2 + 3, heads)`` table for another patch grid, as BEiT's and SimMIM's
    ``load_pretrained`` (``remap_pretrained_keys_vit``): :func:`mim.nn.relpos.resize` with
    the 3 class-token rows kept."""
    return relpos.resize(table, dst_grid, NUM_EXTRA)


def official_buffers(cfg) -> dict:
    """The ``relative_position_index`` buffers the official module registers (persistent),
    by the name of the table they follow."""
    idx = relpos.class_token_index(grid_size(cfg))
    out = {}
    if cfg.use_shared_rel_pos_bias:
        out["rel_pos_bias.relative_position_bias_table"] = (
            "rel_pos_bias.relative_position_index", idx)
    if cfg.use_rel_pos_bias:
        for i in range(cfg.depth):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = (
                f"blocks.{i}.attn.relative_position_index", idx)
    return out
