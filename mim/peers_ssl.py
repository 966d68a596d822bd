"""Peers for :mod:`mim.bench` of the two recipes with more than one network in a step:
BEiT pretraining (a frozen tokenizer in the loss) and MoBY (an online and a momentum
branch, two key queues), as ordinary ``nn.Module``\\ s built from timm and trained with
``loss.backward()`` and ``torch.optim`` (:mod:`mim.peers` builds them; its docstring says
what a peer is). Also the Swin linear probe of MoBY's linear evaluation.

- BEiT pretraining (microsoft/unilm ``beit/modeling_pretrain.py``,
  ``engine_for_pretraining.py``): timm ``Beit`` with a ``mask_token`` that replaces the
  masked patch embeddings before the class token, and an ``lm_head`` on the masked
  positions (``x[bool_masked_pos]``); the tokenizer is :class:`DalleEncoder` (or
  :class:`PatchKMeans` for the ``:tiny`` k-means codebook), an ``nn.Module`` in eval mode
  run under ``torch.no_grad`` outside autocast; the loss is
  ``CrossEntropyLoss`` over the masked tokens of the batch.
- MoBY (SwinTransformer/Transformer-SSL ``models/moby.py``): online and momentum timm
  ``SwinTransformer`` encoders, ``MoBYMLP`` projectors and predictor, the two queues and
  their pointer as buffers. The momentum update runs under ``torch.no_grad`` in
  :meth:`MoBY.before_step` (``mim.bench`` calls it eagerly before each step's forward,
  as mim's ``update_state_before_step``; the reference calls it inside ``forward`` before
  the keys, on the same weights); ``forward`` runs the online branch on view 1 then view
  2, the keys without gradients, the loss, then the enqueue at ``int(queue_ptr)``, as the
  reference's ``MoBY.forward``. One process: ``BatchNorm1d`` for ``SyncBatchNorm``, no
  key gathering.
- MoBY linear evaluation (``moby_linear.py``): the Swin with its ``head``, frozen but left
  in ``train()`` (drop path on), only the head trained, label smoothing.

Each SSL peer's ``frozen_forward(batch)`` runs the share of a step that is never trained
(the tokenizer; the momentum encoder and projector), for the bench's FLOP split.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as tnn
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

from mim import tree
from mim.models import beit_pretrain, dalle, moby, patch_kmeans

# ----------------------------------------------------------------------------------------
# The DALL-E encoder (openai/DALL-E ``dall_e/encoder.py``) with torch.nn layers.


class DalleBlock(tnn.Module):
    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        n_hid = n_out // 4
        self.id_path = tnn.Conv2d(n_in, n_out, 1) if n_in != n_out else tnn.Identity()
        self.res_path = tnn.Sequential(OrderedDict([
            ("relu_1", tnn.ReLU()), ("conv_1", tnn.Conv2d(n_in, n_hid, 3, padding=1)),
            ("relu_2", tnn.ReLU()), ("conv_2", tnn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_3", tnn.ReLU()), ("conv_3", tnn.Conv2d(n_hid, n_hid, 3, padding=1)),
            ("relu_4", tnn.ReLU()), ("conv_4", tnn.Conv2d(n_hid, n_out, 1))]))
        self.post_gain = post_gain

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(tnn.Module):
    """``Encoder``: 7x7 input convolution, four groups of residual blocks (2x2 max-pool
    after the first three), ReLU + 1x1 output convolution to the vocabulary. ``float16``:
    every convolution but the output one in float16, as the official ``Conv2d`` on CUDA.
    Frozen: no gradients, always in eval mode."""

    def __init__(self, cfg, float16: bool = False):
        super().__init__()
        gain = dalle.post_gain(cfg)
        layers = [("input", tnn.Conv2d(cfg.input_channels, cfg.n_hid, 7, padding=3))]
        for g, (group, members) in enumerate(dalle.widths(cfg)):
            body = [(name, DalleBlock(n_in, n_out, gain)) for name, n_in, n_out in members]
            if g < dalle.GROUP_COUNT - 1:
                body.append(("pool", tnn.MaxPool2d(2)))
            layers.append((group, tnn.Sequential(OrderedDict(body))))
        layers.append(("output", tnn.Sequential(OrderedDict([
            ("relu", tnn.ReLU()), ("conv", tnn.Conv2d(8 * cfg.n_hid, cfg.vocab_size, 1))]))))
        self.blocks = tnn.Sequential(OrderedDict(layers))
        self.float16 = float16
        self.requires_grad_(False)
        self.eval()
        self._cast()

    def _cast(self):
        if self.float16:
            for name, m in self.blocks.named_children():
                m.to(torch.float32 if name == "output" else torch.float16)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._cast()              # .to(device) keeps the official split of dtypes
        return self

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x):
        """Token logits ``(B, vocab, H / 8, W / 8)`` of mapped pixels."""
        dt = torch.float16 if self.float16 else torch.float32
        h = self.blocks[:-1](x.to(dt))
        return self.blocks.output(h.float())

    @torch.no_grad()
    def token_ids(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self(x.float()).argmax(dim=1).flatten(1)

    def load_tree(self, params: dict) -> None:
        """mim's tree (the official keys ``...w`` / ``...b``)."""
        flat = {k[:-2] + (".weight" if k.endswith(".w") else ".bias"): v
                for k, v in tree.flatten(params).items()}
        self.load_state_dict(flat, strict=True)


class PatchKMeans(tnn.Module):
    """The patch k-means tokenizer as a module: ``F.avg_pool2d`` cells, squared distances to
    the codebook buffer as ``|f|^2 - 2 f.c + |c|^2`` (a matmul, which the FLOP counter
    sees, as it sees mim's), argmin. Frozen."""

    def __init__(self, cfg):
        super().__init__()
        self.pool = cfg.pool
        self.register_buffer("codebook", torch.zeros(cfg.vocab_size, 3 * cfg.pool ** 2))

    @torch.no_grad()
    def token_ids(self, x):
        cell = patch_kmeans.DOWNSAMPLE // self.pool
        f = F.avg_pool2d(x.float(), cell)                                  # (B, 3, h p, w p)
        b, c, hp, wp = f.shape
        h, w = hp // self.pool, wp // self.pool
        f = f.view(b, c, h, self.pool, w, self.pool).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, -1)
        cb = self.codebook
        d = (f * f).sum(-1, keepdim=True) - 2 * f @ cb.t() + (cb * cb).sum(-1)
        return d.argmin(-1)

    def load_tree(self, params: dict) -> None:
        self.load_state_dict({"codebook": params["codebook"]}, strict=True)


TOKENIZER_PEERS = {"dalle": lambda tok: DalleEncoder(tok.model, float16=tok.dtype == "float16"),
                   "kmeans": lambda tok: PatchKMeans(tok.model)}


# ----------------------------------------------------------------------------------------
# BEiT pretraining.


class BeitPretrain(Beit):
    """``VisionTransformerForMaskedImageModeling`` on timm's ``Beit`` with the run's
    tokenizer as a frozen submodule; ``forward(batch)`` is one step's loss."""

    def __init__(self, config):
        from mim.peers import beit_kwargs
        m, tok = config.model, config.tokenizer
        if tok.name not in TOKENIZER_PEERS:
            raise ValueError(f"no peer for tokenizer {tok.name!r} (peers: {sorted(TOKENIZER_PEERS)})")
        super().__init__(**beit_kwargs(beit_pretrain.backbone(m)))
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, m.embed_dim))
        self.lm_head = tnn.Linear(m.embed_dim, m.vocab_size)
        tnn.init.trunc_normal_(self.mask_token, std=0.02)
        self.tokenizer = TOKENIZER_PEERS[tok.name](tok)

    def forward_masked(self, x, bool_masked_pos):
        """The reference's ``forward(x, bool_masked_pos, return_all_tokens=False)``."""
        x = self.patch_embed(x)
        w = bool_masked_pos.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.type_as(x) * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=bias)
        x = self.norm(x)[:, 1:]
        return self.lm_head(x[bool_masked_pos])

    def frozen_forward(self, batch):
        return self.tokenizer.token_ids(batch["tokenizer_image"])

    def forward(self, batch):
        with torch.no_grad():
            bool_masked_pos = batch["mask"].flatten(1).to(torch.bool)
            labels = self.frozen_forward(batch)[bool_masked_pos]
        logits = self.forward_masked(batch["image"], bool_masked_pos)
        return F.cross_entropy(logits.float(), labels)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.train(False)
        return self

    def load_mim(self, params: dict, tokenizer_params: dict) -> None:
        """mim's ``beit_pretrain`` tree (the official keys, which are timm's) and its
        tokenizer tree."""
        missing, unexpected = self.load_state_dict(tree.flatten(params), strict=False)
        missing = [k for k in missing if not k.startswith("tokenizer.")]
        if missing or unexpected:
            raise ValueError(f"BEiT tree does not fit the peer: missing {missing}, unexpected {unexpected}")
        self.tokenizer.load_tree(tokenizer_params)


# ----------------------------------------------------------------------------------------
# MoBY.


class MoBYMLP(tnn.Module):
    """``Sequential(Identity, [Linear, BatchNorm1d, ReLU] * (num_layers - 1))``, then
    ``linear_out``."""

    def __init__(self, in_dim, inner_dim, out_dim, num_layers, bn_momentum=0.1, bn_eps=1e-5):
        super().__init__()
        hidden = [tnn.Identity()]
        for i in range(num_layers - 1):
            hidden += [tnn.Linear(in_dim if i == 0 else inner_dim, inner_dim),
                       tnn.BatchNorm1d(inner_dim, eps=bn_eps, momentum=bn_momentum),
                       tnn.ReLU(inplace=True)]
        self.linear_hidden = tnn.Sequential(*hidden)
        self.linear_out = tnn.Linear(in_dim if num_layers == 1 else inner_dim, out_dim)

    def forward(self, x):
        return self.linear_out(self.linear_hidden(x))


class SwinEncoder(tnn.Module):
    """A timm Swin without head, returning the pooled final-norm features."""

    def __init__(self, cfg):
        super().__init__()
        from mim.peers import Swin
        self.swin = Swin(cfg)

    def forward(self, x):
        return self.swin.features(x).mean(dim=(1, 2))


class MoBY(tnn.Module):
    def __init__(self, cfg, total_steps: int):
        super().__init__()
        self.encoder = SwinEncoder(moby.encoder_config(cfg))
        self.encoder_k = SwinEncoder(moby.encoder_config(cfg, target=True))
        nf, h, o = self.encoder.swin.num_features, cfg.mlp_hidden_dim, cfg.mlp_out_dim
        bn = dict(bn_momentum=cfg.bn_momentum, bn_eps=cfg.bn_eps)
        self.projector = MoBYMLP(nf, h, o, cfg.proj_num_layers, **bn)
        self.projector_k = MoBYMLP(nf, h, o, cfg.proj_num_layers, **bn)
        self.predictor = MoBYMLP(o, h, o, cfg.pred_num_layers, **bn)
        for q, k in zip(self._online(), self._target()):
            k.data.copy_(q.data)
            k.requires_grad = False
        self.register_buffer("queue1", F.normalize(torch.randn(o, cfg.contrast_num_negative), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(o, cfg.contrast_num_negative), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.m0, self.T = cfg.contrast_momentum, cfg.contrast_temperature
        self.num_negative = cfg.contrast_num_negative
        self.k, self.K = 0, max(int(total_steps), 1)

    def _online(self):
        return list(self.encoder.parameters()) + list(self.projector.parameters())

    def _target(self):
        return list(self.encoder_k.parameters()) + list(self.projector_k.parameters())

    @torch.no_grad()
    def before_step(self):
        """``_momentum_update_key_encoder``: ``p_k = p_k m + p_q (1 - m)``, ``m`` on the
        cosine from ``contrast_momentum`` to 1 over ``K`` steps (a host float, as the
        reference's numpy scalar)."""
        m = 1.0 - (1.0 - self.m0) * (math.cos(math.pi * self.k / self.K) + 1.0) / 2.0
        self.k += 1
        target = self._target()
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, torch._foreach_mul(self._online(), 1.0 - m))

    def contrastive_loss(self, q, k, queue):
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=q.device))

    def _keys(self, im):
        return F.normalize(self.projector_k(self.encoder_k(im)), dim=1)

    def frozen_forward(self, batch):
        with torch.no_grad():
            return self._keys(batch["image"]), self._keys(batch["image2"])

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys1, keys2):
        n = keys1.shape[0]
        ptr = int(self.queue_ptr)
        assert self.num_negative % n == 0
        # Out of place (the reference writes the slice in place): compiled, the loss keeps
        # the queue itself for its backward (the ``clone()`` is optimised away), and an
        # in-place write fails autograd's version check.
        self.queue1 = torch.cat([self.queue1[:, :ptr], keys1.T, self.queue1[:, ptr + n:]], dim=1)
        self.queue2 = torch.cat([self.queue2[:, :ptr], keys2.T, self.queue2[:, ptr + n:]], dim=1)
        self.queue_ptr[0] = (ptr + n) % self.num_negative

    def forward(self, batch):
        im_1, im_2 = batch["image"], batch["image2"]
        pred_1 = F.normalize(self.predictor(self.projector(self.encoder(im_1))).float(), dim=1)
        pred_2 = F.normalize(self.predictor(self.projector(self.encoder(im_2))).float(), dim=1)
        key_1, key_2 = (k.float() for k in self.frozen_forward(batch))
        loss = (self.contrastive_loss(pred_1, key_2, self.queue2)
                + self.contrastive_loss(pred_2, key_1, self.queue1))
        if self.training:
            self._dequeue_and_enqueue(key_1, key_2)
        return loss

    def load_mim(self, params: dict, model_state: dict) -> None:
        """mim's ``(params, model_state)`` (the official layout; timm's own
        ``checkpoint_filter_fn`` maps the Swin encoders)."""
        for name, src in (("encoder", params["encoder"]), ("encoder_k", model_state["encoder_k"])):
            m = getattr(self, name).swin
            m.load_state_dict(swin_filter(tree.flatten(src), m), strict=True)
        for name, src in (("projector", moby.merge(params["projector"], model_state["projector"])),
                          ("projector_k", model_state["projector_k"]),
                          ("predictor", moby.merge(params["predictor"], model_state["predictor"]))):
            getattr(self, name).load_state_dict(tree.flatten(src), strict=True)
        with torch.no_grad():
            for name in ("queue1", "queue2", "queue_ptr"):
                getattr(self, name).copy_(model_state[name])


# ----------------------------------------------------------------------------------------
# MoBY linear evaluation.


class SwinLinearProbe(tnn.Module):
    """``moby_linear.py``: the whole model in ``train()`` (the frozen backbone keeps drop
    path), features without gradients, the Swin ``head`` trained, label smoothing."""

    def __init__(self, cfg, label_smoothing: float = 0.0, encoder_train: bool = True):
        super().__init__()
        from mim.peers import Swin
        self.swin = Swin(cfg)
        self.swin.requires_grad_(False)
        self.swin.head.requires_grad_(True)
        self.label_smoothing, self.encoder_train = label_smoothing, encoder_train

    def train(self, mode: bool = True):
        super().train(mode)
        self.swin.train(mode and self.encoder_train)
        return self

    def forward(self, batch):
        with torch.no_grad():
            feats = self.swin.forward_head(self.swin.features(batch["image"]), pre_logits=True)
        logits = self.swin.head.fc(feats)
        return F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)

