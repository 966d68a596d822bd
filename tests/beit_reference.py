"""An independent nn.Module re-statement of microsoft/unilm ``beit/modeling_finetune.py``
(``Attention``, ``Block``, ``RelativePositionBias``, ``VisionTransformer``) and
``beit/modeling_pretrain.py`` (``VisionTransformerForMaskedImageModeling``), written from
the reference for the BEiT tests: the same submodule order, persistent
``relative_position_index`` buffers (so ``state_dict()`` has the official keys), explicit
softmax attention, and the reference's fine-tuning checkpoint conversion
(``run_class_finetuning.py``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def official_index(window):
    """``relative_position_index`` exactly as the reference builds it."""
    coords = torch.stack(torch.meshgrid([torch.arange(window[0]), torch.arange(window[1])], indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    num = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
    idx = torch.zeros(size=(window[0] * window[1] + 1,) * 2, dtype=rel.dtype)
    idx[1:, 1:] = rel.sum(-1)
    idx[0, 0:] = num - 3
    idx[0:, 0] = num - 2
    idx[0, 0] = num - 1
    return idx, num


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        m = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * m / keep


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, window_size=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if window_size:
            self.window_size = window_size
            idx, num = official_index(window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))
            self.register_buffer("relative_position_index", idx)
        else:
            self.window_size = None
            self.relative_position_bias_table = None
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x, rel_pos_bias=None):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            n = self.window_size[0] * self.window_size[1] + 1
            b = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
            attn = attn + b.permute(2, 0, 1).contiguous().unsqueeze(0)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, drop_path, init_values, window_size, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, window_size)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * 4))
        if init_values:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x, rel_pos_bias=None):
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.patch_shape = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RelativePositionBias(nn.Module):
    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        idx, num = official_index(window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num, num_heads))
        self.register_buffer("relative_position_index", idx)

    def forward(self):
        n = self.window_size[0] * self.window_size[1] + 1
        b = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return b.permute(2, 0, 1).contiguous()


def _dpr(rate, depth):
    return [x.item() for x in torch.linspace(0, rate, depth, device="cpu")]


class ForMaskedImageModeling(nn.Module):
    """``VisionTransformerForMaskedImageModeling`` (weights are set by the tests)."""

    def __init__(self, img_size, patch_size, vocab_size, dim, depth, num_heads, init_values=0.1,
                 use_abs_pos_emb=False, use_shared_rel_pos_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
                          if use_abs_pos_emb else None)
        self.pos_drop = nn.Dropout(0.0)
        self.rel_pos_bias = (RelativePositionBias(self.patch_embed.patch_shape, num_heads)
                             if use_shared_rel_pos_bias else None)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, True, r, init_values, None) for r in _dpr(drop_path_rate, depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, x, bool_masked_pos, return_all_tokens=False):
        x = self.patch_embed(x)
        B, L, _ = x.size()
        cls = self.cls_token.expand(B, -1, -1)
        mask_token = self.mask_token.expand(B, L, -1)
        w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
        x = x * (1 - w) + mask_token * w
        x = torch.cat((cls, x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        rpb = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rpb)
        x = self.norm(x)[:, 1:]
        if return_all_tokens:
            return self.lm_head(x)
        return self.lm_head(x[bool_masked_pos])


class VisionTransformer(nn.Module):
    """``modeling_finetune.VisionTransformer`` (``beit_base_patch16_224`` and friends)."""

    def __init__(self, img_size, patch_size, num_classes, dim, depth, num_heads, init_values=0.1,
                 use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                 use_mean_pooling=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
                          if use_abs_pos_emb else None)
        self.pos_drop = nn.Dropout(0.0)
        self.rel_pos_bias = (RelativePositionBias(self.patch_embed.patch_shape, num_heads)
                             if use_shared_rel_pos_bias else None)
        self.use_rel_pos_bias = use_rel_pos_bias
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, True, 0.0, init_values,
                  self.patch_embed.patch_shape if use_rel_pos_bias else None) for _ in range(depth)])
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if use_mean_pooling else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def get_num_layers(self):
        return len(self.blocks)

    def get_intermediate_layers(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        rpb = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        out = []
        for blk in self.blocks:
            x = blk(x, rpb)
            out.append(x)
        return out

    def forward(self, x):
        x = self.get_intermediate_layers(x)[-1]
        x = self.norm(x)
        x = self.fc_norm(x[:, 1:].mean(1)) if self.fc_norm is not None else x[:, 0]
        return self.head(x)


def interp2d_cubic(x, y, z, dx, dy):
    """``scipy.interpolate.interp2d(x, y, z, kind='cubic')(dx, dy)``: FITPACK's
    interpolating bicubic spline on a rectangular grid (``RectBivariateSpline`` with s=0;
    interp2d is gone from recent scipy)."""
    from scipy.interpolate import RectBivariateSpline
    # interp2d's z is indexed [y, x]; RectBivariateSpline's [x, y].
    return RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)(dy, dx)


def finetune_conversion(model: VisionTransformer, checkpoint_model: dict) -> dict:
    """``run_class_finetuning.py``'s edits of a checkpoint before ``utils.load_state_dict``
    (head of another shape removed, shared table copied into every block, index buffers
    dropped, tables resized with the geometric bicubic interpolation, pos_embed bicubic)."""
    checkpoint_model = dict(checkpoint_model)
    state_dict = model.state_dict()
    for k in ["head.weight", "head.bias"]:
        if k in checkpoint_model and checkpoint_model[k].shape != state_dict[k].shape:
            del checkpoint_model[k]
    if model.use_rel_pos_bias and "rel_pos_bias.relative_position_bias_table" in checkpoint_model:
        rel = checkpoint_model["rel_pos_bias.relative_position_bias_table"]
        for i in range(model.get_num_layers()):
            checkpoint_model["blocks.%d.attn.relative_position_bias_table" % i] = rel.clone()
        checkpoint_model.pop("rel_pos_bias.relative_position_bias_table")
    for key in list(checkpoint_model.keys()):
        if "relative_position_index" in key:
            checkpoint_model.pop(key)
        if "relative_position_bias_table" in key:
            rel = checkpoint_model[key]
            src_num_pos, heads = rel.size()
            dst_num_pos, _ = state_dict[key].size()
            dst = model.patch_embed.patch_shape
            extra = dst_num_pos - (dst[0] * 2 - 1) * (dst[1] * 2 - 1)
            src_size = int((src_num_pos - extra) ** 0.5)
            dst_size = int((dst_num_pos - extra) ** 0.5)
            if src_size != dst_size:
                extra_tokens = rel[-extra:, :]
                rel = rel[:-extra, :]
                left, right = 1.01, 1.5
                while right - left > 1e-6:
                    q = (left + right) / 2.0
                    gp = (1.0 - q ** (src_size // 2)) / (1.0 - q)
                    if gp > dst_size // 2:
                        right = q
                    else:
                        left = q
                dis, cur = [], 1
                for i in range(src_size // 2):
                    dis.append(cur)
                    cur += q ** (i + 1)
                r_ids = [-d for d in reversed(dis)]
                xs = r_ids + [0] + dis
                t = dst_size // 2.0
                dx = np.arange(-t, t + 0.1, 1.0)
                cols = []
                for i in range(heads):
                    z = rel[:, i].view(src_size, src_size).float().numpy()
                    cols.append(torch.Tensor(interp2d_cubic(xs, xs, z, dx, dx)).contiguous().view(-1, 1))
                checkpoint_model[key] = torch.cat((torch.cat(cols, dim=-1), extra_tokens), dim=0)
    if "pos_embed" in checkpoint_model:
        pe = checkpoint_model["pos_embed"]
        num_patches = model.patch_embed.num_patches
        n_extra = model.pos_embed.shape[-2] - num_patches
        orig = int((pe.shape[-2] - n_extra) ** 0.5)
        new = int(num_patches ** 0.5)
        if orig != new:
            tokens = pe[:, n_extra:].reshape(-1, orig, orig, pe.shape[-1]).permute(0, 3, 1, 2)
            tokens = F.interpolate(tokens, size=(new, new), mode="bicubic", align_corners=False)
            checkpoint_model["pos_embed"] = torch.cat((pe[:, :n_extra], tokens.permute(0, 2, 3, 1).flatten(1, 2)), 1)
    return checkpoint_model


def load_like_reference(model: nn.Module, checkpoint_model: dict):
    """``utils.load_state_dict``: non-strict; returns (missing, unexpected) with the
    ignored ``relative_position_index`` names left out of ``missing``."""
    res = model.load_state_dict(checkpoint_model, strict=False)
    missing = [k for k in res.missing_keys if "relative_position_index" not in k]
    return missing, list(res.unexpected_keys)
