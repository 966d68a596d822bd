"""A fixed part of the train split kept out of training (``config.probe.holdout``), on
which a linear-probe grid selects its head, as DINOv2's ``eval/linear.py`` selects on data
the classifiers never trained on. The held-out images are drawn once from a fixed seed
(the same images whatever ``config.seed``), read with the eval transform, and never
reach the training stream."""
from __future__ import annotations

from typing import List, Tuple

import torch

HOLDOUT_SEED = 20240531     # fixed: the held-out images do not depend on config.seed


def fraction(config) -> float:
    """``config.probe.holdout`` (0 for a config without a probe); refused for streamed
    splits, which have no random access to leave images out of."""
    probe = config.get("probe")
    f = float(probe.get("holdout", 0.0)) if probe is not None else 0.0
    d = config.data
    if f and (d.format == "wds" or (d.format == "hf" and d.hf_streaming)):
        from mim.config import ConfigError
        raise ConfigError(f"config.probe.holdout: needs a random-access train split (data.format "
                          f"'folder' or 'hf' without streaming), not data.format={d.format!r}"
                          + (" with hf_streaming" if d.format == "hf" else ""))
    return f


def split(n: int, frac: float) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices) of a split of ``n`` images: ``round(n * frac)``
    of them (at least one) held out, drawn from :data:`HOLDOUT_SEED`."""
    k = min(max(int(round(n * frac)), 1), n - 1) if frac > 0 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


class Subset(torch.utils.data.Dataset):
    """Items ``(index, seed, ...)`` of the samplers, ``index`` counted in ``indices``; the
    dataset's other attributes (``classes``, ``root``) are the whole split's."""

    def __init__(self, dataset, indices: List[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        index, *rest = item
        return self.dataset[(self.indices[index], *rest)]

    def __getattr__(self, name):
        if name.startswith("__") or name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
