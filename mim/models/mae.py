"""Masked Autoencoder (He et al., "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022) as pure functions.

``flatten(init(...))`` has exactly the keys, in the same order, of the reference
``models_mae.MaskedAutoencoderViT.state_dict()``, so an official pretraining checkpoint
is a tree after ``unflatten``.

The random mask is not drawn here: the input pipeline draws ``noise`` (see :func:`noise`)
and the model turns it into a mask by sorting it (Sec. 3, "random sampling"), so a
training step is a deterministic function of its batch.
"""
from __future__ import annotations

import math

import ml_collections
import torch

from mim import nn
from mim.nn import init as I

# Position embeddings are fixed sin-cos tables (Sec. 3 and A.1; the reference stores them
# as parameters with requires_grad=False). The optimizer masks these names out.
FROZEN = ("pos_embed", "decoder_pos_embed")

# Paper Sec. 4 / A.1: ViT-B/16, ViT-L/16, ViT-H/14 encoders, all with the default
# 8-block, 512-d decoder.
SIZES = {
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def config(**overrides) -> ml_collections.ConfigDict:
    """Model fields; defaults are MAE ViT-B/16 with the paper's default decoder.

    ``norm_pix_loss`` defaults to False like the reference class; the paper's recipe
    (Sec. 3, Table 1d) turns it on in the experiment config."""
    c = ml_collections.ConfigDict(dict(
        name="mae",
        img_size=224,
        in_chans=3,
        **SIZES["base"],
        mlp_ratio=4.0,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        norm_pix_loss=False,
        mask_ratio=0.75,
        norm_eps=1e-6,
    ))
    c.update(overrides)
    if c.img_size % c.patch_size:
        raise ValueError(f"img_size={c.img_size} is not a multiple of patch_size={c.patch_size}")
    if not 0.0 <= c.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={c.mask_ratio} must lie in [0, 1)")
    return c


def grid_size(cfg) -> int:
    return cfg.img_size // cfg.patch_size


def num_patches(cfg) -> int:
    return grid_size(cfg) ** 2


def len_keep(cfg) -> int:
    # Same float expression as the reference's random_masking, so rounding agrees.
    return int(num_patches(cfg) * (1 - cfg.mask_ratio))


# ----------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (reference: util/pos_embed.get_2d_sincos_pos_embed).


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos code (Vaswani et al. 2017) of positions ``pos``: ``(M, dim)``,
    first half sines, second half cosines, frequencies ``10000^(-2i/dim)``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    # float32 throughout, as the reference's numpy code, so the tables agree to rounding.
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / (10000.0 ** omega)
    out = pos.reshape(-1, 1).float() * omega
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """``(grid*grid [+1], embed_dim)`` table: half the channels code the column, half the
    row, for tokens in row-major order; an all-zero row first for the class token.

    The reference builds ``meshgrid(w, h)`` and encodes its first plane (the column
    index) in the first half of the channels; this keeps that order."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    idx = torch.arange(grid, dtype=torch.float32)
    rows = idx.repeat_interleave(grid)
    cols = idx.repeat(grid)
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim), emb], dim=0)
    return emb


# ----------------------------------------------------------------------------------------
# Parameters.


def _xavier_linear(in_dim: int, out_dim: int, gen: torch.Generator) -> dict:
    # The reference re-initialises every nn.Linear with xavier_uniform and zero bias,
    # "following official JAX ViT" (models_mae._init_weights).
    return I.linear(in_dim, out_dim, gen, kind="xavier_uniform")


def _block(dim: int, mlp_ratio: float, gen: torch.Generator) -> dict:
    """A timm-layout pre-norm block, initialised as the reference does."""
    hidden = int(dim * mlp_ratio)
    return {
        "norm1": I.norm(dim),
        "attn": {"qkv": _xavier_linear(dim, 3 * dim, gen), "proj": _xavier_linear(dim, dim, gen)},
        "norm2": I.norm(dim),
        "mlp": {"fc1": _xavier_linear(dim, hidden, gen), "fc2": _xavier_linear(hidden, dim, gen)},
    }


def init(gen: torch.Generator, cfg) -> dict:
    """Parameters in ``MaskedAutoencoderViT.state_dict()`` order: the module's own
    parameters first (cls_token, pos_embed, mask_token, decoder_pos_embed), then its
    sub-modules in definition order."""
    D, Dd, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size
    g = grid_size(cfg)
    params = {
        # timm's trunc_normal_(std=.02) is effectively normal(.02): the cut-off is at +-2.
        "cls_token": I.normal((1, 1, D), 0.02, gen),
        "pos_embed": sincos_2d(D, g, cls_token=True).unsqueeze(0),
        "mask_token": I.normal((1, 1, Dd), 0.02, gen),
        "decoder_pos_embed": sincos_2d(Dd, g, cls_token=True).unsqueeze(0),
        # Xavier over the flattened (D, C*p*p) view: the patch embedding is a linear map.
        "patch_embed": {"proj": {
            "weight": I.xavier_uniform((D, cfg.in_chans, p, p), gen),
            "bias": I.zeros((D,)),
        }},
        "blocks": {str(i): _block(D, cfg.mlp_ratio, gen) for i in range(cfg.depth)},
        "norm": I.norm(D),
        "decoder_embed": _xavier_linear(D, Dd, gen),
        "decoder_blocks": {str(i): _block(Dd, cfg.mlp_ratio, gen) for i in range(cfg.decoder_depth)},
        "decoder_norm": I.norm(Dd),
        "decoder_pred": _xavier_linear(Dd, p * p * cfg.in_chans, gen),
    }
    return params


def noise(gen: torch.Generator, batch: int, cfg) -> torch.Tensor:
    """Uniform ``(batch, L)`` noise whose argsort is the per-sample patch shuffle
    (Sec. 3: "random sampling ... without replacement"). Drawn by the input pipeline."""
    return torch.rand((batch, num_patches(cfg)), generator=gen, device=gen.device)


# ----------------------------------------------------------------------------------------
# Patches.


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)``; each patch flattened in (row p, column q,
    channel c) order, the reference's layout of the decoder's output."""
    B, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid=None) -> torch.Tensor:
    """Inverse of :func:`patchify`; a square grid unless ``grid=(h, w)`` is given."""
    B, L, K = x.shape
    if K % (p * p):
        raise ValueError(f"patch vectors of size {K} do not hold {p}x{p} patches")
    C = K // (p * p)
    if grid is None:
        h = w = math.isqrt(L)
        if h * w != L:
            raise ValueError(f"{L} patches do not form a square grid; pass grid=(h, w)")
    else:
        h, w = grid
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * p, w * p)


# ----------------------------------------------------------------------------------------
# Forward.


def random_masking(x: torch.Tensor, noise: torch.Tensor, keep: int):
    """Keep the ``keep`` tokens with the smallest noise (reference: random_masking).

    Returns the kept tokens ``(B, keep, D)`` in shuffled order, the binary mask
    ``(B, L)`` (0 keep, 1 remove) in the original order, and ``ids_restore`` that undoes
    the shuffle. Only sorts and gathers: no host synchronisation."""
    B, L, D = x.shape
    if noise.shape != (B, L):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(B, L)}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    # A token is removed iff its rank in the shuffle is past the kept prefix.
    mask = (ids_restore >= keep).to(x.dtype)
    return x_kept, mask, ids_restore


def forward_encoder(params, imgs: torch.Tensor, noise: torch.Tensor, cfg):
    """Encoder on the visible patches only (Sec. 3, "MAE encoder").

    Returns ``latent (B, 1 + keep, D)`` (class token first), ``mask``, ``ids_restore``."""
    x = nn.patch_embed(params["patch_embed"], imgs, cfg.patch_size)
    pos = params["pos_embed"].to(x.dtype)
    x = x + pos[:, 1:]
    x, mask, ids_restore = random_masking(x, noise, len_keep(cfg))
    cls = (params["cls_token"].to(x.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(cfg.depth):
        x = nn.vit_block(params["blocks"][str(i)], x, cfg.num_heads, eps=cfg.norm_eps)
    return nn.layer_norm(params["norm"], x, cfg.norm_eps), mask, ids_restore


def forward_decoder(params, latent: torch.Tensor, ids_restore: torch.Tensor, cfg):
    """Decoder over the full set of tokens: encoded visible patches plus a shared
    mask token at every removed position, with its own position embedding (Sec. 3,
    "MAE decoder"). Returns per-patch pixel predictions ``(B, L, p*p*C)``."""
    x = nn.linear(params["decoder_embed"], latent)
    B, _, Dd = x.shape
    L = ids_restore.shape[1]
    mask_tokens = params["mask_token"].to(x.dtype).expand(B, L + 1 - x.shape[1], -1)
    patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
    patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
    x = torch.cat([x[:, :1], patches], dim=1) + params["decoder_pos_embed"].to(x.dtype)
    for i in range(cfg.decoder_depth):
        x = nn.vit_block(params["decoder_blocks"][str(i)], x, cfg.decoder_num_heads, eps=cfg.norm_eps)
    x = nn.layer_norm(params["decoder_norm"], x, cfg.norm_eps)
    return nn.linear(params["decoder_pred"], x)[:, 1:]


def target(imgs: torch.Tensor, patch: int, norm_pix_loss: bool) -> torch.Tensor:
    """Reconstruction target: pixels per patch, optionally normalised by the patch's own
    mean and (unbiased) variance (Sec. 3, "Reconstruction target"; eps 1e-6 as the
    reference's forward_loss)."""
    t = patchify(imgs, patch)
    if norm_pix_loss:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + 1e-6) ** 0.5
    return t


def loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool):
    """Mean squared error per patch, averaged over the removed patches only (Sec. 3).

    Computed in fp32 whatever the dtypes of ``pred``, ``imgs`` and ``mask`` (they follow
    the precision policy): a micro-batch of 448 ViT-B/16 images at 75% masking has 65,856
    masked patches, more than fp16's largest value (65,504), and an fp16 count of ``inf``
    makes the loss silently 0. The reference's mask and target are fp32 under autocast."""
    C = imgs.shape[1]
    patch = math.isqrt(pred.shape[-1] // C)
    if patch * patch * C != pred.shape[-1]:
        raise ValueError(f"prediction size {pred.shape[-1]} is not p*p*{C} for any patch size p")
    per_patch = ((pred.float() - target(imgs.float(), patch, norm_pix_loss)) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


def apply(params, imgs: torch.Tensor, noise: torch.Tensor, cfg, train: bool = False):
    """``(loss, aux)`` with aux = {pred, mask, latent, ids_restore}.

    ``train`` is accepted for the common signature; pretraining uses no dropout or
    stochastic depth (Sec. A.1), so it changes nothing."""
    del train
    latent, mask, ids_restore = forward_encoder(params, imgs, noise, cfg)
    pred = forward_decoder(params, latent, ids_restore, cfg)
    value = loss(imgs, pred, mask, cfg.norm_pix_loss)
    return value, {"pred": pred, "mask": mask, "latent": latent, "ids_restore": ids_restore}


# ----------------------------------------------------------------------------------------
# Parameter facts and encoder features.


def no_weight_decay(cfg) -> tuple:
    """None beyond 1-D tensors: main_pretrain.py uses timm's ``add_weight_decay`` with no
    skip list, so ``cls_token`` and ``mask_token`` are decayed (the fixed position tables
    are :data:`FROZEN`, not trained at all)."""
    del cfg
    return ()


def num_layers(cfg) -> int:
    return cfg.depth


def layer_id(name: str, cfg) -> int:
    """Layer index as MAE's ``util/lr_decay.get_layer_id_for_vit``: class token, position
    table and patch embedding are 0, encoder block i is i + 1, everything else (final norm,
    mask token, decoder) depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return cfg.depth + 1


def features(params, imgs: torch.Tensor, cfg, blocks: bool = False) -> dict:
    """Encoder features of the whole (unmasked) image, without the decoder: ``pooled``
    (B, D) is the class token after the final norm, what main_linprobe.py probes by
    default (``global_pool=False``); with ``blocks`` every block's output tokens
    ``(B, 1 + L, D)``."""
    x = nn.patch_embed(params["patch_embed"], imgs, cfg.patch_size)
    pos = params["pos_embed"].to(x.dtype)
    if pos.shape[1] != x.shape[1] + 1:
        raise ValueError(f"pos_embed has {pos.shape[1] - 1} patch positions, the input "
                         f"{x.shape[1]} patches")
    cls = (params["cls_token"].to(x.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x + pos[:, 1:]], dim=1)
    feats = []
    for i in range(cfg.depth):
        x = nn.vit_block(params["blocks"][str(i)], x, cfg.num_heads, eps=cfg.norm_eps)
        feats.append(x)
    out = {"pooled": nn.layer_norm(params["norm"], x[:, 0], cfg.norm_eps)}
    if blocks:
        out["blocks"] = feats
    return out
