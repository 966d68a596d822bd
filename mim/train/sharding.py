"""Fully sharded data parallel training (``config.sharding="fsdp"``) for mim's functional
parameter trees, built on ``torch.distributed.tensor`` (DTensor), the machinery under
PyTorch's FSDP2 (``fully_shard``).

Between steps every rank holds only its shard of each trainable tensor: the
parameters (in fp32 under the ``bf16``/``fp16`` policies, where the shard *is* the
master weight, so there is no separate copy), the optimizer state (AdamW moments, SGD
or LARS momentum) and the gradients. A trainable tensor is a ``DTensor`` on a
one-dimensional device mesh over all ranks, placed ``Shard(d)`` on its first dimension
``d`` that the number of ranks divides, so every rank's shard has the same shape (which
keeps compiled graphs valid on every rank); a tensor with no such dimension (0-d, or a
small odd-sized bias) is replicated, and its gradient all-reduced.

The step, as in Zhang et al. 2024 ("SimpleFSDP"):

- **gather**: inside the forward each shard is redistributed to ``Replicate()``
  (an all-gather, in the compute precision) and handed to the model as a plain tensor
  whose gradient is declared ``Partial()``: DTensor's backward of that all-gather is
  then a **reduce-scatter**, issued by autograd as soon as each parameter's gradient
  is complete, so the whole gradient tree never exists on one rank;
- **update**: the optimizer (``mim.optim``: multi-tensor ops, per-tensor LARS norms,
  global-norm clipping) runs on the DTensors directly; DTensor computes norms across
  the shards, so every optimizer, LARS included, gives the unsharded result;
- **reshard after forward** (FSDP's default): autograd does not keep the gathered
  parameters for the backward; it keeps a reference to the shard and the backward
  gathers each parameter again when it needs it (:meth:`FSDP.gathered`). So whole
  parameters exist only while they are used: in the eager forward each is gathered
  when the model reads it (block by block), in the backward when its gradient needs it.
  A compiled forward takes all parameters gathered at its start (it must see plain
  tensors).

Gradients come from ``torch.autograd.grad`` here rather than ``torch.func.grad``:
functorch's transforms do not see through tensor subclasses such as DTensor.

Checkpoints hold the full, unsharded state in the layout of an unsharded run (the
shards are gathered to host memory one tensor at a time), so a run can resume with
any number of ranks and with sharding switched on or off.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Mapping
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor

from mim import tree
from mim.checkpoints import io as ckpt

log = logging.getLogger(__name__)

MODES = ("none", "fsdp")


class FSDP:
    """Shards, gathers and checkpoints the trainable tensors of one run."""

    def __init__(self, backend, trainable: List[str]):
        self.backend = backend
        self.trainable = list(trainable)
        self.mesh = init_device_mesh(backend.device_type, (backend.world_size,))
        self.world = backend.world_size

    # ------------------------------------------------------------- placement

    def placement(self, shape) -> Placement:
        """``Shard(d)`` on the first dimension ``d`` that splits evenly over the ranks, or
        ``Replicate()`` when none does (0-d and small odd-sized tensors)."""
        for d, n in enumerate(shape):
            if n % self.world == 0:
                return Shard(d)
        return Replicate()

    def shard(self, t: torch.Tensor) -> DTensor:
        """This rank's shard of ``t`` (which every rank holds whole), as a DTensor that
        owns its memory; no communication."""
        return distribute_tensor(t.detach(), self.mesh, [self.placement(t.shape)], src_data_rank=None)

    def gather(self, p: DTensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole of ``p`` as a plain tensor for the forward (all-gathered in
        ``dtype``). Its gradient is a per-rank partial sum, so autograd reduce-scatters
        it (summed, in ``p``'s dtype) into ``p``'s gradient shard."""
        full = p.redistribute(self.mesh, [Replicate()], forward_dtype=dtype,
                              backward_dtype=p.dtype if dtype not in (None, p.dtype) else None)
        return full.to_local(grad_placements=[Partial()])

    @contextlib.contextmanager
    def gathered(self, shards: Dict[str, DTensor], dtype: Optional[torch.dtype] = None,
                 frozen: Optional[Dict[str, torch.Tensor]] = None):
        """The whole parameters for one forward pass, as :meth:`gather` gives them, with
        FSDP's resharding after the forward: while the context is open, autograd saves a
        reference to the shard in place of any tensor that shares a gathered parameter's
        memory (the parameter itself, a transposed view), and the backward all-gathers it
        again when it needs it. (A copy the forward makes, such as an autocast cast, is
        saved as it is.)

        Without ``frozen`` it yields ``{name: whole parameter}``, all gathered at once (for
        a compiled forward, which must see plain tensors). With ``frozen`` (the other
        parameters, by flat name) it yields the parameter *tree* as a read-only mapping
        that gathers each sharded parameter when the forward reads it: a block's weights
        are gathered when the block runs and freed when it is done, so the forward's peak
        holds one block's parameters, not the model's.

        Every rank runs the same graph, so the all-gathers come in the same order on
        every rank."""
        # storage address -> (name, weak reference to the gathered tensor): a freed
        # tensor's address can be reused by an activation, which must not be taken for it
        owners: Dict[int, tuple] = {}
        live: "weakref.WeakValueDictionary[str, torch.Tensor]" = weakref.WeakValueDictionary()

        def fetch(name: str, grad: bool = True) -> torch.Tensor:
            full = live.get(name)
            if full is None:
                if grad:
                    full = self.gather(shards[name], dtype)
                else:
                    with torch.no_grad():
                        full = self.gather(shards[name], dtype)
                live[name] = full
                if full.numel():
                    owners[full.untyped_storage().data_ptr()] = (name, weakref.ref(full))
            return full

        def pack(t):
            if isinstance(t, DTensor) or t.numel() == 0:
                return t
            ptr = t.untyped_storage().data_ptr()
            owner = owners.get(ptr)
            if owner is None:
                return t
            name, ref = owner
            full = ref()
            if full is None or full.untyped_storage().data_ptr() != ptr:
                return t
            return _Regather(name, t.storage_offset(), t.size(), t.stride())

        def unpack(v):
            if not isinstance(v, _Regather):
                return v
            return fetch(v.name, grad=False).as_strided(v.size, v.stride, v.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            if frozen is None:
                yield {n: fetch(n) for n in shards}
            else:
                pending = {n: _Pending(n) for n in shards}
                yield _LazyTree(tree.unflatten({**frozen, **pending}), fetch)

    @staticmethod
    def full(t):
        """A DTensor's whole value (collective); other values unchanged."""
        return t.full_tensor() if isinstance(t, DTensor) else t

    def full_params(self, params: dict, dtype: Optional[torch.dtype] = None) -> dict:
        """The unsharded parameter tree (for evaluation and pictures; every rank calls it)."""
        flat = tree.flatten(params)
        out = {}
        for k, v in flat.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return tree.unflatten(out)

    # ------------------------------------------------------------ collectives

    @staticmethod
    def all_finite(grads: List[DTensor]) -> bool:
        """Whether every rank's gradient shards are finite (one host sync)."""
        bad = torch.stack([(~torch.isfinite(g.to_local())).any() for g in grads]).any().float()
        dist.all_reduce(bad)
        return bad.item() == 0

    # ------------------------------------------------------------ train state

    def _unsharded_keys(self, state: dict) -> Dict[str, List[str]]:
        """Flat state name -> the names it has in an unsharded run's checkpoint.
        Under the O2 policies the fp32 parameter shard is both ``master.<n>`` and, cast
        to the compute precision, ``params.<n>``."""
        master = self.backend.master_weights
        out = {}
        for k, v in tree.flatten(state).items():
            if master and k.startswith("params.") and isinstance(v, DTensor):
                out[k] = ["master." + k[len("params."):], k]
            else:
                out[k] = [k]
        return out

    def full_state(self, state: dict) -> dict:
        """The unsharded state for a checkpoint, in an unsharded run's layout. Every rank
        must call it; the gathered tensors land in host memory, one at a time."""
        keys = self._unsharded_keys(state)
        out = {}
        for k, v in tree.flatten(state).items():
            whole = v.full_tensor().cpu() if isinstance(v, DTensor) else v
            names = keys[k]
            if len(names) == 2:  # O2: fp32 master and the compute-precision copy
                out[names[0]] = whole
                out[names[1]] = whole.to(self.backend.param_dtype)
            else:
                out[names[0]] = whole
        return out

    def restore_into(self, state: dict, path: str) -> dict:
        """Copy an unsharded checkpoint into a sharded state, keeping this rank's shards."""
        saved = ckpt.load_tensors(path)
        flat = tree.flatten(state)
        keys = self._unsharded_keys(state)
        expected = {n for names in keys.values() for n in names}
        missing = sorted(expected - set(saved))
        unexpected = sorted(set(saved) - expected)
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{path} does not match this experiment's train state: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (is the workdir from another experiment?)")
        for k, t in flat.items():
            src = saved[keys[k][0]]
            if tuple(src.shape) != tuple(t.shape):
                raise ckpt.CheckpointError(f"{path}: {keys[k][0]} has shape {tuple(src.shape)}, "
                                           f"this experiment expects {tuple(t.shape)}")
            if isinstance(t, DTensor):
                t.to_local().copy_(self.shard(src.to(t.dtype)).to_local())
            else:
                t.copy_(src)
        return state


class _Pending:
    """A sharded parameter's place in a :class:`_LazyTree`."""
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _LazyTree(Mapping):
    """A read-only parameter tree whose sharded leaves are all-gathered on reading."""

    def __init__(self, node: dict, fetch):
        self._node, self._fetch = node, fetch

    def __getitem__(self, key):
        v = self._node[key]
        if isinstance(v, dict):
            return _LazyTree(v, self._fetch)
        return self._fetch(v.name) if isinstance(v, _Pending) else v

    def __iter__(self):
        return iter(self._node)

    def __len__(self):
        return len(self._node)


@dataclasses.dataclass(frozen=True)
class _Regather:
    """What autograd keeps of a saved tensor that views a gathered parameter."""
    name: str
    offset: int
    size: torch.Size
    stride: tuple


def create(mode: str, trainable: List[str], backend) -> Optional[FSDP]:
    """The sharding for ``config.sharding``, or None (``"none"``, or a single rank)."""
    if mode not in MODES:
        raise ValueError(f"config.sharding={mode!r}: must be one of {MODES}")
    if mode == "none":
        return None
    if not backend.distributed:
        log.info("config.sharding=%r on a single rank: nothing to shard", mode)
        return None
    return FSDP(backend, trainable)


def persistent_bytes(state: dict, trainable: List[str]):
    """Bytes this rank keeps between steps: (optimizer state plus fp32 master weights,
    trainable parameters)."""
    flat = tree.flatten(state["params"])
    return (nbytes(state["opt"]) + nbytes(state.get("master", {})),
            nbytes({n: flat[n] for n in trainable}))


def nbytes(t) -> int:
    """Bytes of the tensors in a tree that this rank holds (a DTensor's local shard)."""
    if isinstance(t, dict):
        return sum(nbytes(v) for v in t.values())
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
