"""Streamed datasets (tar shards, streaming Hugging Face datasets): split over ranks and
workers, shuffled per epoch, resumable mid-epoch.

**Split.** There are ``S = ranks x workers`` streams; stream ``s = rank * workers + slot``.
Each epoch the shards are permuted from (seed, epoch) and stream ``s`` reads shards
``s, s + S, s + 2S, ...`` of that order, whole: over all streams every sample is read
exactly once per epoch. When the shard count is not a multiple of ``S`` some streams read
one shard more than others, and their epochs are longer (in samples; as are the epochs of
streams whose shards are larger). Each stream runs through its epochs back to back, so a
batch may hold the end of one of its epochs and the start of the next, and ranks may be
a fraction of an epoch apart; no sample is dropped or repeated. Fewer shards than streams
would leave a stream with nothing to read in some epoch: that is an error.

**Shuffle.** Within a stream's epoch the samples pass a bounded shuffle buffer
(``data.shuffle_buffer`` samples, as webdataset's ``shuffle``) whose choices are drawn
from (seed, epoch, stream). Because every shard's sample count is known, the choices are
drawn on sample *positions* before any byte is read: the output order of an epoch is a
function of (seed, epoch, stream) alone.

**Batches and resume.** Worker slot ``u`` makes the batches of the steps ``t`` with
``t % workers == u`` (the data loader takes batches from its workers in turn), each from
the next ``local batch`` positions of its stream. So, as for the folder reader, the data
position is the step: a run resumed at step ``t`` recomputes where each stream is (epoch,
sample of that epoch, the shard and the offset in it where reading restarts) and continues
at exactly that sample. :func:`position` writes the same figures into the checkpoint, with
the layout (ranks, workers, shards), which a resumed run must match.

**Bad input.** A sample that cannot be used (no image, no label, an image that does not
decode) and the samples a missing or truncated shard should have held are skipped with a
warning naming the shard and key, and counted in ``skipped``. In a training batch another
image of the batch takes the place of a skipped one (the batch keeps its size and the
stream its position; when a whole batch is skipped, the stream's next readable sample
does); in evaluation it is dropped, so no image is scored twice.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from mim.backend import seed_step
from mim.data.folder import DatasetError, finish_sample, seed_all
from mim.data.sampler import sample_seed

_LOST = object()


def epoch_shards(num_shards: int, seed: int, epoch: int, stream: int, streams: int,
                 shuffle: bool = True) -> List[int]:
    """The shards stream ``stream`` reads in ``epoch``, in reading order."""
    if shuffle:
        g = torch.Generator().manual_seed(seed_step(seed, epoch, 0))
        order = torch.randperm(num_shards, generator=g).tolist()
    else:
        order = list(range(num_shards))
    return order[stream::streams]


def emission_order(n: int, buffer: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """The order in which a stream's ``n`` positions (in reading order) leave a shuffle
    buffer of ``buffer`` samples: each arriving sample enters, and once the buffer is full
    one drawn uniformly leaves; at the end of the epoch the rest leave in a drawn order.
    At most ``buffer`` samples are ever held."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed_step(seed, epoch, stream + 1) % (1 << 63))
    draws = rng.integers(0, 1 << 62, size=n).tolist()
    out: List[int] = []
    buf: List[int] = []
    for p in range(n):
        buf.append(p)
        if len(buf) >= buffer:
            k = draws[p] % len(buf)
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
    out.extend(np.asarray(buf)[rng.permutation(len(buf))].tolist())
    return np.asarray(out, dtype=np.int64)


class Stream:
    """Where a stream's samples come from: the split's shards, the run's layout, and the
    per-sample path (``read(bytes)`` then ``transform`` and ``extras``)."""

    def __init__(self, source, transform: Callable, extras, read: Callable, seed: int,
                 rank: int, world: int, workers: int, shuffle: bool, buffer: int):
        self.source, self.transform, self.extras, self.read = source, transform, extras, read
        self.seed, self.rank, self.world = seed, rank, world
        self.workers = max(workers, 1)
        self.streams = world * self.workers
        self.shuffle, self.buffer = shuffle, buffer if shuffle else 1
        self.start_of = np.concatenate([[0], np.cumsum(source.sizes)]).tolist()

    # ---- layout, computed without reading

    def shards(self, stream: int, epoch: int) -> List[int]:
        return epoch_shards(len(self.source.sizes), self.seed, epoch, stream, self.streams,
                            self.shuffle)

    def length(self, stream: int, epoch: int) -> int:
        n = sum(self.source.sizes[j] for j in self.shards(stream, epoch))
        if n == 0:
            raise DatasetError(f"stream {stream} of {self.source.root} has no samples in epoch "
                               f"{epoch} (its shards are empty or missing)")
        return n

    def locate(self, stream: int, consumed: int) -> Tuple[int, int]:
        """(epoch, sample of that epoch) after ``consumed`` samples of the stream."""
        epoch = 0
        while consumed >= self.length(stream, epoch):
            consumed -= self.length(stream, epoch)
            epoch += 1
        return epoch, consumed

    def restart(self, stream: int, epoch: int, offset: int) -> Tuple[np.ndarray, int, int]:
        """The epoch's emission order and where reading restarts to emit from ``offset``
        on: (order, index in the stream's shard list, sample in that shard)."""
        n = self.length(stream, epoch)
        order = emission_order(n, self.buffer, self.seed, epoch, stream)
        first = int(order[offset:].min()) if offset < n else n
        sizes = [self.source.sizes[j] for j in self.shards(stream, epoch)]
        k, before = 0, 0
        while k < len(sizes) and before + sizes[k] <= first:
            before += sizes[k]
            k += 1
        return order, k, first - before

    # ---- reading

    def _read_positions(self, stream: int, epoch: int, k0: int):
        """``(position, item)`` from shard ``k0`` of the stream's epoch on; a sample a
        missing or truncated shard lacks comes as ``_LOST`` (one warning per shard)."""
        shards = self.shards(stream, epoch)
        base = sum(self.source.sizes[j] for j in shards[:k0])
        for j in shards[k0:]:
            size, i, key = self.source.sizes[j], 0, None
            try:
                for key, raw, label in self.source.read(j):
                    if i >= size:
                        warnings.warn(f"shard {self.source.name(j)} holds more than the {size} "
                                      f"samples its index lists; the others are not read")
                        break
                    yield base + i, (j, i, key, raw, label)
                    i += 1
            except Exception as e:  # noqa: BLE001 - tar, pipe and HTTP errors of all kinds
                warnings.warn(f"shard {self.source.name(j)}: {type(e).__name__}: {e} "
                              f"(after key {key}); its other {size - i} samples are skipped")
            else:
                if i < size:
                    warnings.warn(f"shard {self.source.name(j)} ended after {i} of its {size} "
                                  f"samples (key {key}); the others are skipped")
            for q in range(i, size):
                yield base + q, _LOST
            base += size

    def epoch_items(self, stream: int, epoch: int, offset: int = 0):
        """The epoch's items in emission order from ``offset`` on: ``(epoch, item)``."""
        order, k0, _ = self.restart(stream, epoch, offset)
        wanted = np.zeros(len(order), dtype=bool)
        wanted[order[offset:]] = True
        held: Dict[int, object] = {}
        reader = self._read_positions(stream, epoch, k0)
        for p in order[offset:].tolist():
            while p not in held:
                q, item = next(reader)
                if wanted[q]:
                    held[q] = item
            yield epoch, held.pop(p)
        reader.close()

    def items(self, stream: int, consumed: int):
        """The stream's items from ``consumed`` on, epoch after epoch, without end."""
        epoch, offset = self.locate(stream, consumed)
        while True:
            yield from self.epoch_items(stream, epoch, offset)
            epoch, offset = epoch + 1, 0

    def sample(self, epoch: int, item) -> Optional[Dict[str, torch.Tensor]]:
        """The item through the per-sample path, or None (warned) when it cannot be used."""
        if item is _LOST:
            return None
        j, i, key, raw, label = item
        where = f"shard {self.source.name(j)} key {key}"
        if raw is None:
            warnings.warn(f"skipping {where}: no image member")
            return None
        if label is None:
            warnings.warn(f"skipping {where}: no label")
            return None
        seed = sample_seed(self.seed, epoch, self.start_of[j] + i)
        seed_all(seed)
        try:
            img = self.read(raw)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            warnings.warn(f"skipping unreadable image in {where}: {type(e).__name__}: {e}")
            return None
        return finish_sample(img, label, seed, self.transform, self.extras)

    def layout(self) -> Dict[str, object]:
        names = "\n".join(self.source.name(j) for j in range(len(self.source.sizes)))
        return {"ranks": self.world, "workers": self.workers, "shards": len(self.source.sizes),
                "shards_sha256": hashlib.sha256(names.encode()).hexdigest(),
                "shuffle_buffer": self.buffer, "seed": self.seed}


def _worker() -> Tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(torch.utils.data.IterableDataset):
    """The training batches of steps ``start..total-1`` of one rank, collated in the
    workers (the loader's ``batch_size`` is None)."""

    def __init__(self, stream: Stream, local_batch: int, start: int, total: int, collate):
        s = stream
        if len(s.source.sizes) < s.streams:
            raise DatasetError(
                f"{s.source.root}: {len(s.source.sizes)} shard(s) cannot feed {s.world} rank(s) x "
                f"{s.workers} worker(s) (each stream reads whole shards); write more shards or "
                f"set data.num_workers <= {max(len(s.source.sizes) // s.world, 1)}")
        self.stream, self.local, self.start, self.total, self.collate = s, local_batch, start, total, collate
        self.root, self.classes = s.source.root, s.source.classes

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self):
        w, num = _worker()
        s = self.stream
        if num != s.workers:
            raise RuntimeError(f"the stream was laid out for {s.workers} workers, runs in {num}")
        steps = range(self.start + w, self.total, num)
        if not steps:
            return
        slot = steps[0] % num
        sid = s.rank * num + slot
        items = s.items(sid, steps[0] // num * self.local)
        ahead: List[Tuple[int, object]] = []

        def take():
            return ahead.pop(0) if ahead else next(items)

        for _ in steps:
            samples = [s.sample(*take()) for _ in range(self.local)]
            good = [x for x in samples if x is not None]
            bad = len(samples) - len(good)
            if not good:
                # The stream's next readable sample stands in (it is read again in its own
                # batch), so the stream's position stays a function of the step.
                for _ in range(100 * self.local + sum(s.source.sizes)):
                    ahead.append(next(items))
                    x = s.sample(*ahead[-1])
                    if x is not None:
                        good = [x]
                        break
                else:
                    raise DatasetError(f"no readable sample in {s.source.root}")
            if bad:
                samples = [x if x is not None else good[i % len(good)]
                           for i, x in enumerate(samples)]
                samples[0] = dict(samples[0], skipped=torch.tensor(bad))
            yield self.collate(samples)


class EvalStream(torch.utils.data.IterableDataset):
    """Every sample once over all ranks and workers, in shard order (no shuffle), in
    batches of ``batch_size`` (a stream's last one may be short); a skipped sample is
    dropped and counted by the collate function."""

    def __init__(self, stream: Stream, batch_size: int, collate):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        self.root, self.classes = stream.source.root, stream.source.classes

    def __len__(self) -> int:
        return -(-len(self.stream.source) // (self.batch_size * self.stream.world))

    def __iter__(self):
        w, num = _worker()
        s = self.stream
        sid = s.rank * num + w
        if num != s.workers:
            raise RuntimeError(f"the stream was laid out for {s.workers} workers, runs in {num}")
        if not s.shards(sid, 0):
            return
        batch: List[Optional[dict]] = []
        for _, item in s._read_positions(sid, 0, 0):
            batch.append(s.sample(0, item))
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)


def position(stream: Stream, step: int, local_batch: int) -> Dict[str, object]:
    """Where every stream of every rank is after ``step`` steps (what a resumed run
    recomputes from the step): epoch, sample of the epoch, and the shard and the sample in
    it where its reader restarts."""
    out = []
    for rank in range(stream.world):
        for slot in range(stream.workers):
            sid = rank * stream.workers + slot
            consumed = len(range(slot, step, stream.workers)) * local_batch
            epoch, offset = stream.locate(sid, consumed)
            _, k, in_shard = stream.restart(sid, epoch, offset)
            shards = stream.shards(sid, epoch)
            name = stream.source.name(shards[k]) if k < len(shards) else None
            out.append({"rank": rank, "worker": slot, "epoch": epoch, "sample": offset,
                        "shard": name, "offset": in_shard})
    return {"layout": stream.layout(), "streams": out}
