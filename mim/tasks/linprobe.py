"""Linear probing of a frozen encoder: any backbone mim builds (``config.model.name``:
ViT, BEiT-style ViT, Swin), features from its ``features`` function
(:mod:`mim.models`), only the linear classifier trained.

``config.probe.features`` says what the classifier reads:

- ``"pooled"``: the encoder's pooled features (its pre-logits: the class token after the
  final norm for MAE's ``--cls_token``, the mean of the final tokens for Swin / MoBY).
  With ``config.probe.batch_norm`` (MAE's main_linprobe.py, following MoCo v3) they pass a
  parameter-free BatchNorm first, and the names follow the reference's
  ``head = Sequential(BatchNorm1d(affine=False), Linear)``: the linear layer is
  ``head.1.*`` in ``params``, the statistics ``head.0.*`` in ``model_state``, so their flat
  union is the official linear-probe state_dict. Without it the classifier is ``head.*``,
  the backbone's own head (MoBY's ``moby_linear.py`` trains the Swin ``head``).
- ``"blocks"``: one linear classifier per block on concat(class token, mean of the patch
  tokens) of that block's output, all trained together on the sum of their losses, as
  BEiT's run_linear_eval.py (``LinearClassifier``: ``linear.<i>.*``, weights
  normal(0, 0.01)); evaluation reports every block and the best.

``config.probe.lr_grid`` / ``wd_grid``: a grid of heads, every (lr, weight decay, block)
trained together over one forward of the encoder (:mod:`mim.tasks.probe_grid`).
``config.probe.holdout``: a fraction of the train split kept out of training, on which the
best head (or block) is selected (:mod:`mim.data.holdout`).
"""
from __future__ import annotations

import ml_collections
import torch
import torch.nn.functional as F

from mim import models
from mim.models.derived import Derived
from mim.config import ConfigError
from mim.nn import init as I
from mim.tasks import ParamRules, classify
from mim.tasks import probe_grid

# BatchNorm1d(affine=False, eps=1e-6) with torch's default momentum (main_linprobe.py).
BN_EPS, BN_MOMENTUM = 1e-6, 0.1
FEATURES = ("pooled", "blocks")


def probe_config(features: str = "pooled", batch_norm: bool = False,
                 encoder_train: bool = False, lr_grid=(), wd_grid=(),
                 holdout: float = 0.0) -> ml_collections.ConfigDict:
    """``encoder_train``: the frozen encoder computes its training features in training
    mode (drop path on), as MoBY's moby_linear.py leaves the whole model in ``train()``;
    evaluation always reads inference-mode features. ``lr_grid`` (in the units of
    ``optim.lr`` / ``optim.base_lr``), ``wd_grid``: a grid of heads (empty: one head, the
    run's lr and weight decay); ``holdout``: the fraction of train images kept out of
    training to select the best head on."""
    return ml_collections.ConfigDict(dict(features=features, batch_norm=batch_norm,
                                          encoder_train=encoder_train, lr_grid=tuple(lr_grid),
                                          wd_grid=tuple(wd_grid), holdout=float(holdout)))


def _probe(config):
    if "probe" not in config:
        raise ConfigError("config.probe: the linprobe task needs config.probe "
                          "(mim.tasks.linprobe.probe_config: features, batch_norm)")
    p = config.probe
    if p.features not in FEATURES:
        raise ConfigError(f"config.probe.features: {p.features!r} is not one of {FEATURES}")
    if p.features == "blocks" and p.batch_norm:
        raise ConfigError("config.probe.batch_norm: per-block probes (features='blocks') have no "
                          "BatchNorm, as BEiT's run_linear_eval.py")
    if p.features == "blocks" and config.model.get("name", "vit") == "swin":
        raise ConfigError("config.probe.features: 'blocks' reads a class token; Swin has none "
                          "(use 'pooled')")
    probe_grid.check(config)
    return p


def validate(config) -> None:
    """Before any work (:func:`mim.config.validate`)."""
    _probe(config)


def grid_heads(config):
    """The grid's heads (:class:`mim.tasks.probe_grid.Head`), or None without a grid."""
    if not probe_grid.active(config):
        return None
    _, cfg = encoder(config)
    return probe_grid.heads(config, num_blocks(cfg))


def encoder(config):
    """The backbone module and its config without a head (a read-only view: the loss
    builds it while ``torch.compile`` traces, mim.models.derived)."""
    cfg = Derived(config.model, {"num_classes": 0})
    return models.get(cfg.get("name", "vit")), cfg


def num_blocks(cfg) -> int:
    return sum(cfg.depths) if "depths" in cfg else cfg.depth


def feature_dim(module, cfg, features: str) -> int:
    if features == "blocks":
        return 2 * cfg.embed_dim
    return module.num_features(cfg) if hasattr(module, "num_features") else cfg.embed_dim


def init(config, gen: torch.Generator):
    probe = _probe(config)
    module, cfg = encoder(config)
    params = module.init(gen, cfg)
    n, dim = config.model.num_classes, feature_dim(module, cfg, probe.features)
    std = config.model.get("head_init_std", 0.01)
    model_state = {}
    if probe.features == "blocks":
        # LinearClassifier: weight normal(0, 0.01), bias 0 (run_linear_eval.py).
        params["linear"] = {str(i): {"weight": I.normal((n, dim), std, gen), "bias": I.zeros((n,))}
                            for i in range(num_blocks(cfg))}
    elif probe.batch_norm:
        # trunc_normal(std=0.01) weight, zero bias: "manually initialize fc layer: following
        # MoCo v3" in MAE's reference (head_init_std = 0.01 in the recipe's config).
        params["head"] = {"1": I.linear(dim, n, gen, std=std)}
        bn = {"running_mean": torch.zeros(dim), "running_var": torch.ones(dim),
              "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
        model_state = {"head": {"0": bn}}
        if config.init.checkpoint and config.init.format == "mae":
            from mim.checkpoints import registry
            model_state = _probe_statistics(registry.resolve(config.init.checkpoint), model_state)
    else:
        params["head"] = I.linear(dim, n, gen, std=std)
    hs = grid_heads(config)
    if hs is not None:  # every head starts from the single probe's draws (probe_grid.init)
        if probe.features == "blocks":
            linear = params.pop("linear")
            single = [linear[str(i)] for i in range(num_blocks(cfg))]
        else:
            head = params.pop("head")
            single = [head["1"] if probe.batch_norm else head]
        params["grid"] = probe_grid.init(single, hs)
    return params, model_state


def _probe_statistics(path, model_state):
    """Batch-norm statistics of a linear-probe checkpoint (official, or a mim linprobe
    run), so that evaluating one needs no retraining; any other checkpoint leaves the
    BatchNorm defaults."""
    from mim.checkpoints import weights

    src = weights.read_source(path, include_model_state=True)
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


def features(params, model_state, images, config, blocks: bool = False) -> dict:
    """The frozen encoder's features in inference mode (:func:`mim.tasks.features`: the
    k-NN evaluator's, ``knn_every``)."""
    module, cfg = encoder(config)
    enc = {k: v for k, v in params.items() if k not in ("head", "linear", "grid")}
    return module.features(enc, images, cfg, blocks=blocks)


def probe_inputs(params, images, config, train: bool = False):
    """What the classifier(s) read: a list of ``(B, D)`` features, one per classifier.
    No gradient flows into the frozen encoder, so its forward is not recorded for
    backward (saves the activations' memory)."""
    module, cfg = encoder(config)
    enc = {k: v for k, v in params.items() if k not in ("head", "linear", "grid")}
    blocks = config.probe.features == "blocks"
    with torch.no_grad():
        out = module.features(enc, images, cfg, blocks=blocks,
                              train=train and config.probe.get("encoder_train", False))
    if not blocks:
        return [out["pooled"]]
    return [torch.cat([b[:, 0], b[:, 1:].mean(1)], dim=-1).float() for b in out["blocks"]]


def logits_and_state(params, model_state, images, config, train: bool):
    """A list of logits, one per classifier (a grid: one ``(H, B, C)`` tensor of every
    head's), and the new model state."""
    feats = probe_inputs(params, images, config, train)
    hs = grid_heads(config)
    if hs is not None:
        if config.probe.batch_norm:  # one parameter-free BatchNorm, shared: the heads read the same input
            x, bn = batch_norm(model_state["head"]["0"], feats[0], train)
            feats, model_state = [x], {"head": {"0": bn}}
        return [probe_grid.logits(params["grid"], feats, hs)], model_state
    if config.probe.features == "blocks":
        heads = [params["linear"][str(i)] for i in range(len(feats))]
        return [F.linear(x.to(h["weight"].dtype), h["weight"], h["bias"]) for x, h in zip(feats, heads)], model_state
    x = feats[0]
    if config.probe.batch_norm:
        x, bn = batch_norm(model_state["head"]["0"], x, train)
        head, model_state = params["head"]["1"], {"head": {"0": bn}}
    else:
        head = params["head"]
    return [F.linear(x.to(head["weight"].dtype), head["weight"], head["bias"])], model_state


def loss(params, model_state, batch, config, train: bool, frozen=None):
    logits, model_state = logits_and_state(params, model_state, batch["image"], config, train)
    if probe_grid.active(config):  # the sum of the heads' losses; accuracy of the last head
        z = logits[0]
        value = probe_grid.loss(z, batch["label"], config.data.label_smoothing)
        metrics = {"accuracy": (z[-1].argmax(-1) == batch["label"]).float().mean()}
        return value, (model_state, metrics)
    # The sum over the per-block classifiers (run_linear_eval.py); one term otherwise.
    # data.label_smoothing: MoBY's moby_linear.py smooths by 0.1; MAE and BEiT do not.
    value = sum(classify.smoothed_cross_entropy(z.float(), batch["label"], config.data.label_smoothing)
                for z in logits)
    metrics = {"accuracy": (logits[-1].argmax(-1) == batch["label"]).float().mean()}
    return value, (model_state, metrics)


def evaluate(params, model_state, batch, config, frozen=None):
    logits, _ = logits_and_state(params, model_state, batch["image"], config, train=False)
    label = batch["label"]
    out = {"count": torch.tensor(label.shape[0], device=label.device)}
    grid = probe_grid.active(config)
    if grid:
        logits = list(logits[0].unbind(0))
    for i, z in enumerate(logits):
        suffix = f"_head{i}" if grid else f"_block{i}" if config.probe.features == "blocks" else ""
        for k, v in classify.topk_correct(z, label).items():
            out[k + suffix] = v
        out["loss_sum" + suffix] = F.cross_entropy(z.float(), label, reduction="sum")
    return out


def _unit(sums):
    """"head" (a grid), "block" (per-block probes) or None (one head)."""
    for unit in ("head", "block"):
        if any(k.startswith(f"correct1_{unit}") for k in sums):
            return unit
    return None


def summarize(sums):
    """acc1 / acc5 / loss; per-block probes and grids report each block / head and the best
    (by top-1 on this split; :func:`select` redoes the choice on the held-out split)."""
    n = max(sums.get("count", 0), 1)
    out = {"count": int(sums.get("count", 0))}
    unit = _unit(sums)
    ids = sorted(int(k[len(f"correct1_{unit}"):]) for k in sums if k.startswith(f"correct1_{unit}")) if unit else []
    suffixes = [f"_{unit}{i}" for i in ids] or [""]
    for s in suffixes:
        out["acc1" + s] = 100.0 * sums["correct1" + s] / n
        out["acc5" + s] = 100.0 * sums["correct5" + s] / n
        out["loss" + s] = sums["loss_sum" + s] / n
    if ids:
        best = max(ids, key=lambda i: out[f"acc1_{unit}{i}"])
        out.update({f"best_{unit}": best, "acc1": out[f"acc1_{unit}{best}"],
                    "acc5": out[f"acc5_{unit}{best}"], "loss": out[f"loss_{unit}{best}"]})
    return out


def select(val: dict, held: dict) -> dict:
    """The val metrics with the head (or block) selected on the held-out part of the train
    split (``probe.holdout``), and that one's val accuracy as ``acc1``."""
    unit = "head" if any(k.startswith("acc1_head") for k in held) else \
        "block" if any(k.startswith("acc1_block") for k in held) else None
    if unit is None:  # one head: nothing to select, the holdout accuracy is reported
        return dict(val, holdout_acc1=held.get("acc1"), holdout_count=held.get("count", 0))
    return probe_grid.select(val, held, unit)


def report(config, metrics: dict):
    """Summary entries and a ``results.md`` table of every head of a grid (None without one)."""
    hs = grid_heads(config)
    if hs is None:
        return None
    return probe_grid.report(config, metrics, hs)


def param_rules(config) -> ParamRules:
    """Everything but the classifier(s) is frozen (the references set requires_grad=False
    on all but ``model.head`` / train only the ``LinearClassifier``). LARS exempts 1-D
    tensors from weight decay itself."""
    hs = grid_heads(config)
    if hs is None:
        return ParamRules(frozen=(r"^(?!head\.|linear\.)",))
    lr, wd = probe_grid.rules(config, hs)
    return ParamRules(frozen=(r"^(?!grid\.)",), lr_multipliers=lr, weight_decays=wd)


def batch_extras(gen, config):
    return {}
