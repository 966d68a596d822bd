"""SimMIM (Xie et al., 2022): masked image modeling with a mask token, a one-layer
prediction head and an L1 loss on the masked pixels.

The tree has the keys of microsoft/SimMIM's ``SimMIM`` module: ``encoder.*`` (the encoder
with its ``mask_token``) and ``decoder.0.weight/bias`` (the 1x1 convolution before the
pixel shuffle). The Swin encoder is ``mim.models.swin`` and the ViT encoder
``mim.models.beit`` (the reference's BEiT-style ViT), both in the official layouts, so
``flatten(init(cfg))`` gives the keys of microsoft/SimMIM's ``SimMIM.state_dict()`` less
the non-learned ``relative_position_index`` / ``attn_mask`` buffers.
"""
from __future__ import annotations

from typing import Optional

import ml_collections
import torch
import torch.nn.functional as F

from mim.models import beit, swin
from mim.nn import init as I

# backbone argument of config() -> encoder model name
BACKBONES = {"swin": "swin", "vit": "beit"}
ENCODERS = tuple(BACKBONES.values())


def config(backbone: str = "swin", **overrides) -> ml_collections.ConfigDict:
    """SimMIM pre-training model: Swin-B at 192 px with window 6, or ViT-B/16 at 224 px
    (the paper's Sec. 4.1 settings); 32-px mask patches at ratio 0.6. Nested overrides
    (``encoder={"depths": (2, 2)}``) update the encoder config.

    The ViT is the reference's (config.py's VIT defaults, vit_base__800ep pretraining yaml):
    BEiT-style, no absolute position embedding, one relative position bias shared by all
    blocks, q/v biases, layer scale 0.1, the final norm on the class-token path, inits
    truncated at one standard deviation (``VisionTransformerForSimMIM._trunc_normal_``)."""
    if backbone == "swin":
        dim, depths, heads = swin.SIZES["base"]
        enc = swin.config(img_size=192, embed_dim=dim, depths=depths, num_heads=heads,
                          window_size=6, num_classes=0, drop_path_rate=0.0)
    elif backbone == "vit":
        enc = beit.config(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                          num_classes=0, drop_path_rate=0.1, qkv_bias=True, use_abs_pos_emb=False,
                          use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                          layer_scale_init=0.1, global_pool="token", init_trunc_at_std=True)
    else:
        raise ValueError(f"unknown SimMIM encoder {backbone!r}; expected one of {tuple(BACKBONES)}")
    c = ml_collections.ConfigDict(dict(
        name="simmim",
        encoder=enc,
        mask_patch_size=32,
        mask_ratio=0.6,
    ))
    enc_overrides = overrides.pop("encoder", {})
    c.update(overrides)
    c.encoder.update({k: tuple(v) if isinstance(v, list) else v for k, v in enc_overrides.items()})
    validate(c)
    return c


def validate(cfg) -> None:
    if cfg.encoder.name not in ENCODERS:
        raise ValueError(f"encoder.name={cfg.encoder.name!r} is not one of {ENCODERS}")
    if cfg.encoder.num_classes != 0:
        raise ValueError("encoder.num_classes must be 0: the SimMIM encoder has no head")
    if cfg.encoder.name == "beit":
        beit.validate(cfg.encoder)
        if cfg.encoder.global_pool != "token":
            raise ValueError("the SimMIM ViT encoder uses the final norm: encoder.global_pool='token'")


def patch_size(cfg) -> int:
    return cfg.encoder.patch_size


def encoder_stride(cfg) -> int:
    """Input pixels per output feature (32 for Swin, 16 for ViT-B/16 in the reference)."""
    return swin.stride(cfg.encoder) if cfg.encoder.name == "swin" else cfg.encoder.patch_size


def num_features(cfg) -> int:
    return swin.num_features(cfg.encoder) if cfg.encoder.name == "swin" else cfg.encoder.embed_dim


def init(gen: torch.Generator, cfg) -> dict:
    """Encoder as its own ``init`` plus a mask token; decoder conv with PyTorch's default
    init (the reference does not re-initialise it)."""
    validate(cfg)
    enc_cfg = cfg.encoder
    if enc_cfg.name == "swin":
        encoder = swin.init(gen, enc_cfg)
        # SwinTransformerForSimMIM: trunc_normal_(std=.02) with timm's absolute [-2, 2] bounds.
        encoder["mask_token"] = I.trunc_normal((1, 1, enc_cfg.embed_dim), 0.02, gen)
    else:
        body = beit.init(gen, enc_cfg)
        # VisionTransformerForSimMIM truncates at one standard deviation; its mask token is
        # its own parameter, so it follows cls_token (and pos_embed) in the state_dict.
        token = I.trunc_normal((1, 1, enc_cfg.embed_dim), 0.02, gen, a=-0.02, b=0.02)
        encoder = {}
        for k, v in body.items():
            if k == "patch_embed":
                encoder["mask_token"] = token
            encoder[k] = v
    C, s = num_features(cfg), encoder_stride(cfg)
    out = s * s * enc_cfg.in_chans
    bound = 1.0 / C ** 0.5
    decoder = {"0": {
        "weight": I.lecun_uniform_conv((out, C, 1, 1), gen),
        "bias": torch.empty(out).uniform_(-bound, bound, generator=gen),
    }}
    return {"encoder": encoder, "decoder": decoder}


def _vit_encode(p, x, mask, cfg, train):
    """``VisionTransformerForSimMIM.forward``: mask tokens replace patch embeddings before
    the class token; the feature map is the normed patch tokens (class token dropped)."""
    _, aux = beit.apply(p, x, cfg, train, mask=mask)
    tokens = aux["tokens"][:, 1:]
    H, W = x.shape[-2] // cfg.patch_size, x.shape[-1] // cfg.patch_size
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, H, W)


def encode(p, x, mask, cfg, train: bool = False) -> torch.Tensor:
    """``(B, C, H/stride, W/stride)`` features of the masked image."""
    if cfg.encoder.name == "swin":
        return swin.apply(p, x, cfg.encoder, train, mask=mask)[1]["feature_map"]
    return _vit_encode(p, x, mask, cfg.encoder, train)


def decode(p, z, cfg) -> torch.Tensor:
    """Prediction head (Sec. 3.3): a linear layer (1x1 conv) to ``stride^2 * C`` values per
    feature, rearranged to pixels by pixel shuffle."""
    z = F.conv2d(z, p["0"]["weight"].to(z.dtype), p["0"]["bias"].to(z.dtype))
    return F.pixel_shuffle(z, encoder_stride(cfg))


def pixel_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, 1, H, W)`` pixel mask from the patch-grid mask."""
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


def reconstruction_loss(x, x_rec, mask, patch: int) -> torch.Tensor:
    """L1 on masked pixels (Sec. 3.4), normalised as the reference: sum over masked pixels
    and channels / (number of masked pixel positions + 1e-5) / channels.

    Reduced in fp32 whatever the precision policy: a micro-batch of a few 192-px images
    masks more pixels than fp16's largest value (65,504), so an fp16 count is ``inf``
    and the loss silently 0; the reference's ``F.l1_loss`` under autocast is fp32 too."""
    m = pixel_mask(mask, patch).float()
    l1 = (x.float() - x_rec.float()).abs()
    return (l1 * m).sum() / (m.sum() + 1e-5) / x.shape[1]


def apply(p, x, cfg, train: bool = False, mask: Optional[torch.Tensor] = None):
    """Loss and ``aux`` = {reconstruction (B, C, H, W), features (B, C', h, w)}.
    ``mask`` (B, H/patch, W/patch) of 0/1 is required (1 = masked)."""
    if mask is None:
        raise ValueError("SimMIM needs a mask (B, H/patch, W/patch); see mim.data.masks.simmim_masks")
    grid = (x.shape[0], x.shape[-2] // patch_size(cfg), x.shape[-1] // patch_size(cfg))
    if tuple(mask.shape) != grid:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the patch grid {grid}")
    z = encode(p["encoder"], x, mask, cfg, train)
    x_rec = decode(p["decoder"], z, cfg)
    loss = reconstruction_loss(x, x_rec, mask, patch_size(cfg))
    return loss, {"reconstruction": x_rec, "features": z}


# --------------------------------------------------------------------------- parameter facts


def _encoder_module(cfg):
    return swin if cfg.encoder.name == "swin" else beit


def _under_encoder(pattern: str) -> str:
    # SimMIM.no_weight_decay() / no_weight_decay_keywords() prefix the encoder's names AND
    # keywords with "encoder." (models/simmim.py), and build_pretrain_optimizer tests a
    # keyword by substring: "encoder.relative_position_bias_table" is in no parameter name,
    # so the reference decays the Swin tables while pretraining. Kept exactly.
    return r"^encoder\." + pattern[1:] if pattern.startswith("^") else r"encoder\." + pattern


def no_weight_decay(cfg) -> tuple:
    """The encoder's exemptions under ``encoder.``, as the reference's
    ``build_pretrain_optimizer`` reads ``SimMIM.no_weight_decay()`` and
    ``no_weight_decay_keywords()``. Swin: absolute position embedding and mask token (its
    ``relative_position_bias_table`` keyword becomes ``encoder.relative_position_bias_table``,
    which matches nothing: the tables are decayed, as in the reference); ViT: ``pos_embed``
    and ``cls_token`` only (``VisionTransformerForSimMIM`` does not add its mask token, so
    it is decayed)."""
    return tuple(_under_encoder(p) for p in _encoder_module(cfg).no_weight_decay(cfg.encoder))


def num_layers(cfg) -> int:
    return _encoder_module(cfg).num_layers(cfg.encoder)


def layer_id(name: str, cfg) -> int:
    """The encoder's layer ids for ``encoder.*``; the decoder sits at the top."""
    if name.startswith("encoder."):
        return _encoder_module(cfg).layer_id(name[len("encoder."):], cfg.encoder)
    return num_layers(cfg) + 1


def features(params, x, cfg, blocks: bool = False) -> dict:
    """The encoder's :func:`features` on the unmasked image (no decoder)."""
    return _encoder_module(cfg).features(params["encoder"], x, cfg.encoder, blocks)
