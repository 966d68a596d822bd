"""Peers for :mod:`mim.bench`: each recipe's architecture as ordinary ``nn.Module``\\ s
built from timm, trained the usual PyTorch way (``loss.backward()``, ``torch.optim``).

A peer is what a reader would write without mim: the yardstick the functional step is
measured against in the same process, on the same batches. Every peer is an
``nn.Module`` whose ``forward(batch)`` returns the scalar training loss, so compiling it
compiles the loss too. Parameter names follow mim's (and the official) names wherever
timm's layout allows, so the peer's optimizer can use the same parameter groups.

- ViT classification: timm ``VisionTransformer`` with the same configuration.
- Swin classification: timm ``SwinTransformer`` (timm puts each patch merging at the
  start of the next stage, the official code at the end of the stage: same maths).
- MAE pretraining: :class:`MAE`, following facebookresearch/mae ``models_mae.py``
  (He et al. 2022) with timm ``Block`` / ``PatchEmbed``; the masking noise comes from
  the batch, as in mim, instead of ``torch.rand`` inside the model.
- BEiT-style ViT (SimMIM's ViT, its fine-tuning): timm ``Beit``.
- SimMIM pretraining: a timm Swin or ViT/Beit encoder with a mask token, a 1x1 convolution
  and a pixel shuffle (Xie et al. 2022, microsoft/SimMIM ``models/simmim.py``).
- Linear probe: the ViT peer, frozen, under ``no_grad``, with
  ``BatchNorm1d(affine=False)`` + ``Linear`` (MAE ``main_linprobe.py``); the Swin with its
  ``head`` (MoBY ``moby_linear.py``, :mod:`mim.peers_ssl`).
- BEiT pretraining (timm ``Beit``, mask token, ``lm_head``, the DALL-E encoder as a frozen
  ``nn.Module``) and MoBY (online and momentum timm Swins, projectors, predictor, queues as
  buffers): :mod:`mim.peers_ssl`.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer

from mim.tasks import classify


# ----------------------------------------------------------------------------------------
# MAE (models_mae.MaskedAutoencoderViT semantics).


def sincos_2d_numpy(dim: int, grid: int, cls_token: bool = False) -> np.ndarray:
    """``util/pos_embed.get_2d_sincos_pos_embed`` conventions, in numpy: float32 maths,
    ``meshgrid(w, h)``, the first half of the channels from the first meshgrid plane."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32) / np.float32(d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid, dtype=np.float32)
    planes = np.stack(np.meshgrid(coords, coords), axis=0)
    emb = np.concatenate([one_d(dim // 2, planes[0]), one_d(dim // 2, planes[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb


class MAE(tnn.Module):
    """``MaskedAutoencoderViT``: encoder on the visible patches, mask tokens and a light
    decoder over all patches, (normalised) pixel MSE on the removed patches. ``forward``
    takes the per-sample noise whose argsort is the mask; returns
    ``(loss, pred, mask, latent)``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                 decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                 norm_pix_loss=False, mask_ratio=0.75, norm_eps=1e-6):
        super().__init__()
        norm = partial(tnn.LayerNorm, eps=norm_eps)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = tnn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.decoder_embed = tnn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = tnn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = tnn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = tnn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.p, self.norm_pix_loss, self.mask_ratio = patch_size, norm_pix_loss, mask_ratio
        g = img_size // patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d_numpy(embed_dim, g, True)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_2d_numpy(decoder_embed_dim, g, True)).float()[None])

    @classmethod
    def from_config(cls, cfg) -> "MAE":
        keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
                "norm_pix_loss", "mask_ratio", "norm_eps")
        return cls(**{k: cfg[k] for k in keys})

    def patchify(self, imgs):
        p = self.p
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], imgs.shape[1], h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * imgs.shape[1])

    def random_masking(self, x, noise):
        N, L, D = x.shape
        keep = int(L * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_masked = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :keep] = 0
        return x_masked, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, x, noise):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs, noise):
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask, latent


class MAEPretrain(MAE):
    """:class:`MAE` with the peers' ``forward(batch) -> loss``."""

    def forward(self, batch):
        return super().forward(batch["image"], batch["noise"])[0]


# ----------------------------------------------------------------------------------------
# ViT and Swin.


def vit_kwargs(cfg) -> dict:
    """timm ``VisionTransformer`` arguments for a :func:`mim.models.vit.config`."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                num_classes=cfg.num_classes, global_pool=cfg.global_pool,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, class_token=cfg.class_token,
                init_values=cfg.layer_scale_init or None, drop_path_rate=cfg.drop_path_rate,
                norm_layer=partial(tnn.LayerNorm, eps=cfg.norm_eps))


class ViTClassifier(VisionTransformer):
    def __init__(self, cfg, label_smoothing: float = 0.0):
        super().__init__(**vit_kwargs(cfg))
        self.label_smoothing = label_smoothing

    def forward(self, batch):
        return classify.cross_entropy(super().forward(batch["image"]), batch, self.label_smoothing)


def beit_kwargs(cfg) -> dict:
    """timm ``Beit`` arguments for a :func:`mim.models.beit.config` (BEiT-style ViT:
    layer scale, q/v biases, relative position bias per block or shared)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias,
                mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
                norm_layer=partial(tnn.LayerNorm, eps=cfg.norm_eps),
                init_values=cfg.layer_scale_init or None, use_abs_pos_emb=cfg.use_abs_pos_emb,
                use_rel_pos_bias=cfg.use_rel_pos_bias,
                use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias)


class BeitClassifier(Beit):
    def __init__(self, cfg, label_smoothing: float = 0.0):
        super().__init__(**beit_kwargs(cfg))
        self.label_smoothing = label_smoothing

    def forward(self, batch):
        return classify.cross_entropy(super().forward(batch["image"]), batch, self.label_smoothing)


class Swin(SwinTransformer):
    """timm Swin with the official options mim has and timm lacks: the optional absolute
    position embedding (``ape``) and SimMIM's mask-token substitution after the patch
    embedding. ``features`` returns ``(B, H, W, C)`` after the final norm."""

    def __init__(self, cfg):
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, embed_dim=cfg.embed_dim,
                         depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                         window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio,
                         qkv_bias=cfg.qkv_bias, drop_path_rate=cfg.drop_path_rate,
                         norm_layer=partial(tnn.LayerNorm, eps=cfg.norm_eps))
        if not cfg.patch_norm:
            self.patch_embed.norm = tnn.Identity()
        g = cfg.img_size // cfg.patch_size
        self.absolute_pos_embed = tnn.Parameter(torch.zeros(1, g, g, cfg.embed_dim)) if cfg.ape else None

    def features(self, x, mask=None, mask_token=None):
        x = self.patch_embed(x)                                    # (B, H, W, C)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + mask_token.to(x.dtype) * w
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        return self.norm(self.layers(x))


class SwinClassifier(Swin):
    def __init__(self, cfg, label_smoothing: float = 0.0):
        super().__init__(cfg)
        self.label_smoothing = label_smoothing

    def forward(self, batch):
        logits = self.forward_head(self.features(batch["image"]))
        return classify.cross_entropy(logits, batch, self.label_smoothing)


# ----------------------------------------------------------------------------------------
# SimMIM.


class SimMIMViT(VisionTransformer):
    """``VisionTransformerForSimMIM``: the mask token replaces masked patch embeddings
    before the class token and position embedding; returns ``(B, D, H, W)``."""

    def __init__(self, cfg):
        super().__init__(**vit_kwargs(cfg))
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.grid = cfg.img_size // cfg.patch_size

    def features(self, x, mask):
        x = self.patch_embed(x)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = self.norm(self.blocks(self._pos_embed(x)))[:, self.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


class SimMIMBeit(Beit):
    """``VisionTransformerForSimMIM`` of the reference (BEiT-style blocks)."""

    def __init__(self, cfg):
        super().__init__(**beit_kwargs(cfg))
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.grid = cfg.img_size // cfg.patch_size

    def features(self, x, mask):
        x = self.patch_embed(x)
        w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        x = self.norm(x)[:, 1:]
        return x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


class SimMIMSwin(Swin):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def features(self, x, mask):
        return super().features(x, mask, self.mask_token).permute(0, 3, 1, 2)


class SimMIM(tnn.Module):
    """Encoder, ``decoder = Sequential(Conv2d(C, stride^2 * 3, 1), PixelShuffle(stride))``,
    L1 on the masked pixels normalised as the reference (sum / (masked + 1e-5) / C)."""

    def __init__(self, cfg):
        super().__init__()
        enc = cfg.encoder
        if enc.name == "swin":
            self.encoder = SimMIMSwin(enc)
            stride, dim = enc.patch_size * 2 ** (len(enc.depths) - 1), self.encoder.num_features
        else:
            self.encoder = SimMIMBeit(enc) if enc.name == "beit" else SimMIMViT(enc)
            stride, dim = enc.patch_size, enc.embed_dim
        self.decoder = tnn.Sequential(tnn.Conv2d(dim, stride ** 2 * enc.in_chans, 1), tnn.PixelShuffle(stride))
        self.patch = enc.patch_size

    def forward(self, batch):
        x, mask = batch["image"], batch["mask"]
        x_rec = self.decoder(self.encoder.features(x, mask))
        m = mask.repeat_interleave(self.patch, 1).repeat_interleave(self.patch, 2).unsqueeze(1).to(x_rec.dtype)
        return ((x - x_rec).abs() * m).sum() / (m.sum() + 1e-5) / x.shape[1]


# ----------------------------------------------------------------------------------------
# Linear probe.


class LinearProbe(VisionTransformer):
    """Frozen ViT encoder (no_grad, eval mode), ``head = Sequential(BatchNorm1d(affine=
    False, eps=1e-6), Linear)`` trained on its pre-logits."""

    def __init__(self, cfg):
        kwargs = vit_kwargs(cfg)
        num_classes = kwargs.pop("num_classes")
        super().__init__(**kwargs, num_classes=0)
        self.head = tnn.Sequential(tnn.BatchNorm1d(cfg.embed_dim, affine=False, eps=1e-6),
                                   tnn.Linear(cfg.embed_dim, num_classes))
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("head."))

    def forward(self, batch):
        with torch.no_grad():
            feats = self.forward_head(self.forward_features(batch["image"]), pre_logits=True)
        return F.cross_entropy(self.head(feats.float()), batch["label"])

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():      # only the head's batch norm follows train/eval
            if m is not self and m is not self.head and not isinstance(m, tnn.BatchNorm1d):
                m.training = False
        return self


# ----------------------------------------------------------------------------------------


def build(config, total_steps: int = 0) -> tnn.Module:
    """The peer of ``config``'s task and model, in train mode. ``total_steps``: the run's
    length, for MoBY's momentum schedule (0: ``config.steps``, else 1000)."""
    from mim import peers_ssl
    task, m = config.task, config.model
    if task == "classify":
        name = m.get("name", "vit")
        cls = {"vit": ViTClassifier, "swin": SwinClassifier, "beit": BeitClassifier}[name]
        model = cls(m, config.data.label_smoothing)
    elif task == "mae_pretrain":
        model = MAEPretrain.from_config(m)
    elif task == "simmim_pretrain":
        model = SimMIM(m)
    elif task == "linprobe" and m.get("name", "vit") == "vit" and config.probe.features == "pooled" \
            and config.probe.batch_norm:
        model = LinearProbe(m)
    elif task == "linprobe" and m.get("name", "vit") == "swin" and config.probe.features == "pooled" \
            and not config.probe.batch_norm:
        model = peers_ssl.SwinLinearProbe(m, config.data.label_smoothing,
                                          config.probe.get("encoder_train", False))
    elif task == "beit_pretrain":
        model = peers_ssl.BeitPretrain(config)
    elif task == "moby_pretrain":
        model = peers_ssl.MoBY(m, total_steps or config.get("steps", 0) or 1000)
    else:
        raise ValueError(f"no peer for task {task!r} with model {m.get('name', 'vit')!r}; "
                         f"run the bench with --peer=none")
    return model.train()
