"""Deterministic, resumable, sharded batch samplers.

The order of epoch ``e`` is a permutation drawn from (seed, e). Global batch ``b``
of an epoch is a fixed slice of it, and rank ``r`` takes the ``r``-th part of that
slice, so the union over ranks of every step's batch does not depend on the number
of ranks, and a run resumed at step ``s`` starts at exactly the images of step ``s``.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch

from mim.backend import seed_step


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return seed_step(seed, epoch, index + 1)


class TrainBatchSampler:
    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int,
                 start_step: int, total_steps: int):
        if global_batch % world:
            raise ValueError(f"batch_size={global_batch} does not split over {world} ranks")
        if num_samples < global_batch:
            raise ValueError(f"the training split has {num_samples} images, fewer than one "
                             f"global batch of {global_batch}")
        self.n, self.global_batch, self.local = num_samples, global_batch, global_batch // world
        self.rank, self.seed = rank, seed
        self.start, self.total = start_step, total_steps
        # Like the references (drop_last=True), an epoch is the full global batches it holds.
        self.steps_per_epoch = num_samples // global_batch
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(seed_step(self.seed, epoch, 0))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, step: int) -> List[Tuple[int, int]]:
        epoch, b = divmod(step, self.steps_per_epoch)
        lo = b * self.global_batch + self.rank * self.local
        idx = self.permutation(epoch)[lo:lo + self.local].tolist()
        return [(i, sample_seed(self.seed, epoch, i)) for i in idx]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start, self.total):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


class EvalBatchSampler:
    """Every image exactly once over all ranks (rank r takes r, r+world, ...); the last
    batch may be short, and no sample is padded or doubled. Its items ``(index, seed,
    False)`` ask :class:`mim.data.folder.ImageFolder` not to replace an unreadable image
    by the next one: evaluation skips it (and counts it) instead of scoring another twice."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int = 0):
        self.indices = list(range(rank, num_samples, world))
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        for i in range(0, len(self.indices), self.batch_size):
            yield [(j, sample_seed(self.seed, 0, j), False) for j in self.indices[i:i + self.batch_size]]

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size
