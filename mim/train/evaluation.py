"""Evaluation: the eval split's metrics during training, ``mode=eval`` and ``mode=knn``."""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist

from mim import tasks, tree
from mim.checkpoints import io as ckpt
from mim.checkpoints import weights
from mim.data import pipeline
from mim.train import knn
from mim.train import metrics as metrics_lib
from mim.train.setup import Setup

EVAL_RESULTS = "eval_results.json"
RESULTS = "results.md"          # a task's own table (write_report)


def evaluate(setup: Setup, params, model_state, loader=None) -> Dict[str, float]:
    """The task's evaluation over the eval split, and ``skipped_images``: the files that
    could not be read (each skipped, never replaced by another image)."""
    c, be, task = setup.config, setup.be, setup.task
    if loader is None:
        loader, _ = pipeline.eval_loader(c, be, task)
    sums: Dict[str, torch.Tensor] = {"skipped": torch.zeros((), dtype=torch.float64, device=be.device)}
    views = tasks.image_keys(task, c, train=False)
    keys = tuple(views)
    with torch.no_grad():
        for batch in loader:
            if set(batch) == {"skipped"}:       # every file of this batch was unreadable
                sums["skipped"] += float(batch["skipped"])
                continue
            batch = pipeline.to_device(batch, be.device, c.data, train=False, views=views)
            sums["skipped"] += batch.pop("skipped").double()
            batch = be.cast_inputs(batch, keys)
            with be.autocast():
                out = task.evaluate(params, model_state, batch, c, setup.frozen)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.double()
    names = sorted(sums)
    shapes = {n: tuple(sums[n].shape) for n in names}
    if be.distributed:
        # A rank whose share of a small split is empty has no sums: agree on names and shapes.
        everyone = [None] * be.world_size
        dist.all_gather_object(everyone, shapes)
        for other in everyone:
            shapes.update(other)
        names = sorted(shapes)
    v = torch.cat([(sums[n] if n in sums else torch.zeros(shapes[n], dtype=torch.float64, device=be.device))
                   .reshape(-1) for n in names])
    if be.distributed:
        dist.all_reduce(v)
    # scalars as floats; a vector sum (a histogram) as a list
    s, at = {}, 0
    for n in names:
        size = max(1, int(torch.tensor(shapes[n]).prod())) if shapes[n] else 1
        part = v[at:at + size]
        s[n] = part.item() if not shapes[n] else part.view(shapes[n]).tolist()
        at += size
    skipped = int(round(s.pop("skipped")))
    out = task.summarize(s) if hasattr(task, "summarize") else _classification_summary(s)
    classes = [n for n in (len(getattr(loader.dataset, "classes", ())), c.model.get("num_classes", 0)) if n]
    if classes and min(classes) < 5:
        out.pop("acc5", None)       # with fewer than 5 classes every image is in the top 5
    out["skipped_images"] = skipped
    return out


def evaluate_all(setup: Setup, params, model_state) -> Dict[str, float]:
    """:func:`evaluate` on the eval split and, with a held-out part of the train split
    (``config.probe.holdout``), on it too: the task's ``select(val, held)`` chooses on the
    held-out metrics (a linear-probe grid's head), else they are added as ``holdout_*``."""
    out = evaluate(setup, params, model_state)
    loader = pipeline.holdout_loader(setup.config, setup.be, setup.task)
    if loader is None:
        return out
    held = evaluate(setup, params, model_state, loader=loader)
    if hasattr(setup.task, "select"):
        return setup.task.select(out, held)
    return dict(out, **{f"holdout_{k}": v for k, v in held.items() if k in ("acc1", "acc5", "loss", "count")})


def write_report(task, config, workdir: str, metrics: Dict[str, float]) -> dict:
    """The task's ``report(config, metrics) -> (summary entries, results.md text)`` (a
    linear-probe grid's table of heads): writes ``<workdir>/results.md`` and returns the
    entries for ``summary.json`` ({} when the task has none)."""
    got = task.report(config, metrics) if hasattr(task, "report") and metrics else None
    if got is None:
        return {}
    extra, text = got
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, RESULTS), "w") as f:
        f.write(text)
    return extra


def _classification_summary(s):
    n = max(s.get("count", 0), 1)
    out = {"count": int(s.get("count", 0))}
    if "correct1" in s:
        out["acc1"] = 100.0 * s["correct1"] / n
        out["acc5"] = 100.0 * s["correct5"] / n
    if "loss_sum" in s:
        out["loss"] = s["loss_sum"] / n
    return out


def load_for_eval(setup: Setup):
    """``(params, model_state, source)`` on the device: ``init.checkpoint`` or the workdir's
    latest checkpoint."""
    c, be = setup.config, setup.be
    params, model_state = setup.task.init(c, torch.Generator().manual_seed(c.seed))
    if c.init.checkpoint:
        params = setup.load_init(params)
        source = c.init.checkpoint
    else:
        found = ckpt.latest(setup.ckpt_root)
        if found is None:
            raise FileNotFoundError(f"mode={c.mode} needs --config.init.checkpoint or a checkpoint in "
                                    f"{setup.ckpt_root}")
        source = found[0]
        saved = ckpt.load_tensors(source)
        params = weights.merge_into(params, {k[7:]: v for k, v in saved.items() if k.startswith("params.")},
                                    source=source)
        ms = {k[12:]: v for k, v in saved.items() if k.startswith("model_state.")}
        if ms:
            model_state = tree.unflatten(ms)
    return tree.to(params, be.device), tree.to(model_state, be.device), source


def eval_line(result: Dict[str, float]) -> str:
    """``Acc@1 80.123 Acc@5 95.000 loss 0.8123`` as the references' eval scripts print it;
    a task without accuracies (a pretraining loss, BEiT's token accuracy) shows what it has."""
    names = {"acc1": "Acc@1 {:.3f}", "acc5": "Acc@5 {:.3f}", "loss": "loss {:.4f}"}
    shown = [names[k].format(result[k]) for k in names if k in result]
    shown += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
              if k not in names and k not in ("count", "skipped_images") and isinstance(v, (int, float))]
    return " ".join(shown)


def evaluate_only(config, workdir: str) -> Dict[str, float]:
    """``--config.mode=eval``: evaluate ``init.checkpoint`` or the workdir's latest
    checkpoint on the eval split and print Acc@1 / Acc@5, as the references' eval scripts;
    the result is also written to ``<workdir>/eval_results.json``."""
    setup = Setup(config, workdir)
    params, model_state, source = load_for_eval(setup)
    result = evaluate_all(setup, params, model_state)
    if setup.be.is_main:
        result = dict(result, **write_report(setup.task, config, workdir, result))
        skipped = f", {result['skipped_images']} unreadable skipped" if result.get("skipped_images") else ""
        print(f"* {eval_line(result)} ({result['count']} images{skipped}, {source})", flush=True)
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, EVAL_RESULTS)
        metrics_lib.write_json(path, {"source": os.path.abspath(source), "split": config.data.eval_split,
                                      **result})
        print(f"wrote {path}", flush=True)
    return result


def knn_only(config, workdir: str) -> Dict[str, float]:
    """``--config.mode=knn``: weighted k-NN accuracy (:mod:`mim.train.knn`) of the encoder
    features of ``init.checkpoint`` or the workdir's latest checkpoint."""
    setup = Setup(config, workdir)
    params, model_state, source = load_for_eval(setup)
    result = knn.evaluate(setup, params, model_state)
    if setup.be.is_main:
        print(f"* k-NN (k={config.knn.k}, T={config.knn.temperature}) Acc@1 {result['acc1']:.3f}"
              + (f" Acc@5 {result['acc5']:.3f}" if "acc5" in result else "")
              + f" ({result['count']} images against {result['train_images']}, {source})", flush=True)
    return result
