"""Supervised image classification (the ViT-B/32 recipe, and fine-tuning of pretrained
ViT and Swin encoders). Mixup/CutMix targets arrive from the input pipeline.
``config.model.name`` picks the backbone: "vit" or "swin"."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.models import beit, swin, vit
from mim.tasks import ParamRules

MODELS = {"vit": vit, "swin": swin, "beit": beit}


def model(config):
    name = config.model.get("name", "vit")
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r}: must be one of {sorted(MODELS)}")
    return MODELS[name]


def init(config, gen: torch.Generator):
    return model(config).init(gen, config.model), {}


def cross_entropy(logits, batch, label_smoothing: float):
    """Soft targets (mixup/cutmix, already smoothed) or hard labels with smoothing
    (Szegedy et al. 2016)."""
    if "soft_label" in batch:
        return torch.sum(-batch["soft_label"] * F.log_softmax(logits.float(), -1), -1).mean()
    return F.cross_entropy(logits.float(), batch["label"], label_smoothing=label_smoothing)


def loss(params, model_state, batch, config, train: bool):
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


def evaluate(params, model_state, batch, config):
    logits, _ = model(config).apply(params, batch["image"], config.model, train=False)
    out = topk_correct(logits, batch["label"])
    out["loss_sum"] = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
    out["count"] = torch.tensor(batch["label"].shape[0], device=logits.device)
    return out


def param_rules(config) -> ParamRules:
    m = config.model
    if model(config) is swin:
        # SimMIM fine-tuning: no decay on the absolute position embedding and the
        # relative position bias tables; layer ids as its get_swin_layer.
        return ParamRules(num_layers=sum(m.depths), layer_id=lambda n: swin.layer_id(n, m),
                          no_decay=("absolute_pos_embed", "relative_position_bias_table"))
    if model(config) is beit:
        # SimMIM's ViT fine-tuning (optimizer.py): no decay on 1-D tensors and on the
        # model's no_weight_decay() = {pos_embed, cls_token}; the relative position bias
        # tables are decayed (BEiT only exempts them behind a flag). Layer ids as
        # get_vit_layer, the shared table with the head.
        return ParamRules(num_layers=m.depth, layer_id=lambda n: beit.layer_id(n, m.depth),
                          no_decay=(r"^pos_embed$", r"^cls_token$"))
    return ParamRules(num_layers=m.depth, layer_id=lambda n: vit.layer_id(n, m.depth),
                      no_decay=("pos_embed", "cls_token", "dist_token"))


def batch_extras(gen, config):
    return {}
