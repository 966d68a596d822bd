"""BEiT's masked-image-modeling model (Bao et al., 2022, Sec. 2.3) as pure functions, in the
layout of microsoft/unilm ``beit/modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling``.

The backbone is :mod:`mim.models.beit`'s ViT: masked patch embeddings replaced by
``mask_token`` (before the class token is prepended), one relative position bias shared by
all blocks (``rel_pos_bias``), no absolute position embedding, layer scale, stochastic
depth, the final ``norm``; then ``lm_head``, a linear layer to the tokenizer's vocabulary,
on the masked positions only.

``flatten(init(...))`` has the keys of the official module's ``state_dict()`` in the same
order, without the ``rel_pos_bias.relative_position_index`` buffer (a function of the patch
grid; :mod:`mim.checkpoints.beit` adds it on export)::

    cls_token, mask_token, [pos_embed], patch_embed.proj.{weight,bias},
    rel_pos_bias.relative_position_bias_table, blocks.i.{gamma_1, gamma_2, norm1,
    attn.{q_bias, v_bias, qkv.weight, proj}, norm2, mlp.{fc1, fc2}}, norm, lm_head

Defaults are ``run_beit_pretraining.py``'s, which are its README recipe's (shared relative
position bias, no absolute position embedding, layer scale 0.1, drop path 0.1); the
module's own constructor defaults differ (absolute position embedding, no layer scale, no
drop path) and are never used by the script.
"""
from __future__ import annotations

from typing import Optional

import ml_collections
import torch

from mim import nn
from mim.models import beit
from mim.models.derived import Derived
from mim.nn import init as I

INIT_STD = 0.02     # the module's init_std (never changed by the scripts)


def config(**overrides) -> ml_collections.ConfigDict:
    """``beit_base_patch16_224_8k_vocab`` as ``run_beit_pretraining.py`` builds it."""
    c = ml_collections.ConfigDict(dict(
        name="beit_pretrain",
        img_size=224,
        patch_size=16,
        in_chans=3,
        vocab_size=8192,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        use_abs_pos_emb=False,          # --abs_pos_emb (default off)
        use_shared_rel_pos_bias=True,   # --rel_pos_bias (default on): one table for all blocks
        use_rel_pos_bias=False,         # per-block tables: never in the pretraining script
        layer_scale_init=0.1,           # --layer_scale_init_value: 0.1 base, 1e-5 large, 0 none
        drop_path_rate=0.1,             # --drop_path
        norm_eps=1e-6,
    ))
    c.update(overrides)
    validate(c)
    return c


SIZES = {
    # name: (embed_dim, depth, num_heads): beit_{base,large}_patch16_224_8k_vocab
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def validate(cfg) -> None:
    if cfg.vocab_size < 1:
        raise ValueError(f"vocab_size={cfg.vocab_size}: must be positive")
    backbone(cfg)


def backbone(cfg) -> ml_collections.ConfigDict:
    """The :mod:`mim.models.beit` config of the encoder: class-token path with the final
    ``norm``, no classifier, inits truncated at one standard deviation (the pretraining
    module's ``trunc_normal_(a=-std, b=std)``)."""
    return beit.config(**{k: cfg[k] for k in _SHARED}, **_OWN)


# Which fields the encoder takes from the pretraining config, and what it sets itself.
_SHARED = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
           "qkv_bias", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias",
           "layer_scale_init", "drop_path_rate", "norm_eps")
_OWN = dict(num_classes=0, global_pool="token", init_trunc_at_std=True)
_BEIT_DEFAULTS = beit.config()


def backbone_view(cfg) -> Derived:
    """:func:`backbone` as a view that a compiled loss can build (mim.models.derived)."""
    return Derived({k: cfg[k] for k in _SHARED}, _OWN, _BEIT_DEFAULTS)


def grid_size(cfg) -> int:
    return cfg.img_size // cfg.patch_size


def init(gen: torch.Generator, cfg) -> dict:
    """The reference's initialisation: truncated normal (std 0.02, truncated at +-0.02) for
    ``cls_token``, ``mask_token``, ``pos_embed``, every linear and convolution weight
    (``lm_head`` included), zero biases, tables and q/v biases, unit norms, gammas at
    ``layer_scale_init``, then block i's ``attn.proj`` and ``mlp.fc2`` weights divided by
    ``sqrt(2 (i + 1))`` (``fix_init_weight``)."""
    validate(cfg)
    body = beit.init(gen, backbone(cfg))
    std = INIT_STD
    out = {"cls_token": body.pop("cls_token"),
           "mask_token": I.trunc_normal((1, 1, cfg.embed_dim), std, gen, a=-std, b=std)}
    out.update(body)
    out["lm_head"] = {"weight": I.trunc_normal((cfg.vocab_size, cfg.embed_dim), std, gen, a=-std, b=std),
                      "bias": I.zeros((cfg.vocab_size,))}
    return out


def _check_mask(mask: torch.Tensor, x: torch.Tensor, cfg) -> torch.Tensor:
    G = grid_size(cfg)
    m = mask.reshape(mask.shape[0], -1)
    if m.shape != (x.shape[0], G * G):
        raise ValueError(f"mask of shape {tuple(mask.shape)} for {x.shape[0]} images of a "
                         f"{G}x{G} patch grid")
    return m.bool()


def forward_features(params, x: torch.Tensor, mask: Optional[torch.Tensor], cfg,
                     train: bool = False, return_blocks: bool = False):
    """``(tokens, blocks)``: the final-normed tokens ``(B, 1 + N, C)`` (class token first)
    and, with ``return_blocks``, every block's output before the norm. ``mask`` None: no
    patch is replaced."""
    if mask is not None:
        _check_mask(mask, x, cfg)
    _, aux = beit.apply(params, x, backbone_view(cfg), train=train, mask=mask, return_blocks=return_blocks)
    return aux["tokens"], aux.get("blocks")


def masked_positions(mask: torch.Tensor, max_masked: int):
    """``(index, valid)``, both ``(B, max_masked)``: each image's masked patch positions in
    increasing order (the order of ``x[bool_masked_pos]``), padded with unmasked ones that
    ``valid`` marks False. A fixed ``max_masked`` keeps shapes static (compiled steps, CUDA
    graphs); the block mask generator never masks more than its ``num_masking_patches``."""
    m = mask.reshape(mask.shape[0], -1).bool()
    if not 0 < max_masked <= m.shape[1]:
        raise ValueError(f"max_masked={max_masked}: must be in [1, {m.shape[1]}]")
    # Stable sort of "not masked" puts the masked positions first, each group in order.
    index = torch.sort((~m).to(torch.uint8), dim=1, stable=True).indices[:, :max_masked]
    return index, m.gather(1, index)


def apply(params, x: torch.Tensor, mask: torch.Tensor, cfg, train: bool = False,
          max_masked: Optional[int] = None, return_all_tokens: bool = False):
    """``(logits, aux)``.

    * default: ``(M, vocab)`` logits of the ``M`` masked patches of the whole batch, in
      the order of ``x[bool_masked_pos]`` (the reference's ``forward``);
    * ``max_masked=K``: ``(B, K, vocab)`` logits of each image's first ``K`` masked patches,
      their positions ``aux["index"]`` and ``aux["valid"]`` ``(B, K)``, which marks the
      padding (static shapes, :func:`masked_positions`);
    * ``return_all_tokens``: ``(B, N, vocab)`` logits of every patch.

    ``aux["tokens"]``: the final-normed tokens, class token first."""
    tokens, _ = forward_features(params, x, mask, cfg, train=train)
    patches = tokens[:, 1:]
    aux = {"tokens": tokens}
    if return_all_tokens:
        return nn.linear(params["lm_head"], patches), aux
    if max_masked is None:
        return nn.linear(params["lm_head"], patches[_check_mask(mask, x, cfg)]), aux
    index, valid = masked_positions(mask, max_masked)
    picked = patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    aux.update(index=index, valid=valid)
    return nn.linear(params["lm_head"], picked), aux


# --------------------------------------------------------------------------- parameter facts


def no_weight_decay(cfg) -> tuple:
    """``VisionTransformerForMaskedImageModeling.no_weight_decay()`` = {pos_embed, cls_token}
    (besides 1-D tensors and biases): ``mask_token`` and the shared table are decayed."""
    del cfg
    return (r"^pos_embed$", r"^cls_token$")


def num_layers(cfg) -> int:
    return cfg.depth


def layer_id(name: str, cfg) -> int:
    """BEiT's ``get_num_layer_for_vit``: tokens and patch embedding 0, block i at i + 1,
    the shared table, the final norm and ``lm_head`` at depth + 1."""
    return beit.layer_id(name, cfg)


def features(params, x: torch.Tensor, cfg, blocks: bool = False) -> dict:
    """Encoder features of unmasked images: ``pooled`` (B, C), the final-normed class
    token (the pretraining model's own head reads only patch tokens, so this is the
    ``use_mean_pooling=False`` model of ``run_linear_eval.py``), and with ``blocks`` each
    block's output ``(B, 1 + N, C)`` before the norm (``get_intermediate_layers``)."""
    tokens, feats = forward_features(params, x, None, cfg, return_blocks=blocks)
    out = {"pooled": tokens[:, 0]}
    if blocks:
        out["blocks"] = feats
    return out
