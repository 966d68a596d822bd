"""MAE reconstruction grid from any checkpoint and image folder (He et al. 2022, Fig. 2-3;
the reference's demo notebook): one row per image, original | masked | reconstruction |
reconstruction with the visible patches pasted back.

    python -m mim.reconstruct --checkpoint=runs/mae_base --images=photos/ --out=grid.png
    python -m mim.reconstruct --checkpoint=mae_visualize_vit_large.pth --images=photos/ \\
        --out=grid.png --mask_ratio=0.75 --seed=2

``--checkpoint``: a mim checkpoint directory or workdir of an mae_pretrain run (its model
config is read from the checkpoint's meta.json), or an official full MAE ``.pth`` (model
inferred from the shapes). ``--config`` overrides the model and the input normalisation.
Images are resized (shorter side) and centre-cropped to the model's size.
"""
from __future__ import annotations

import json
import os

import ml_collections
import torch
from absl import app, flags
from ml_collections import config_flags

from mim import visualize
from mim.checkpoints import io
from mim.checkpoints import mae as mae_ckpt
from mim.models import mae
from mim.tasks import mae_pretrain

_CKPT = flags.DEFINE_string("checkpoint", None, "mim checkpoint dir / workdir, or official MAE .pth")
_IMAGES = flags.DEFINE_string("images", None, "folder of images (searched recursively)")
_OUT = flags.DEFINE_string("out", "reconstruction.png", "PNG to write")
_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file for the model and "
                                          "normalisation, e.g. experiments/mae_base.py:tiny")
_MASK = flags.DEFINE_float("mask_ratio", None, "fraction of patches removed (default: the model's)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random masks")
_MAX = flags.DEFINE_integer("max_images", 8, "at most this many images (sorted by path)")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _mim_checkpoint_dir(path: str):
    """The checkpoint directory for a mim checkpoint or workdir, else None."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, io.META)):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = io.latest(os.path.join(path, "checkpoints"))
        return found[0] if found else None
    return None


def load_model(path: str, config=None):
    """``(params, model_cfg, mean, std)`` from a mim or official checkpoint."""
    mean, std = visualize.IMAGENET_MEAN, visualize.IMAGENET_STD
    flat = mae_ckpt.read_source(path)
    if mae_ckpt.detect_kind(flat) != "mae":
        raise ValueError(f"{path} holds no MAE decoder (an encoder-only or fine-tuned model); "
                         f"reconstructions need a full pretraining checkpoint")
    cfg = None
    ckpt_dir = _mim_checkpoint_dir(path)
    if config is not None:
        cfg, mean, std = config.model, tuple(config.data.mean), tuple(config.data.std)
    elif ckpt_dir is not None:
        with open(os.path.join(ckpt_dir, io.META)) as f:
            saved = json.load(f)["config"]
        cfg = ml_collections.ConfigDict(saved["model"])
        mean, std = tuple(saved["data"]["mean"]), tuple(saved["data"]["std"])
    params, cfg = mae_ckpt.load_official(flat, cfg, kind="mae", return_config=True)
    return params, cfg, mean, std


def read_images(folder: str, size: int, mean, std, limit: int) -> torch.Tensor:
    from torchvision import transforms as tv

    from mim.data.folder import load_rgb

    paths = sorted(os.path.join(r, f) for r, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    t = tv.Compose([tv.Resize(size, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(size),
                    tv.ToTensor(), tv.Normalize(mean, std)])
    return torch.stack([t(load_rgb(p)) for p in paths])


def make_grid(checkpoint: str, images: str, out: str, config=None, mask_ratio=None, seed: int = 0,
              max_images: int = 8):
    params, cfg, mean, std = load_model(checkpoint, config)
    if mask_ratio is not None:
        cfg = mae.config(**{**cfg.to_dict(), "mask_ratio": mask_ratio})
    x = read_images(images, cfg.img_size, mean, std, max_images)
    noise = mae.noise(torch.Generator().manual_seed(seed), x.shape[0], cfg)
    grid = mae_pretrain.reconstruct(params, x, noise, cfg, mean, std)
    visualize.save_grid(out, grid)
    return grid


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    make_grid(_CKPT.value, _IMAGES.value, _OUT.value, _CONFIG.value, _MASK.value, _SEED.value,
              _MAX.value)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "images"])
    app.run(main)
