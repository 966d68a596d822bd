"""Hugging Face datasets (``data.format='hf'``): ``data.path`` is a folder written by
``Dataset(Dict).save_to_disk`` or anything ``datasets.load_dataset`` takes (a hub name, a
folder of Parquet files); ``data.train_split`` / ``data.eval_split`` name its splits and
``data.hf_image_column`` / ``data.hf_label_column`` the columns of the image (an ``Image``
feature or raw file bytes) and of the class index.

Without streaming the rows are random-access (Arrow, memory-mapped) and read exactly as
image files are (:class:`ImageRows` takes the folder reader's ``(index, seed)`` items), so
a dataset whose rows are the folder's files in the folder's order gives the same run,
bitwise. With ``data.hf_streaming`` the dataset's shards (its data files) are read as a
stream (:mod:`mim.data.streams`), for datasets larger than the disk; their row counts are
counted once before training, reading the label column only.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from mim.data.folder import DatasetError, finish_sample, seed_all


def _load(path: str, split: str, streaming: bool):
    import datasets
    local = os.path.expanduser(path)
    try:
        if os.path.isdir(local) and any(os.path.isfile(os.path.join(local, f)) for f in
                                        ("dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"Hugging Face dataset {path} has no split {split!r} "
                                       f"(it has {sorted(ds)})")
                ds = ds[split]
            if streaming:
                # contiguous row ranges as the stream's shards: enough of them for 256 ranks x
                # workers to read whole shards (counting their rows costs ~10 ms each)
                ds = ds.to_iterable_dataset(num_shards=min(len(ds), max(len(ds.cache_files), 256)))
            return ds
        return datasets.load_dataset(path, split=split, streaming=streaming)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - hub, file system and format errors of all kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DatasetError(f"cannot load Hugging Face dataset {path!r} split {split!r}: "
                           f"{type(e).__name__}: {msg}") from None


def _columns(ds, path: str, image_col: str, label_col: str):
    import datasets
    features = ds.features
    if features is None:
        raise DatasetError(f"Hugging Face dataset {path!r} declares no columns")
    for name, field in (("hf_image_column", image_col), ("hf_label_column", label_col)):
        if field not in features:
            raise DatasetError(f"config.data.{name}: {field!r} is not a column of {path!r} "
                               f"(columns: {sorted(features)})")
    ds = ds.select_columns([image_col, label_col])
    if isinstance(features[image_col], datasets.Image):
        # the file's own bytes, decoded by the same path as an image file's
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
    label = features[label_col]
    names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
    return ds, names


def image_bytes(value) -> bytes:
    """An image cell (``{'bytes', 'path'}`` of an undecoded ``Image`` feature, or bytes)
    as the file's bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    raise ValueError(f"not an image cell: {type(value).__name__}")


class ImageRows(torch.utils.data.Dataset):
    """A split's rows, read like :class:`mim.data.folder.ImageFolder`'s files: items are
    ``(index, seed)`` (training: an unusable row is replaced by the next) or ``(index,
    seed, False)`` (evaluation: None, dropped and counted)."""

    streamed = False

    def __init__(self, path: str, split: str, image_col: str, label_col: str,
                 transform: Callable, extras=None, read: Callable = None):
        ds = _load(path, split, streaming=False)
        self.rows, names = _columns(ds, path, image_col, label_col)
        if len(self.rows) == 0:
            raise DatasetError(f"Hugging Face dataset {path!r} split {split!r} has no rows")
        self.image_col, self.label_col = image_col, label_col
        self.classes = names or [str(i) for i in range(max(self.rows[label_col]) + 1)]
        self.root = f"{path}[{split}]"
        self.transform, self.extras, self.read = transform, extras, read

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        index, seed, *rest = item
        substitute = rest[0] if rest else True
        seed_all(seed)
        skipped = 0
        for attempt in range(len(self.rows) if substitute else 1):
            i = (index + attempt) % len(self.rows)
            row = self.rows[i]
            try:
                if row[self.label_col] is None:
                    raise ValueError("no label")
                img, label = self.read(image_bytes(row[self.image_col])), int(row[self.label_col])
                break
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                skipped += 1
                warnings.warn(f"skipping row {i} of {self.root}: {type(e).__name__}: {e}")
        else:
            if not substitute:
                return None
            raise DatasetError(f"no readable row in {self.root}")
        return finish_sample(img, label, seed, self.transform, self.extras, skipped)


class StreamShards:
    """A streaming split as shards (:mod:`mim.data.streams`' source): the dataset's own
    shards, each read as ``(key, image bytes, label)``."""

    streamed = True

    def __init__(self, path: str, split: str, image_col: str, label_col: str):
        ds = _load(path, split, streaming=True)
        self.ds, names = _columns(ds, path, image_col, label_col)
        self.image_col, self.label_col = image_col, label_col
        self.root = f"{path}[{split}]"
        n = self.ds.n_shards
        labels = self.ds.select_columns([label_col])
        self.sizes: List[int] = []
        top = -1
        for i in range(n):
            count = 0
            for rows in labels.shard(num_shards=n, index=i, contiguous=True).iter(batch_size=1024):
                count += len(rows[label_col])
                top = max([top] + [int(v) for v in rows[label_col] if v is not None])
            self.sizes.append(count)
        if sum(self.sizes) == 0:
            raise DatasetError(f"Hugging Face dataset {path!r} split {split!r} has no rows")
        self.classes = names or [str(i) for i in range(top + 1)]

    def __len__(self) -> int:
        return sum(self.sizes)

    def name(self, i: int) -> str:
        return f"{self.root} shard {i}/{len(self.sizes)}"

    def read(self, i: int) -> Iterator[Tuple[str, Optional[bytes], Optional[int]]]:
        part = self.ds.shard(num_shards=len(self.sizes), index=i, contiguous=True)
        k = 0
        # .iter, not iter(): inside a data-loader worker the latter would split the shard
        # again over the workers; mim.data.streams has already given each worker its own
        for rows in part.iter(batch_size=64):
            for value, label in zip(rows[self.image_col], rows[self.label_col]):
                try:
                    raw = image_bytes(value)
                except (ValueError, OSError):
                    raw = None
                yield str(k), raw, (int(label) if label is not None else None)
                k += 1
