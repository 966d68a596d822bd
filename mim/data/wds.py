"""Tar shards in the WebDataset layout (``data.format='wds'``): one split as a list of
shards with known sample counts, and each shard's samples as ``(key, image bytes, label)``.

``data.path`` is either

* a folder (or an ``http(s)://.../`` URL ending in ``/``) written by :mod:`mim.data.shards`:
  its ``info.json`` lists each split's shards and their sample counts, ``classes.json``
  the class names; a local folder without ``info.json`` uses its ``<split>-*.tar``; or
* a brace pattern, path or URL that webdataset opens (``/d/train-{0000..0127}.tar``,
  ``https://host/train-{0..9}.tar``, ``pipe:aws s3 cp s3://b/train-{0..9}.tar -``) for the
  train split, with ``data.eval_path`` the eval split's.

Sample counts come from ``info.json`` beside the shards when it lists them, else from one
pass over the shards before training (reading every byte once: write ``info.json`` with
:mod:`mim.data.shards` to skip it). They fix the epoch's length, each sample's index (its
augmentation seed, as in the folder reader) and where a resumed worker restarts, without
reading a shard.

A sample is the members that share a key: one image (``.jpg``/``.jpeg``/``.png``/``.webp``,
kept as bytes: ``data.decode='device'`` gets the JPEG as stored) and ``.cls`` (the class
index as text).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import urllib.error
import urllib.request
import warnings
from typing import Iterator, List, Optional, Tuple

from mim.data.folder import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INFO, CLASSES = "info.json", "classes.json"


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _is_pipe(path: str) -> bool:
    return path.startswith("pipe:")


def _read_json(location: str) -> Optional[object]:
    """A JSON file at a local path or http(s) URL; None when it does not exist there."""
    if _is_url(location):
        try:
            with urllib.request.urlopen(location, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise DatasetError(f"cannot read {location}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"unreachable URL {location}: {getattr(e, 'reason', e)}") from None
    if not os.path.isfile(location):
        return None
    with open(location) as f:
        return json.load(f)


def _exists(url: str) -> bool:
    """Whether a shard is there; an unreachable host is an error, a 404 a missing shard."""
    if _is_pipe(url):
        return True             # a command: only reading it tells
    if not _is_url(url):
        return os.path.isfile(url)
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=10):
            return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise DatasetError(f"cannot read {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DatasetError(f"unreachable URL {url}: {getattr(e, 'reason', e)}") from None


def expand(pattern: str) -> List[str]:
    import braceexpand  # webdataset's own dependency, for its brace patterns
    return list(braceexpand.braceexpand(pattern))


def _base(location: str) -> str:
    if _is_pipe(location):
        return ""
    return location.rsplit("/", 1)[0] + "/" if "/" in location else "./"


def read_shard(url: str) -> Iterator[Tuple[str, Optional[bytes], Optional[int]]]:
    """A shard's samples as ``(key, image bytes or None, label or None)``, in tar order,
    through webdataset's opener (files, curl for URLs, pipes) and tar iterator. A sample
    without an image or a ``.cls`` member comes with None there (the reader skips and
    counts it); a shard that cannot be opened or ends inside a member raises."""
    from webdataset import gopen, tariterators  # gopen: the package's opener function
    stream = gopen(url, "rb")
    try:
        files = ({**f, "__url__": url} for f in tariterators.tar_file_iterator(stream))
        for sample in tariterators.group_by_keys(files):
            raw = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            label = None
            if "cls" in sample:
                try:
                    label = int(sample["cls"].decode().strip())
                except ValueError:
                    label = None
            yield sample["__key__"], raw, label
    finally:
        stream.close()


class Shards:
    """One split: ``urls``, ``sizes`` (samples per shard, a missing shard's from
    ``info.json``), ``classes``; ``root`` names it in messages."""

    streamed = True

    def __init__(self, root: str, urls: List[str], sizes: List[int], classes: List[str]):
        self.root, self.urls, self.sizes, self.classes = root, urls, sizes, classes

    def __len__(self) -> int:
        return sum(self.sizes)

    def name(self, i: int) -> str:
        return self.urls[i]

    def read(self, i: int):
        return read_shard(self.urls[i])


def _scan(urls: List[str]) -> Tuple[List[int], int]:
    """Samples per shard and the largest label, from one pass over every shard."""
    sizes, top = [], -1
    log.warning("counting the samples of %d shard(s) (no %s lists them): one pass over the data",
                len(urls), INFO)
    for url in urls:
        n = 0
        try:
            for _, _, label in read_shard(url):
                n += 1
                top = max(top, label if label is not None else -1)
        except Exception as e:  # noqa: BLE001 - tar, pipe and HTTP errors of all kinds
            if n == 0 and (_is_url(url) or _is_pipe(url)):
                raise DatasetError(f"cannot read shard {url}: {type(e).__name__}: {e}") from None
            warnings.warn(f"shard {url}: {type(e).__name__}: {e} after {n} samples; "
                          f"its other samples are skipped")
        sizes.append(n)
    return sizes, top


def resolve(config, split: str) -> Shards:
    """The shards of ``split`` with their sizes and the class names; missing shards are a
    warning (their samples are counted as skipped in every epoch), no shard at all or an
    unreachable host an error, all before any work."""
    d = config.data
    path = d.path
    folder_like = (not _is_url(path) and os.path.isdir(os.path.expanduser(path))) or \
        (_is_url(path) and path.endswith("/"))
    listed = None
    if folder_like:
        base = os.path.expanduser(path).rstrip("/") + "/"
        info = _read_json(base + INFO)
        if info is not None:
            if split not in info:
                raise DatasetError(f"{base}{INFO} has no split {split!r} (it has {sorted(info)})")
            listed = info[split]
            urls = [base + name for name in listed]
        elif _is_url(path):
            raise DatasetError(f"{base}{INFO} not found: a URL folder needs the {INFO} that "
                               f"`python -m mim.data.shards` writes, or a brace pattern in data.path")
        else:
            urls = sorted(glob.glob(os.path.join(base, f"{split}-*.tar")))
            if not urls:
                raise DatasetError(f"no {INFO} and no {split}-*.tar shards in {base}")
        root = base
    else:
        if split == d.train_split:
            pattern = path
        elif split == d.eval_split:
            if not d.eval_path:
                raise DatasetError(f"config.data.eval_path: data.path is a shard pattern for the "
                                   f"{d.train_split!r} split; give the {split!r} split's pattern")
            pattern = d.eval_path
        else:
            raise DatasetError(f"split {split!r} is neither data.train_split nor data.eval_split "
                               f"(data.path is a shard pattern)")
        urls = [os.path.expanduser(u) for u in expand(pattern)]
        root = pattern
        base = _base(urls[0])
        info = _read_json(base + INFO) if base else None
        if info is not None:
            names = {n: s for part in info.values() for n, s in part.items()}
            listed = {u.rsplit("/", 1)[-1]: names[u.rsplit("/", 1)[-1]] for u in urls
                      if u.rsplit("/", 1)[-1] in names}
    if not urls:
        raise DatasetError(f"no shard listed for split {split!r} of {root!r}")
    present = [_exists(u) for u in urls]
    tried = f"tried {len(urls)}: {urls[0]}{' ...' if len(urls) > 1 else ''}"
    if listed is not None:
        for u, ok in zip(urls, present):
            if not ok and u.rsplit("/", 1)[-1] not in listed:
                warnings.warn(f"shard {u} is missing and {INFO} does not list it: left out")
        keep = [ok or u.rsplit("/", 1)[-1] in listed for u, ok in zip(urls, present)]
        urls = [u for u, k in zip(urls, keep) if k]
        present = [p for p, k in zip(present, keep) if k]
        if not all(u.rsplit("/", 1)[-1] in listed for u in urls):
            listed = None        # shards the index does not know: count them all
    if not any(present):
        raise DatasetError(f"no shard found for {root!r} ({tried})")
    classes = _read_json(base + CLASSES) if base else None
    if listed is not None:
        sizes = [int(listed[u.rsplit("/", 1)[-1]]) for u in urls]
        for u, ok, n in zip(urls, present, sizes):
            if not ok:
                warnings.warn(f"shard {u} is missing: its {n} samples are skipped (counted in "
                              f"skipped_images) each epoch")
    else:
        for u, ok in zip(urls, present):
            if not ok:
                warnings.warn(f"shard {u} is missing and no {INFO} gives its size: left out")
        urls = [u for u, ok in zip(urls, present) if ok]
        sizes, top = _scan(urls)
        if classes is None:
            classes = [str(i) for i in range(top + 1)]
    if classes is None:
        raise DatasetError(f"{base}{CLASSES} not found beside the shards of {root!r}")
    if sum(sizes) == 0:
        raise DatasetError(f"the shards of {root!r} hold no samples")
    return Shards(root, urls, sizes, list(classes))
