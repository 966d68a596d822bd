"""Linear probing of a frozen ViT encoder, as MAE's main_linprobe.py (He et al. 2022,
Sec. 4 and A.2, following MoCo v3): the encoder's pre-logits (class token after the
final norm by default, ``--cls_token``) go through a parameter-free BatchNorm and one
linear layer; only that layer is trained (LARS in the recipe).

Names follow the reference's ``head = Sequential(BatchNorm1d(affine=False), Linear)``:
the linear layer is ``head.1.*`` in ``params`` and the batch-norm statistics are
``head.0.running_mean / running_var / num_batches_tracked`` in ``model_state``, so the
flat union of both is the official linear-probe state_dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.models import vit
from mim.nn import init as I
from mim.tasks import ParamRules, classify

# BatchNorm1d(affine=False, eps=1e-6) with torch's default momentum (main_linprobe.py).
BN_EPS, BN_MOMENTUM = 1e-6, 0.1


def encoder_config(config):
    """The vit config of the frozen encoder: ``config.model`` without a head."""
    cfg = config.model.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.num_classes = 0
    return cfg


def init(config, gen: torch.Generator):
    cfg = config.model
    params = vit.init(gen, encoder_config(config))
    # trunc_normal(std=0.01) weight, zero bias: "manually initialize fc layer: following
    # MoCo v3" in the reference (head_init_std = 0.01 in the recipe's config).
    params["head"] = {"1": I.linear(cfg.embed_dim, cfg.num_classes, gen, std=cfg.head_init_std)}
    bn = {"running_mean": torch.zeros(cfg.embed_dim), "running_var": torch.ones(cfg.embed_dim),
          "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
    model_state = {"head": {"0": bn}}
    if config.init.checkpoint and config.init.format == "mae":
        model_state = _probe_statistics(config.init.checkpoint, model_state)
    return params, model_state


def _probe_statistics(path, model_state):
    """Batch-norm statistics of a linear-probe checkpoint (official, or a mim linprobe
    run), so that evaluating one needs no retraining; any other checkpoint leaves the
    BatchNorm defaults."""
    from mim.checkpoints import mae as mae_ckpt

    src = mae_ckpt.read_source(path, include_model_state=True)
    bn = model_state["head"]["0"]
    names = {k: f"head.0.{k}" for k in bn}
    if all(n in src and src[n].shape == bn[k].shape for k, n in names.items()):
        return {"head": {"0": {k: src[n].to(bn[k].dtype) for k, n in names.items()}}}
    return model_state


def batch_norm(stats: dict, x: torch.Tensor, train: bool):
    """``BatchNorm1d(affine=False)``, functionally: batch statistics in training, with the
    running averages returned updated (unbiased variance, as torch); running ones in eval.
    Every rank keeps its own statistics, as the reference's plain (non-synced) BN."""
    x = x.float()
    if not train:
        return (x - stats["running_mean"]) / torch.sqrt(stats["running_var"] + BN_EPS), stats
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    n = x.shape[0]
    unbiased = var * (n / max(n - 1, 1))
    new = {
        "running_mean": torch.lerp(stats["running_mean"], mean.detach(), BN_MOMENTUM),
        "running_var": torch.lerp(stats["running_var"], unbiased.detach(), BN_MOMENTUM),
        "num_batches_tracked": stats["num_batches_tracked"] + 1,
    }
    return (x - mean) / torch.sqrt(var + BN_EPS), new


def features(params, images, config):
    """Frozen encoder pre-logits. No gradient flows into the encoder, so its forward is
    not recorded for backward (saves the activations' memory)."""
    encoder = {k: v for k, v in params.items() if k != "head"}
    images = images.to(encoder["patch_embed"]["proj"]["weight"].dtype)
    with torch.no_grad():
        _, aux = vit.apply(encoder, images, encoder_config(config), train=False)
    return aux["pre_logits"]


def logits_and_state(params, model_state, images, config, train: bool):
    x = features(params, images, config)
    x, bn = batch_norm(model_state["head"]["0"], x, train)
    head = params["head"]["1"]
    logits = F.linear(x.to(head["weight"].dtype), head["weight"], head["bias"])
    return logits, {"head": {"0": bn}}


def loss(params, model_state, batch, config, train: bool):
    logits, model_state = logits_and_state(params, model_state, batch["image"], config, train)
    value = F.cross_entropy(logits.float(), batch["label"])
    metrics = {"accuracy": (logits.argmax(-1) == batch["label"]).float().mean()}
    return value, (model_state, metrics)


def evaluate(params, model_state, batch, config):
    logits, _ = logits_and_state(params, model_state, batch["image"], config, train=False)
    out = classify.topk_correct(logits, batch["label"])
    out["loss_sum"] = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
    out["count"] = torch.tensor(batch["label"].shape[0], device=logits.device)
    return out


def param_rules(config) -> ParamRules:
    """Everything but the linear head is frozen (the reference sets requires_grad=False
    on all but ``model.head``). LARS exempts 1-D tensors from weight decay itself."""
    return ParamRules(frozen=(r"^(?!head\.)",))


def batch_extras(gen, config):
    return {}

