"""MoBY pretraining (Xie et al., 2021; SwinTransformer/Transformer-SSL ``moby_main.py``):
an online Swin encoder, projector and predictor trained by a contrastive loss against the
keys of a momentum encoder and projector on two asymmetric views of each image, with two
key queues (:mod:`mim.models.moby`).

Where the reference's state lives here:

- the momentum encoder and projector, the queues, their pointer and every BatchNorm's
  statistics are ``model_state`` (checkpointed and resumed with the parameters);
- the momentum update runs in ``update_state_before_step``, once per optimizer step before
  its gradient, with ``step`` = optimizer steps done and ``total_steps`` = the run's length:
  the reference updates at the start of each forward with its counter ``k`` and
  ``K = steps per epoch * epochs``. Its ``k`` starts from ``START_EPOCH`` computed before
  the checkpoint is loaded, so after an automatic resume its schedule restarts at 0.99;
  here the counter is the train state's step, so a resumed run continues the schedule;
- the two views are ``image`` and ``image2`` (:mod:`mim.data.ssl_views`).

The step averages the per-rank losses' gradients as DDP does; the BatchNorm statistics
are those of the global batch (SyncBatchNorm) and the keys of every rank enter the queues,
so the queue length must be a multiple of the global batch of one micro-batch
(``batch_size / grad_accum``; the reference asserts the same of its global batch).

``evaluate`` reports the same loss on the eval split with fixed views (the eval sampler
seeds every image from its index), BatchNorm in inference mode and the queues left as they
are; the k-NN evaluator (``config.knn_every``) reads the online encoder's pooled features.
"""
from __future__ import annotations

import torch

from mim.checkpoints import moby as moby_ckpt
from mim.config import ConfigError
from mim.data import ssl_views
from mim.models import moby
from mim.tasks import ParamRules, View, model_rules


def check(config) -> None:
    """What :func:`mim.config.validate` cannot see inside a MoBY config."""
    m = config.model
    if m.get("name") != "moby":
        raise ConfigError(f"config.model.name: moby_pretrain needs a MoBY model "
                          f"(mim.models.moby.config), got {m.get('name')!r}")
    try:
        moby.validate(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if m.encoder.img_size != config.data.image_size:
        raise ConfigError(f"config.model.encoder.img_size: {m.encoder.img_size} differs from "
                          f"data.image_size={config.data.image_size}")
    keys = config.batch_size // config.grad_accum
    if m.contrast_num_negative % keys:
        raise ConfigError(
            f"config.model.contrast_num_negative: {m.contrast_num_negative} is not a multiple of "
            f"the {keys} keys each step enqueues (batch_size {config.batch_size} / grad_accum "
            f"{config.grad_accum}); the queue takes whole global batches (moby.py asserts it)")


def init(config, gen: torch.Generator):
    """Fresh parameters and state, or, with ``init.format='moby'``, the momentum branch,
    queues, pointer and BatchNorm statistics of that checkpoint (its parameters are read
    by the loop through :func:`mim.checkpoints.moby.load_for_finetune`)."""
    check(config)
    params, model_state = moby.init(gen, config.model)
    if config.init.checkpoint and config.init.format == "moby":
        from mim.checkpoints import registry
        _, model_state = moby_ckpt.load_official(registry.resolve(config.init.checkpoint), config.model)
    return params, model_state


def update_state_before_step(params, model_state, step, total_steps: int, config) -> None:
    """The reference's ``_momentum_update_key_encoder`` at ``k = step``, ``K = total_steps``."""
    m = moby.momentum(step, total_steps, config.model.contrast_momentum)
    moby.momentum_update_(params, model_state, m)


def _metrics(aux):
    """Per image, the mean cosine of each view's prediction with the other view's key
    (the positive logits times the temperature)."""
    return 0.5 * ((aux["pred_1"] * aux["key_2"]).sum(1) + (aux["pred_2"] * aux["key_1"]).sum(1))


def loss(params, model_state, batch, config, train: bool, frozen=None):
    value, (model_state, aux) = moby.forward(params, model_state, batch["image"], batch["image2"],
                                             config.model, train=train)
    return value, (model_state, {"positive_cosine": _metrics(aux).mean().detach()})


def evaluate(params, model_state, batch, config, frozen=None):
    value, (_, aux) = moby.forward(params, model_state, batch["image"], batch["image2"],
                                   config.model, train=False)
    n = batch["image"].shape[0]
    return {"loss_sum": value.double() * n, "positive_cosine_sum": _metrics(aux).double().sum(),
            "count": torch.tensor(n, device=value.device)}


def summarize(sums):
    n = max(sums.get("count", 0), 1)
    return {"loss": sums["loss_sum"] / n, "positive_cosine": sums["positive_cosine_sum"] / n,
            "count": int(sums.get("count", 0))}


def param_rules(config) -> ParamRules:
    """The model's rules: weight decay on every weight matrix (the reference decays all
    but 1-D tensors and biases, relative position bias tables included); nothing frozen
    (the momentum branch is state, not a parameter)."""
    return model_rules(config.model)


def features(params, model_state, images, config, blocks: bool = False):
    """The online encoder's features (k-NN; ``moby_linear.py`` evaluates this encoder)."""
    return moby.features(params, images, config.model, blocks=blocks)


def image_keys(config, train: bool = True):
    d = config.data
    view = View(d.image_size, tuple(d.mean), tuple(d.std))
    return {key: view for key in ssl_views.KEYS}


def train_transform(config):
    return ssl_views.train_transform(config)


def eval_transform(config):
    """The same two views, drawn from each eval image's fixed seed."""
    return ssl_views.train_transform(config)


def batch_extras(gen, config):
    return {}
