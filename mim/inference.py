"""Classifying image files with a trained classifier (:mod:`mim.predict`'s work).

The model, the evaluation transform (resize to ``image_size / crop_pct``, centre crop,
normalise) and the class names come from what the checkpoint records: a mim run (its
``meta.json`` config and the workdir's ``classes.json``, the train split's folder names in
label order), or official weights named in the registry or given with ``--from`` and
``--config`` (1000-class models get the ImageNet-1k names shipped in
``mim/imagenet_classes.txt``).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import List, Optional

import torch

from mim.cli import UsageMistake

log = logging.getLogger(__name__)

IMAGENET_CLASSES = os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")


class PredictError(ValueError, UsageMistake):
    """A mistake in the command line or its files (exit status 2)."""


def imagenet_classes() -> List[str]:
    with open(IMAGENET_CLASSES) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    return [r[1] if len(r) > 1 else r[0] for r in rows]


def _run_classes(checkpoint: str, config) -> Optional[List[str]]:
    """The class names a mim run recorded (``classes.json`` in its workdir), or those of the
    train split of its data folder when an older run recorded none."""
    from mim.checkpoints import io
    from mim.train.loop import CLASSES
    d = os.path.abspath(checkpoint)
    for cand in (d, os.path.dirname(os.path.dirname(d))):   # a workdir, or its checkpoints/step_N
        if os.path.isfile(os.path.join(cand, CLASSES)):
            with open(os.path.join(cand, CLASSES)) as f:
                return list(json.load(f))
    if config is not None and (os.path.isdir(os.path.join(d, "checkpoints")) or os.path.exists(os.path.join(d, io.META))):
        from mim.data import pipeline
        log.warning("%s records no %s (a run from before mim recorded them): the class names are "
                    "the folders of its train split, %s", checkpoint, CLASSES, config.data.path)
        try:
            return list(pipeline.split_info(config, config.data.train_split)[1])
        except Exception as e:  # noqa: BLE001 - reported, never replaced by guesses
            raise PredictError(f"{checkpoint} records no class names ({CLASSES}) and its train split "
                               f"cannot be read ({e})") from e
    return None


def load_classifier(checkpoint: str, fmt: str = "mim", config_spec: str = ""):
    """``(params, model_cfg, data_cfg, classes)`` of a classifier checkpoint."""
    from mim import embed
    from mim.checkpoints import registry
    release = registry.get(checkpoint) if not os.path.exists(checkpoint) else None
    if release is not None and fmt == "mim":
        if not release.experiment:
            raise PredictError(f"{release.name}: no experiment file fits it; pass --from and --config")
        fmt = "timm" if release.format == "timm" else release.format
        config_spec = config_spec or release.experiment
    path = registry.resolve(checkpoint)
    params, cfg, data = embed.load(path, fmt, config_spec)
    n = cfg.get("num_classes", 0)
    if not n:
        raise PredictError(f"{checkpoint}: the model has no classifier head (num_classes=0)")
    classes = _run_classes(path, embed.saved_config(path)) if fmt == "mim" else None
    if classes is None and n == 1000:
        classes = imagenet_classes()
    if classes is None:
        raise PredictError(f"{checkpoint}: no class names recorded for its {n} outputs")
    if len(classes) > n:
        raise PredictError(f"{checkpoint}: {len(classes)} class names for {n} outputs")
    classes = list(classes) + [f"class_{i}" for i in range(len(classes), n)]   # never a target
    return params, cfg, data, classes


def list_images(root: str) -> List[str]:
    from mim.embed import IMAGE_EXTENSIONS
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise PredictError(f"--images={root}: no such file or folder")
    paths = sorted(os.path.join(r, f) for r, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise PredictError(f"--images={root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def predict(checkpoint: str, images: str, topk: int = 5, fmt: str = "mim", config_spec: str = "",
            batch_size: int = 64, device: str = "auto") -> dict:
    """``{"rows": [{"path", "labels", "probs"}], "skipped": [(path, why)], "classes",
    "accuracy": top-1 % over the images whose parent folder is a class name (or None),
    "labelled"}``."""
    from mim import backend, models, tree
    from mim.data import transforms
    from mim.data.folder import load_rgb
    params, cfg, data, classes = load_classifier(checkpoint, fmt, config_spec)
    data = data.copy_and_resolve_references()
    data.device_normalize = False
    transform = transforms.eval_transform(data)
    dev = torch.device(backend.detect_device(device))
    params = tree.to(params, dev, dtype=torch.float32)
    module = models.get(cfg.name)
    k = max(1, min(topk, len(classes)))
    rows, skipped = [], []
    paths = list_images(images)
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            xs, kept = [], []
            for p in paths[i:i + batch_size]:
                try:
                    xs.append(transform(load_rgb(p)))
                    kept.append(p)
                except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                    warnings.warn(f"skipping unreadable image {p}: {type(e).__name__}: {e}")
                    skipped.append((p, f"{type(e).__name__}: {e}"))
            if not xs:
                continue
            logits = module.apply(params, torch.stack(xs).to(dev), cfg, train=False)[0]
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            top_p, top_i = probs.topk(k, dim=-1)
            for p, pi, ii in zip(kept, top_p.tolist(), top_i.tolist()):
                rows.append({"path": os.path.relpath(p, images) if os.path.isdir(images) else p,
                             "labels": [classes[j] for j in ii], "probs": pi})
    index = {c: j for j, c in enumerate(classes)}
    labelled = [r for r in rows if os.path.basename(os.path.dirname(r["path"])) in index]
    correct = sum(r["labels"][0] == os.path.basename(os.path.dirname(r["path"])) for r in labelled)
    accuracy = 100.0 * correct / len(labelled) if labelled else None
    return {"rows": rows, "skipped": skipped, "classes": classes, "accuracy": accuracy,
            "labelled": len(labelled)}


def write(result: dict, out: str) -> None:
    import csv
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    if out.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump({"predictions": result["rows"], "skipped": [{"path": p, "error": e}
                                                                  for p, e in result["skipped"]]}, f, indent=1)
    else:
        k = max((len(r["labels"]) for r in result["rows"]), default=0)
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path"] + [x for j in range(1, k + 1) for x in (f"label{j}", f"prob{j}")])
            for r in result["rows"]:
                w.writerow([r["path"]] + [x for lab, p in zip(r["labels"], r["probs"]) for x in (lab, f"{p:.6f}")])
    os.replace(tmp, out)
