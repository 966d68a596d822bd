"""Reconstruction grid from any MAE or SimMIM pretraining checkpoint and an image folder
(MAE: He et al. 2022, Fig. 2-3, the reference's demo notebook; SimMIM: Xie et al. 2022,
Fig. 5): one row per image, original | masked | reconstruction | reconstruction with the
visible patches pasted back.

    python -m mim.reconstruct --checkpoint=runs/mae_base --images=photos/ --out=grid.png
    python -m mim.reconstruct --checkpoint=mae_visualize_vit_large.pth --images=photos/ \\
        --out=grid.png --mask_ratio=0.75 --seed=2
    python -m mim.reconstruct --checkpoint=runs/simmim_swin_base --images=photos/

``--checkpoint``, one of the layouts in :data:`LAYOUTS`: a mim checkpoint directory or
workdir of an ``mae_pretrain`` or ``simmim_pretrain`` run (its model config is read from
the checkpoint's meta.json), an official full MAE ``.pth`` (model inferred from the
shapes), or an official SimMIM pretraining ``.pth`` with ``--config``. ``--config``
overrides the model and the input normalisation. Images are resized (shorter side) and
centre-cropped to the model's size; files that cannot be decoded are skipped with a
warning and counted, as training does.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import List, Tuple

import ml_collections
import torch
from absl import app, flags
from ml_collections import config_flags

from mim import visualize
from mim.checkpoints import io
from mim.checkpoints import mae as mae_ckpt
from mim.data import masks
from mim.models import mae, simmim
from mim.tasks import mae_pretrain, simmim_pretrain

FLAGS = flags.FLAGS


def _define_flags():
    """The command line's flags, defined only when it runs: importing this module leaves
    absl's global flags alone (other mim commands define flags of the same names)."""
    flags.DEFINE_string("checkpoint", None, "mim checkpoint dir / workdir, official MAE .pth, "
                        "or official SimMIM .pth (with --config)")
    flags.DEFINE_string("images", None, "folder of images (searched recursively)")
    flags.DEFINE_string("out", "reconstruction.png", "PNG to write")
    config_flags.DEFINE_config_file("config", None, "experiment file for the model and "
                                    "normalisation, e.g. experiments/mae_base.py:tiny")
    flags.DEFINE_float("mask_ratio", None, "fraction of patches removed (default: the model's)")
    flags.DEFINE_integer("seed", 0, "seed of the random masks")
    flags.DEFINE_integer("max_images", 8, "at most this many images (sorted by path)")


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

LAYOUTS = (
    "a mim mae_pretrain checkpoint directory or workdir",
    "a mim simmim_pretrain checkpoint directory or workdir",
    "an official MAE pretraining .pth (mask_token, decoder_* keys; the model is read from the shapes)",
    "an official SimMIM pretraining .pth (encoder.*, decoder.0.* keys) with --config naming its "
    "experiment file",
)


def _mim_checkpoint_dir(path: str):
    """The checkpoint directory for a mim checkpoint or workdir, else None."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, io.META)):
        return path
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = io.latest(os.path.join(path, "checkpoints"))
        return found[0] if found else None
    return None


def _tuples(x):
    # JSON turns the config's tuples (Swin depths, crop sizes) into lists.
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(x) if isinstance(x, list) else x


def _is_simmim(flat) -> bool:
    return "decoder.0.weight" in flat and any(k.startswith("encoder.") for k in flat)


def _unknown_layout(path: str, flat) -> ValueError:
    listed = "; ".join(f"({i + 1}) {x}" for i, x in enumerate(LAYOUTS))
    return ValueError(f"{path}: not a pretraining checkpoint this command can draw (keys "
                      f"{sorted(flat)[:6]} ...). Accepted: {listed}")


def load_model(path: str, config=None):
    """``(kind, params, model_cfg, mean, std, image_size)`` from a mim or official
    checkpoint; ``kind`` is "mae" or "simmim"."""
    mean, std = visualize.IMAGENET_MEAN, visualize.IMAGENET_STD
    flat = mae_ckpt.read_source(path)
    ckpt_dir = _mim_checkpoint_dir(path)
    saved = None
    if ckpt_dir is not None:
        with open(os.path.join(ckpt_dir, io.META)) as f:
            saved = json.load(f)["config"]
    if config is not None:
        cfg, mean, std = config.model, tuple(config.data.mean), tuple(config.data.std)
        size = config.data.image_size
    elif saved is not None:
        cfg = ml_collections.ConfigDict(_tuples(saved["model"]))
        mean, std = tuple(saved["data"]["mean"]), tuple(saved["data"]["std"])
        size = saved["data"]["image_size"]
    else:
        cfg, size = None, None
    if _is_simmim(flat):
        if cfg is None:
            raise ValueError(f"{path}: a SimMIM checkpoint without a mim run's meta.json; name its "
                             f"model with --config=experiments/simmim_swin_base.py (or the file it "
                             f"was trained with)")
        if cfg.get("name") != "simmim":
            raise ValueError(f"{path} holds a SimMIM model but the config's model is "
                             f"{cfg.get('name')!r}; pass the SimMIM pretraining experiment")
        expected = set(simmim_pretrain_keys(cfg))
        missing, unexpected = sorted(expected - set(flat)), sorted(set(flat) - expected)
        if missing or unexpected:
            raise ValueError(f"{path} does not match the SimMIM config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        from mim import tree
        return "simmim", tree.unflatten({k: flat[k] for k in expected}), cfg, mean, std, size
    try:
        kind = mae_ckpt.detect_kind(flat)
    except ValueError:
        raise _unknown_layout(path, flat) from None
    if kind != "mae":
        raise ValueError(f"{path} holds no MAE decoder (an encoder-only or fine-tuned model); "
                         f"reconstructions need a full pretraining checkpoint. Accepted: "
                         + "; ".join(LAYOUTS))
    params, cfg = mae_ckpt.load_official(flat, cfg, kind="mae", return_config=True)
    return "mae", params, cfg, mean, std, cfg.img_size


def simmim_pretrain_keys(cfg) -> List[str]:
    """The parameter names of a SimMIM model of ``cfg`` (shapes from a fresh init)."""
    from mim import tree
    return list(tree.flatten(simmim.init(torch.Generator().manual_seed(0), cfg)))


def image_paths(folder: str) -> List[str]:
    paths = sorted(os.path.join(r, f) for r, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths


def read_images(folder: str, size: int, mean, std, limit: int) -> Tuple[torch.Tensor, int]:
    """The first ``limit`` readable images (by path), resized and centre-cropped, and the
    number of files before them (or among all, when fewer are readable) that were skipped
    because they could not be decoded."""
    from torchvision import transforms as tv

    from mim.data.folder import load_rgb

    t = tv.Compose([tv.Resize(size, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(size),
                    tv.ToTensor(), tv.Normalize(mean, std)])
    images, skipped = [], 0
    for p in image_paths(folder):
        if len(images) == limit:
            break
        try:
            img = load_rgb(p)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            skipped += 1
            warnings.warn(f"skipping unreadable image {p}: {type(e).__name__}: {e}")
            continue
        images.append(t(img))
    if not images:
        raise FileNotFoundError(f"none of the {skipped} image files under {folder} could be read")
    return torch.stack(images), skipped


def make_grid(checkpoint: str, images: str, out: str, config=None, mask_ratio=None, seed: int = 0,
              max_images: int = 8, return_skipped: bool = False):
    from mim.checkpoints import registry
    kind, params, cfg, mean, std, size = load_model(registry.resolve(checkpoint), config)
    gen = torch.Generator().manual_seed(seed)
    if kind == "mae":
        if mask_ratio is not None:
            cfg = mae.config(**{**cfg.to_dict(), "mask_ratio": mask_ratio})
        x, skipped = read_images(images, cfg.img_size, mean, std, max_images)
        noise = mae.noise(gen, x.shape[0], cfg)
        grid = mae_pretrain.reconstruct(params, x, noise, cfg, mean, std)
    else:
        ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
        x, skipped = read_images(images, size, mean, std, max_images)
        # The masks the pipeline draws for SimMIM (data_simmim.MaskGenerator), per image.
        mask = masks.simmim_masks(gen, x.shape[0], input_size=size, mask_patch_size=cfg.mask_patch_size,
                                  model_patch_size=simmim.patch_size(cfg), mask_ratio=ratio)
        run = ml_collections.ConfigDict({"model": cfg, "data": {"mean": mean, "std": std}})
        grid = simmim_pretrain.reconstruct(params, x, mask, run)
    visualize.save_grid(out, grid)
    return (grid, skipped) if return_skipped else grid


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    grid, skipped = make_grid(FLAGS.checkpoint, FLAGS.images, FLAGS.out, FLAGS.config,
                              FLAGS.mask_ratio, FLAGS.seed, FLAGS.max_images, return_skipped=True)
    note = f"; skipped {skipped} unreadable file(s)" if skipped else ""
    print(f"wrote {FLAGS.out}{note}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["checkpoint", "images"])
    from mim import cli
    app.run(cli.guard("mim.reconstruct", main))
