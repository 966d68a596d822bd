"""Write an ImageNet-style folder as WebDataset tar shards (``data.format='wds'``).

    python -m mim.data.shards --images=/data/imagenet --out=/data/in1k-wds [--shard_size=1GB]

For each split (``--splits``, default train and val) the images are taken in the folder
reader's order (sorted classes, sorted files), so sample ``i`` of the shards is image ``i``
of the folder: the same per-sample seeds, the same augmentations. Sample ``i`` is the
members ``<i>.<ext>`` (the file's own bytes: a JPEG stays the JPEG it was, so
``data.decode='device'`` decodes it on the accelerator) and ``<i>.cls`` (the class index).
Files in other formats (BMP, TIFF, ...) are re-encoded as PNG, losslessly.

Beside the shards: ``classes.json`` (the class names, index order) and ``info.json``
(each split's shard names and sample counts, which the reader uses instead of counting).
A shard is written under a temporary name and renamed when complete; an interrupted run
started again with the same arguments keeps the finished shards and writes the others.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from typing import List, Tuple

from absl import app, flags
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mim.data.folder import DatasetError, split_dir
from mim.data.wds import CLASSES, INFO

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "folder with <split>/<class>/<image> files")
flags.DEFINE_string("out", None, "folder to write the shards to")
flags.DEFINE_string("shard_size", "1GB", "largest shard (bytes; KB, MB, GB or KiB, MiB, GiB)")
flags.DEFINE_list("splits", ["train", "val"], "splits to write")

KEEP = (".jpg", ".jpeg", ".png", ".webp")
PLAN = ".mim-shards.json"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--shard_size={text!r} is not a size such as 1GB or 512MiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "KIB": 2 ** 10,
             "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ValueError(f"--shard_size={text!r} must be positive")
    return size


def _tar_bytes(n: int) -> int:
    return 512 + (n + 511) // 512 * 512        # header + data padded to 512-byte blocks


def plan(files: List[Tuple[str, int]], shard_size: int) -> List[List[int]]:
    """Sample indices per shard: consecutive, each shard at most ``shard_size`` bytes of
    tar (a single larger sample gets a shard of its own)."""
    shards, current, used = [], [], 0
    for i, (path, _) in enumerate(files):
        size = _tar_bytes(os.path.getsize(path)) + _tar_bytes(8)
        if current and used + size > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        shards.append(current)
    return shards


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _image(path: str) -> Tuple[str, bytes]:
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if ext in KEEP:
        return ("jpg" if ext == ".jpeg" else ext[1:]), raw
    buf = io.BytesIO()
    Image.open(io.BytesIO(raw)).save(buf, format="PNG")
    return "png", buf.getvalue()


def write_split(images: str, out: str, split: str, class_to_idx, shard_size: int,
                progress=None) -> dict:
    """Write one split's shards; returns ``{shard name: samples}``."""
    root = split_dir(images, split)
    files = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not files:
        raise DatasetError(f"no images under {root}")
    groups = plan(files, shard_size)
    width = max(6, len(str(len(groups) - 1)))
    listed = {}
    for k, idx in enumerate(groups):
        name = f"{split}-{k:0{width}d}.tar"
        listed[name] = len(idx)
        final = os.path.join(out, name)
        if not os.path.exists(final):
            tmp = final + ".tmp"
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in idx:
                    path, label = files[i]
                    ext, raw = _image(path)
                    _member(tar, f"{i:08d}.{ext}", raw)
                    _member(tar, f"{i:08d}.cls", str(label).encode())
            os.replace(tmp, final)
        if progress is not None:
            progress.update(len(idx))
    return listed


def write(images: str, out: str, shard_size: int, splits=("train", "val")) -> dict:
    """All splits, ``classes.json`` and ``info.json``; returns the info."""
    classes, class_to_idx = find_classes(split_dir(images, splits[0]))
    os.makedirs(out, exist_ok=True)
    # The plan's identity: a rerun with other arguments must not mix its shards with these.
    key = hashlib.sha256(json.dumps([os.path.abspath(images), shard_size, list(splits)]).encode()).hexdigest()
    plan_file = os.path.join(out, PLAN)
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            if json.load(f).get("key") != key:
                raise DatasetError(f"{out} holds shards written with other arguments; use a new --out")
    else:
        with open(plan_file, "w") as f:
            json.dump({"key": key}, f)
    total = 0
    for split in splits:
        total += len(make_dataset(split_dir(images, split), class_to_idx, extensions=IMG_EXTENSIONS,
                                  allow_empty=True))
    from tqdm import tqdm
    info = {}
    with tqdm(total=total, unit="img", desc=f"shards -> {out}", file=sys.stderr) as bar:
        for split in splits:
            for cls in find_classes(split_dir(images, split))[0]:
                if cls not in class_to_idx:
                    raise DatasetError(f"class {cls!r} of split {split!r} is not in split {splits[0]!r}")
            info[split] = write_split(images, out, split, class_to_idx, shard_size, bar)
    with open(os.path.join(out, CLASSES), "w") as f:
        json.dump(classes, f)
    with open(os.path.join(out, INFO), "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(argv):
    del argv
    if not FLAGS.images or not FLAGS.out:
        raise app.UsageError("give --images=ROOT and --out=DIR")
    try:
        info = write(FLAGS.images, FLAGS.out, parse_size(FLAGS.shard_size), tuple(FLAGS.splits))
    except (DatasetError, ValueError) as e:
        sys.exit(f"error: {e}")
    for split, shards in info.items():
        print(f"{split}: {sum(shards.values())} images in {len(shards)} shard(s)")


if __name__ == "__main__":
    app.run(main)
