"""ImageNet folder layout: ``root/<split>/<class>/<image>``, any image size.

Each sample is drawn with its own seed, so its augmentation (and any mask the
task draws for it) depends on (run seed, epoch, index) only: not on the number of
workers, ranks, or where a resumed run restarted.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import warnings
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used: missing, empty, or inconsistent with the model."""


def split_dir(root: str, split: str) -> str:
    path = os.path.join(os.path.expanduser(root), split)
    if not os.path.isdir(path):
        raise DatasetError(f"dataset split not found: {path} (expected <root>/{split}/<class>/<images>; "
                           f"set --config.data.path)")
    return path


def load_rgb(path) -> Image.Image:
    """Decode and convert any mode (L, LA, P, CMYK, RGBA, I;16) to 8-bit RGB; ``path``
    may also be an open binary file."""
    with (open(path, "rb") if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path)) as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits before conversion instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators: a sample's transform draws from them."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def finish_sample(img, label: int, seed: int, transform: Callable, extras=None,
                  skipped: int = 0) -> Dict[str, torch.Tensor]:
    """A decoded (or, for ``data.decode='device'``, encoded) image through the transform,
    with its label, skipped-file count and per-sample extras: the one path every format's
    reader (folder, tar shards, Hugging Face rows) feeds, so tasks, views and masks never
    depend on where the bytes came from."""
    out = transform(img)
    out = dict(out) if isinstance(out, dict) else {"image": out}
    out.update(label=torch.tensor(label), skipped=torch.tensor(skipped))
    if extras is not None:
        out.update(extras(torch.Generator().manual_seed(seed)))
    return out


def decode_bytes(raw: bytes) -> Image.Image:
    """An image file's bytes to RGB (the worker's read for ``data.decode='worker'``)."""
    return load_rgb(io.BytesIO(raw))


class ImageFolder(torch.utils.data.Dataset):
    """Items are ``(index, seed)`` pairs from the samplers in :mod:`mim.data.sampler`, or
    ``(index, seed, False)`` from the evaluation sampler: an unreadable file then gives
    ``None`` (dropped and counted by the collate function) instead of the next readable
    image, so that evaluation scores every readable image exactly once.

    ``read(path)`` opens a file (default: decode to RGB with PIL); ``transform`` maps what
    it returns to the sample's image, or to a dict of entries that include ``image``."""

    def __init__(self, root: str, split: str, transform: Callable,
                 extras: Optional[Callable[[torch.Generator], Dict[str, torch.Tensor]]] = None,
                 read: Callable[[str], object] = load_rgb):
        self.root = split_dir(root, split)
        try:
            self.classes, self.class_to_idx = find_classes(self.root)
        except FileNotFoundError as e:
            raise DatasetError(f"no class folders in {self.root}: {e}") from None
        self.samples = make_dataset(self.root, self.class_to_idx, extensions=IMG_EXTENSIONS,
                                    allow_empty=True)
        if not self.samples:
            raise DatasetError(f"no images with extensions {IMG_EXTENSIONS} under {self.root}")
        self.transform = transform
        self.extras = extras
        self.read = read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Tuple[int, ...]) -> Optional[Dict[str, torch.Tensor]]:
        index, seed, *rest = item
        substitute = rest[0] if rest else True
        seed_all(seed)
        skipped = 0
        # A file that cannot be decoded is skipped (with a warning and a count in the
        # metrics) in favour of the next one, so one bad JPEG never stops a run.
        for attempt in range(len(self.samples) if substitute else 1):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.read(path)
                break
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {type(e).__name__}: {e}")
        else:
            if not substitute:
                return None
            raise DatasetError(f"no readable image in {self.root}")
        return finish_sample(img, label, seed, self.transform, self.extras, skipped)
