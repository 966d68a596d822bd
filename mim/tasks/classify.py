"""Supervised image classification (the ViT-B/32 recipe, and fine-tuning of pretrained
ViT and Swin encoders). Mixup/CutMix targets arrive from the input pipeline.
``config.model.name`` picks the backbone: "vit" or "swin"."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mim import models
from mim.tasks import ParamRules, model_rules


def model(config):
    """The backbone module that ``config.model.name`` names (:data:`mim.models.REGISTRY`)."""
    return models.get(config.model.get("name", "vit"))


def init(config, gen: torch.Generator):
    return model(config).init(gen, config.model), {}


def cross_entropy(logits, batch, label_smoothing):
    """Soft targets (mixup/cutmix, already smoothed) or hard labels with smoothing
    (Szegedy et al. 2016)."""
    if "soft_label" in batch:
        return torch.sum(-batch["soft_label"] * F.log_softmax(logits.float(), -1), -1).mean()
    return smoothed_cross_entropy(logits.float(), batch["label"], label_smoothing)


def smoothed_cross_entropy(logits, labels, label_smoothing, reduction: str = "mean"):
    """``F.cross_entropy(logits, labels, label_smoothing=eps)``. ``eps`` may be a 0-d
    tensor (each member's own in a vectorized run, :mod:`mim.train.members`), which
    ``F.cross_entropy`` does not take: then its formula, ``(1 - eps) * nll + eps * mean
    over classes of -log p`` (Szegedy et al. 2016, Sec. 7; torch's definition)."""
    if not isinstance(label_smoothing, torch.Tensor):
        return F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=label_smoothing)
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(-1, labels[:, None]).squeeze(-1)
    per = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return per.sum() if reduction == "sum" else per.mean()


def loss(params, model_state, batch, config, train: bool, frozen=None):
    logits, _ = model(config).apply(params, batch["image"], config.model, train=train)
    value = cross_entropy(logits, batch, config.data.label_smoothing)
    metrics = {}
    if "soft_label" not in batch:
        metrics["accuracy"] = (logits.argmax(-1) == batch["label"]).float().mean()
    return value, (model_state, metrics)


def topk_correct(logits, labels, ks=(1, 5)):
    k = min(max(ks), logits.shape[-1])
    top = logits.topk(k, -1).indices
    hit = top == labels[:, None]
    return {f"correct{kk}": hit[:, :min(kk, k)].any(-1).sum() for kk in ks}


def evaluate(params, model_state, batch, config, frozen=None):
    logits, _ = model(config).apply(params, batch["image"], config.model, train=False)
    out = topk_correct(logits, batch["label"])
    out["loss_sum"] = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
    out["count"] = torch.tensor(batch["label"].shape[0], device=logits.device)
    return out


def param_rules(config) -> ParamRules:
    """The backbone's own rules: its weight-decay exemptions and layer ids."""
    return model_rules(config.model)


def batch_extras(gen, config):
    return {}
