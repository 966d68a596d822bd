"""Pooled encoder features of every image of a folder, for downstream use (k-NN,
retrieval, clustering, a probe trained elsewhere).

    python -m mim.embed --checkpoint=runs/mae_tiny --images=third_party/cifar10-mini/val \\
        --out=val_features.safetensors
    python -m mim.embed --checkpoint=mae_pretrain_vit_base.pth --from=mae \\
        --config=experiments/mae_base.py --images=photos/ --out=photos.npy

``--checkpoint``: a mim run workdir or checkpoint directory (the model, image size and
normalisation come from its saved config), a mim tree file (``python -m mim.convert``),
or official weights with ``--from=FORMAT`` (see ``python -m mim.convert --help``).
Without a saved config, ``--config=experiments/FILE.py[:variant]`` states the model and
the evaluation transform. Any encoder mim has: the model module's
``features(params, x, cfg)["pooled"]`` (a ViT's pre-logits, MAE's class token after the
final norm, Swin's average-pooled last stage, ...).

Images: every image under ``--images``, sorted by path; one level of class folders
(``DIR/<class>/*.jpg``) gives labels (class index in sorted folder order), else labels
are -1. The evaluation transform of the config (resize to ``image_size / crop_pct``,
centre crop, normalise).

Output: ``.safetensors`` with ``features`` (N, C) float32 and ``labels`` (N,) int64, the
paths (relative to ``--images``), class names, checkpoint and model in its metadata
(JSON strings); or ``.npy`` with the features and ``<out>.json`` beside it with the
paths, labels and class names.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import List, Tuple

import numpy as np
import torch
from absl import app, flags

from mim.cli import UsageMistake

FLAGS = flags.FLAGS


class EmbedError(ValueError, UsageMistake):
    """A mistake in the command line (exit status 2)."""


def _define_flags():
    """The command line's flags, defined only when it runs: importing this module leaves
    absl's global flags alone (other mim commands define flags of the same names)."""
    flags.DEFINE_string("checkpoint", None, "mim workdir / checkpoint dir / tree file, or "
                        "official weights with --from")
    flags.DEFINE_string("images", None, "folder of images (class sub-folders give labels)")
    flags.DEFINE_string("out", None, "features file: .safetensors or .npy")
    flags.DEFINE_string("from", "mim", "format of --checkpoint (mim, or an official format)")
    flags.DEFINE_string("config", "", "experiment FILE.py[:variant] for the model and "
                        "transform (required unless the checkpoint saved its config)")
    flags.DEFINE_integer("batch_size", 64, "images per forward")
    flags.DEFINE_string("device", "auto", "auto | cpu | cuda | npu")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(root: str) -> Tuple[List[str], List[int], List[str]]:
    """``(paths, labels, classes)``: labels from one level of class folders, else -1."""
    paths = sorted(os.path.join(r, f) for r, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    rel = [os.path.relpath(p, root) for p in paths]
    depth = {r.count(os.sep) for r in rel}
    if depth == {1}:
        classes = sorted({r.split(os.sep)[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        return paths, [index[r.split(os.sep)[0]] for r in rel], classes
    return paths, [-1] * len(paths), []


def saved_config(path: str):
    """The run config a mim workdir / checkpoint directory saved, else None."""
    import ml_collections

    from mim.checkpoints import io
    if not os.path.isdir(path):
        return None
    ckpt_dir = path
    if not os.path.exists(os.path.join(path, io.META)):
        found = io.latest(os.path.join(path, "checkpoints"))
        if found is None:
            return None
        ckpt_dir = found[0]
    with open(os.path.join(ckpt_dir, io.META)) as f:
        return ml_collections.ConfigDict(json.load(f)["config"])


def load(checkpoint: str, fmt: str = "mim", config_spec: str = ""):
    """``(params, model_cfg, data_cfg)`` for ``checkpoint``."""
    from mim import convert
    from mim.checkpoints import registry
    from mim.sweep import load_config
    checkpoint = registry.resolve(checkpoint)
    config = load_config(config_spec) if config_spec else saved_config(checkpoint)
    if config is None:
        raise EmbedError(f"{checkpoint} records no run config (image size, normalisation): pass "
                         f"--config=experiments/FILE.py[:variant]")
    # A mim checkpoint's own model config wins unless --config states one.
    params, _, model_cfg = convert.read(fmt, checkpoint, config.model if config_spec else None)
    return params, model_cfg, config.data


def encoder_features(params, x: torch.Tensor, cfg) -> torch.Tensor:
    from mim import models
    module = models.get(cfg.name)
    if hasattr(module, "features"):
        return module.features(params, x, cfg)["pooled"]
    return module.apply(params, x, cfg, train=False)[1]["pre_logits"]


def embed(checkpoint: str, images: str, out: str, fmt: str = "mim", config_spec: str = "",
          batch_size: int = 64, device: str = "auto") -> dict:
    """Write the features file; returns ``{"features", "labels", "paths", "classes"}``."""
    from mim import backend, tree
    from mim.data import transforms
    from mim.data.folder import load_rgb
    if not (out.endswith(".safetensors") or out.endswith(".npy")):
        raise EmbedError(f"--out={out}: must end in .safetensors or .npy")
    params, cfg, data = load(checkpoint, fmt, config_spec)
    data = data.copy_and_resolve_references()
    data.device_normalize = False
    transform = transforms.eval_transform(data)
    dev = torch.device(backend.detect_device(device))
    params = tree.to(params, dev, dtype=torch.float32)
    paths, labels, classes = list_images(images)
    feats, kept = [], []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            batch = []
            for j in range(i, min(i + batch_size, len(paths))):
                try:
                    batch.append(transform(load_rgb(paths[j])))
                except Exception as e:  # noqa: BLE001 - PIL raises many kinds; training skips them too
                    warnings.warn(f"skipping unreadable image {paths[j]}: {type(e).__name__}: {e}")
                    continue
                kept.append(j)
            if batch:
                feats.append(encoder_features(params, torch.stack(batch).to(dev), cfg).float().cpu())
    if not feats:
        raise FileNotFoundError(f"no readable images under {images}")
    paths, labels = [paths[j] for j in kept], [labels[j] for j in kept]
    features = torch.cat(feats)
    rel = [os.path.relpath(p, images) for p in paths]
    result = {"features": features, "labels": torch.tensor(labels, dtype=torch.int64),
              "paths": rel, "classes": classes}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".safetensors"):
        import safetensors.torch
        meta = {"paths": json.dumps(rel), "classes": json.dumps(classes),
                "checkpoint": os.path.abspath(checkpoint), "model": cfg.to_json()}
        safetensors.torch.save_file({"features": features.contiguous(), "labels": result["labels"]},
                                    out, metadata=meta)
    else:
        np.save(out, features.numpy())
        with open(out + ".json", "w") as f:
            json.dump({"paths": rel, "labels": labels, "classes": classes,
                       "checkpoint": os.path.abspath(checkpoint)}, f)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    r = embed(FLAGS.checkpoint, FLAGS.images, FLAGS.out, FLAGS["from"].value, FLAGS.config,
              FLAGS.batch_size, FLAGS.device)
    n, c = r["features"].shape
    print(f"wrote {FLAGS.out}: {n} images x {c} features"
          + (f", {len(r['classes'])} classes" if r["classes"] else ""))


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["checkpoint", "images", "out"])
    from mim import cli
    app.run(cli.guard("mim.embed", main))
