"""Optimizer-state sharding over data-parallel ranks (ZeRO stage 1, Rajbhandari et al.
2020, Sec. 5.1), for mim's functional parameter trees. ``config.sharding="zero1"``.

What is sharded and what is not:

- **optimizer state** (AdamW moments, SGD momentum) and, under the ``bf16``/``fp16``
  precision policies, the **fp32 master weights**: rank ``r`` keeps only slice ``r`` of
  every trainable tensor (flattened, zero-padded to a multiple of the world size), so
  these take ``1/world`` of the memory on each rank;
- **gradients** are reduce-scattered instead of all-reduced: after the reduction a rank
  holds only its averaged slice. During the backward pass the whole local gradient
  tree still exists (``torch.func.grad`` returns it at once, so it cannot be reduced
  bucket by bucket as the backward runs, as ZeRO-2 does);
- **parameters are replicated**: every rank runs forward and backward on the full
  tree, then the updated slices are all-gathered into it (ZeRO-3 / FSDP would gather
  them layer by layer inside the forward pass; mim's models do not do that).

So the saving is the optimizer state (2 fp32 tensors per parameter for AdamW, plus the
fp32 master copy under O2): per parameter, fp32 AdamW goes from 16 bytes (parameter,
gradient, 2 moments) to 8 + 8/world; O2 bf16 from 16 (2 + 2 + 4 master + 8) to
4 + 12/world. The communication volume equals DDP's (a reduce-scatter
plus an all-gather is one all-reduce).

Checkpoints hold the full, unsharded state (the slices are gathered to rank 0's host
memory one tensor at a time), so a run can resume with any number of ranks and with
sharding switched on or off.

The update of a slice equals the update of the whole tensor only for element-wise
optimizers (AdamW, SGD); the global gradient norm for clipping is all-reduced. LARS
needs per-tensor norms and is refused by :func:`mim.config.validate`.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mim import tree
from mim.checkpoints import io as ckpt

log = logging.getLogger(__name__)

MODES = ("none", "zero1")


class Sharding:
    """Rank ``rank``'s slice of each named tensor: elements ``[rank*S, (rank+1)*S)`` of the
    flattened tensor zero-padded to ``world*S``, ``S = ceil(numel / world)``."""

    def __init__(self, shapes: Dict[str, torch.Size], rank: int, world: int,
                 bucket_bytes: int = 25 << 20):
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.numel = {n: math.prod(s) for n, s in self.shapes.items()}
        self.size = {n: max(-(-self.numel[n] // world), 1) for n in self.names}
        self.rank, self.world, self.bucket_bytes = rank, world, bucket_bytes

    # ----------------------------------------------------------------- slices

    def _padded(self, t: torch.Tensor, n: str) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = self.world * self.size[n] - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)) if pad else flat

    def local(self, full: torch.Tensor, n: str) -> torch.Tensor:
        """A new tensor holding this rank's slice of ``full``."""
        s = self.size[n]
        return self._padded(full, n)[self.rank * s:(self.rank + 1) * s].clone()

    def local_tree(self, fulls: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {n: self.local(fulls[n], n) for n in self.names}

    def _buckets(self, tensors: Dict[str, torch.Tensor]) -> List[List[str]]:
        """Names grouped into buckets of one dtype and about ``bucket_bytes`` each."""
        out: List[List[str]] = []
        size, dtype = 0, None
        for n in self.names:
            t = tensors[n]
            if not out or t.dtype != dtype or size >= self.bucket_bytes:
                out.append([])
                size, dtype = 0, t.dtype
            out[-1].append(n)
            size += self.size[n] * self.world * t.element_size()
        return out

    # ------------------------------------------------------------ collectives

    def reduce_scatter_mean(self, grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Each rank's slice of the gradients averaged over ranks (bucketed)."""
        out: Dict[str, torch.Tensor] = {}
        for bucket in self._buckets(grads):
            total = sum(self.size[n] for n in bucket)
            ref = grads[bucket[0]]
            send = torch.empty(self.world, total, dtype=ref.dtype, device=ref.device)
            off = 0
            for n in bucket:
                s = self.size[n]
                send[:, off:off + s] = self._padded(grads[n], n).view(self.world, s)
                off += s
            recv = torch.empty(total, dtype=ref.dtype, device=ref.device)
            dist.reduce_scatter_tensor(recv, send.view(-1))
            recv.div_(self.world)
            off = 0
            for n in bucket:
                out[n] = recv[off:off + self.size[n]]
                off += self.size[n]
        return out

    def all_gather_into_(self, shards: Dict[str, torch.Tensor], fulls: Dict[str, torch.Tensor]):
        """Write the slices of all ranks into the full tensors ``fulls`` (cast to their dtype)."""
        for bucket in self._buckets(fulls):
            ref = fulls[bucket[0]]
            send = torch.cat([shards[n].to(ref.dtype) for n in bucket])
            recv = torch.empty(self.world, send.numel(), dtype=ref.dtype, device=ref.device)
            dist.all_gather_into_tensor(recv.view(-1), send)
            off = 0
            for n in bucket:
                s = self.size[n]
                whole = recv[:, off:off + s].reshape(-1)[:self.numel[n]]
                fulls[n].copy_(whole.view(self.shapes[n]))
                off += s

    def gather_full(self, shard: torch.Tensor, n: str, device="cpu") -> torch.Tensor:
        """The whole tensor ``n`` from every rank's slice, on ``device`` (checkpoints)."""
        recv = torch.empty(self.world * self.size[n], dtype=shard.dtype, device=shard.device)
        dist.all_gather_into_tensor(recv, shard.contiguous())
        return recv[:self.numel[n]].view(self.shapes[n]).to(device)

    def global_norm(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """L2 norm of the whole gradient from every rank's slices (padding is zero)."""
        norms = torch._foreach_norm(list(shards))
        sq = torch.stack([x.float() for x in norms]).square().sum()
        dist.all_reduce(sq)
        return sq.sqrt()

    def all_finite(self, shards: Sequence[torch.Tensor]) -> bool:
        bad = torch.stack([(~torch.isfinite(t)).any() for t in shards]).any().float()
        dist.all_reduce(bad)
        return bad.item() == 0

    # ------------------------------------------------------------ train state

    def sharded_keys(self, state: dict) -> Dict[str, str]:
        """Flat state names that hold slices -> the parameter name they slice: the
        optimizer's per-parameter sub-trees and the master weights."""
        out = {}
        names = set(self.names)
        groups = [("opt." + k, v) for k, v in state["opt"].items()]
        if "master" in state:
            groups.append(("master", state["master"]))
        for prefix, sub in groups:
            if isinstance(sub, dict) and set(sub) == names:
                for n in self.names:
                    out[f"{prefix}.{n}"] = n
        return out

    def full_state(self, state: dict) -> dict:
        """The unsharded state for a checkpoint. Every rank must call it; the gathered
        tensors land in host memory, one at a time."""
        keys = self.sharded_keys(state)
        flat = {}
        for k, v in tree.flatten(state).items():
            flat[k] = self.gather_full(v, keys[k]) if k in keys else v
        return flat

    def restore_into(self, state: dict, path: str) -> dict:
        """Copy an unsharded checkpoint into a sharded state, keeping this rank's slices."""
        saved = ckpt.load_tensors(path)
        flat = tree.flatten(state)
        keys = self.sharded_keys(state)
        missing = sorted(set(flat) - set(saved))
        unexpected = sorted(set(saved) - set(flat))
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{path} does not match this experiment's train state: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (is the workdir from another experiment?)")
        for k, t in flat.items():
            src = saved[k]
            if k in keys:
                n = keys[k]
                if src.shape != self.shapes[n]:
                    raise ckpt.CheckpointError(f"{path}: {k} has shape {tuple(src.shape)}, "
                                               f"this experiment expects {tuple(self.shapes[n])}")
                src = self.local(src, n)
            elif t.shape != src.shape:
                raise ckpt.CheckpointError(f"{path}: {k} has shape {tuple(src.shape)}, "
                                           f"this experiment expects {tuple(t.shape)}")
            t.copy_(src)
        return state


def create(mode: str, shapes: Dict[str, torch.Size], backend) -> Optional[Sharding]:
    """The sharding for ``config.sharding``, or None (``"none"``, or a single rank)."""
    if mode not in MODES:
        raise ValueError(f"config.sharding={mode!r}: must be one of {MODES}")
    if mode == "none":
        return None
    if not backend.distributed:
        log.info("config.sharding=%r on a single rank: nothing to shard", mode)
        return None
    return Sharding(shapes, backend.rank, backend.world_size)


def nbytes(t) -> int:
    """Bytes of the tensors in a tree (the optimizer state a rank holds)."""
    if isinstance(t, dict):
        return sum(nbytes(v) for v in t.values())
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
