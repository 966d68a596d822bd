"""Tasks: what a recipe trains. The step, loop, FSDP, CUDA-graph and checkpoint machinery
is shared; a task says only what is trained and how its loss reads a batch.

A task module defines (``docs/protocol.md`` explains each with examples):

- ``init(config, gen) -> (params, model_state)``: ``params`` are trained by gradient;
  ``model_state`` holds what changes without a gradient (BatchNorm statistics, momentum
  encoders, key queues and their pointers, EMA weights). Both are checkpointed.
- ``loss(params, model_state, batch, config, train, frozen) -> (loss, (model_state, metrics))``:
  once per micro-batch, under ``torch.func.grad_and_value``; functional (returns the new
  ``model_state``); metrics are 0-d tensors. ``frozen`` maps the names of the task's
  frozen networks to their parameter trees on the device (``{}`` when it has none).
- ``evaluate(params, model_state, batch, config, frozen) -> {name: summed tensor}``
  (optional), and ``summarize(sums) -> metrics`` (optional; the default gives acc1 / acc5 /
  loss from correct1, correct5, loss_sum, count).
- ``param_rules(config) -> ParamRules``: what the task freezes. Weight-decay exemptions and
  layer ids are facts of the model (:func:`mim.models.param_rules`); a task adds to them
  only where its recipe differs from the model's own. ``lr_multipliers`` and
  ``weight_decays`` (``(regex, value)`` rules) give names their own lr scale and weight
  decay on top of the config's (a linear-probe grid: one group per head).
- ``validate(config)`` (optional): the task's own config checks, run by
  :func:`mim.config.validate` before any work.
- ``select(val, held) -> metrics`` (optional): the eval metrics with a choice made on the
  held-out part of the train split (``config.probe.holdout``: a linear-probe grid's head);
  ``report(config, metrics) -> (summary entries, results.md text) | None`` (optional): a
  table of the run's results, written to the workdir (:mod:`mim.train.evaluation`).
- ``batch_extras(gen, config) -> {name: tensor}`` (optional): per-sample draws the input
  pipeline makes from the sample's own generator (MAE noise, SimMIM and BEiT masks), so
  the step stays a deterministic function of its batch.
- ``frozen_networks(config) -> {name: Frozen}`` (optional): networks that are inputs to the
  loss and never trained (BEiT's visual tokenizer, a distillation teacher). Loaded once
  (:mod:`mim.train.frozen`), kept out of the optimizer, the FSDP shards and checkpoints;
  a checkpoint records each one's file and SHA-256, and a resume checks them.
- ``update_state_before_step(params, model_state, step, total_steps, config)`` and
  ``update_state_after_step(...)`` (optional): update ``model_state`` in place exactly once
  per optimizer step, whatever ``grad_accum``, inside the (compiled, graphed) step:
  before the gradient of the step (``step`` = optimizer steps done so far; MoBY's
  reference updates its momentum encoder at the start of each forward) or after the
  parameter update (``step`` counts that update; EMA teachers). ``params`` is the whole
  tree in full precision (the fp32 masters under O2, gathered under FSDP).
- ``train_transform(config)`` / ``eval_transform(config)`` (optional): PIL image ->
  ``{key: image}``, several views per image (:class:`mim.data.transforms.MultiView`), and
  ``image_keys(config, train) -> {key: View}``: each image key's side and normalisation.
- ``hooks(setup, writer)`` (optional): an object with ``due(step) -> bool`` and
  ``after_step(step, params, batch, metrics)``, run on every rank after each step that is
  due, with the whole parameter tree (reconstruction pictures).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, Optional, Sequence, Tuple

TASKS = {
    "classify": "mim.tasks.classify",
    "mae_pretrain": "mim.tasks.mae_pretrain",
    "linprobe": "mim.tasks.linprobe",
    "simmim_pretrain": "mim.tasks.simmim_pretrain",
    "beit_pretrain": "mim.tasks.beit_pretrain",
    "moby_pretrain": "mim.tasks.moby_pretrain",
}


@dataclasses.dataclass
class ParamRules:
    num_layers: int = 0
    layer_id: Optional[Callable[[str], int]] = None
    no_decay: Sequence[str] = ()
    frozen: Sequence[str] = ()
    lr_multipliers: Sequence[Tuple[str, float]] = ()   # (regex, factor), after config.optim's
    weight_decays: Sequence[Tuple[str, float]] = ()    # (regex, weight decay) of decaying names


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A network the loss reads but never trains.

    ``weights``: the file named in the config ("" builds it from the run's seed, for tests
    and ``:tiny`` runs; the run says so). ``load(path_or_None, gen) -> tree`` reads the
    file (safetensors or ``torch.load(weights_only=True)``) or initialises it. ``cast``:
    store it in the O2 parameter dtype (bf16/fp16 policies); by default it stays fp32 and
    autocast decides its compute precision. ``fit(images, gen) -> tree``: a network built
    from training images instead (a k-means codebook): with ``weights=""`` it is fitted on
    the batch key ``fit_key`` of the run's first ``fit_images`` training samples and saved
    beside the run (:func:`mim.train.frozen.load`)."""
    weights: str
    load: Callable
    cast: bool = False
    fit: Optional[Callable] = None
    fit_key: str = ""
    fit_images: int = 0


@dataclasses.dataclass(frozen=True)
class View:
    """One image key of a batch: its side in pixels and its normalisation of [0, 1]
    pixels, ``(x - mean) / std`` per channel."""
    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def get(name: str):
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}: must be one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def image_keys(task, config, train: bool = True) -> Dict[str, View]:
    """Every image key of the task's batches, with its size and normalisation."""
    if hasattr(task, "image_keys"):
        return task.image_keys(config, train)
    d = config.data
    return {"image": View(d.image_size, tuple(d.mean), tuple(d.std))}


def frozen_networks(task, config) -> Dict[str, Frozen]:
    return task.frozen_networks(config) if hasattr(task, "frozen_networks") else {}


def model_rules(model_cfg, frozen: Sequence[str] = ()) -> ParamRules:
    """A model's own parameter facts (``mim.models.<name>``: ``no_weight_decay``,
    ``layer_id``, ``num_layers``) as the optimizer's rules, plus what the task freezes."""
    from mim import models
    m = models.get(model_cfg.get("name", "vit"))
    return ParamRules(num_layers=m.num_layers(model_cfg),
                      layer_id=lambda n: m.layer_id(n, model_cfg),
                      no_decay=tuple(m.no_weight_decay(model_cfg)), frozen=tuple(frozen))


def features(task, params, model_state, images, config, blocks: bool = False) -> dict:
    """The encoder features of a task's model: ``task.features`` where the encoder sits
    inside a larger tree (MoBY's online encoder), else the model's own ``features``."""
    if hasattr(task, "features"):
        return task.features(params, model_state, images, config, blocks=blocks)
    from mim import models
    return models.get(config.model.get("name", "vit")).features(params, images, config.model, blocks=blocks)
