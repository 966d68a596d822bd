"""The one place that knows about devices: which device, which collective backend,
which precision policy, whether to compile, and the process group.

Nothing else in mim branches on the device type.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import importlib
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Precision policies.
#   fp32        everything in fp32.
#   amp_bf16    fp32 parameters, bf16 compute under autocast (Apex AMP "O1").
#   amp_fp16    the same in fp16, with dynamic loss scaling.
#   bf16, fp16  parameters stored in low precision, fp32 master copy in the
#               optimizer (Apex AMP "O2"); fp16 with dynamic loss scaling.
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "npu")
COMPILE = ("auto", "on", "off")


def _npu_available() -> bool:
    """Import torch_npu only when it is installed; it registers the ``npu`` device."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # CANN missing: torch_npu raises on import
        log.warning("torch_npu is installed but cannot be imported: %s", e)
        return False
    return hasattr(torch, "npu") and torch.npu.is_available()


def detect_device(requested: str = "auto") -> str:
    if requested not in DEVICES:
        raise ValueError(f"config.device={requested!r}: must be one of {DEVICES}")
    if requested == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            raise RuntimeError("config.device='npu' but torch_npu is not installed "
                               "(pip install 'mim[npu]' on a machine with Ascend CANN)")
        importlib.import_module("torch_npu")
        return "npu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config.device='cuda' but no CUDA device is available")
    if requested != "auto":
        return requested
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


COLLECTIVES = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def keep_freed_cpu_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS.

    By default glibc serves big allocations (a step's activations) with mmap and unmaps
    them on free, so every CPU step page-faults its activations in again; measured here,
    that costs a 2-core CPU step about 20%, and most for whatever runs first in a
    process. Fixing the thresholds keeps freed memory in the heap for reuse (as the CUDA
    caching allocator does on GPU). ``mim.bench`` applies it so that mim and its peer are
    measured alike. Returns whether it applied (glibc only)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3   # malloc.h
        ok = libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
        ok &= libc.mallopt(m_trim_threshold, 1 << 30)
        return bool(ok)
    except (OSError, AttributeError):
        return False


@dataclasses.dataclass
class Backend:
    device_type: str
    device: torch.device
    precision: str
    compile: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def compute_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16,
                "amp_fp16": torch.float16, "fp16": torch.float16}[self.precision]

    @property
    def param_dtype(self) -> torch.dtype:
        """Dtype of the parameters the forward pass sees (O2 keeps them low precision)."""
        return self.compute_dtype if self.precision in ("bf16", "fp16") else torch.float32

    @property
    def master_weights(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def loss_scaling(self) -> bool:
        return self.precision in ("amp_fp16", "fp16")

    def autocast(self):
        # No cast cache: a CUDA graph must not capture casts cached by an earlier step, and
        # a functional step casts each parameter once per forward anyway.
        if self.precision in ("amp_bf16", "amp_fp16"):
            return torch.autocast(self.device_type, dtype=self.compute_dtype, cache_enabled=False)
        return contextlib.nullcontext()

    def cast_inputs(self, batch: dict, keys) -> dict:
        """The one place that casts inputs for the precision policy: under O2 (bf16, fp16)
        the image entries ``keys`` take the parameters' dtype; autocast (AMP) and fp32
        take them as they are. Other entries (labels, masks, MAE's noise, whose ranks
        would tie in bf16) are never cast."""
        if not self.master_weights:
            return batch
        return {k: v.to(self.param_dtype) if k in keys and v.is_floating_point() else v
                for k, v in batch.items()}

    def synchronize(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device_type == "npu":
            torch.npu.synchronize(self.device)

    def max_memory_allocated(self) -> Optional[int]:
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.device_type == "npu":
            return torch.npu.max_memory_allocated(self.device)
        return None


def setup(device: str = "auto", precision: str = "fp32", compile: str = "auto") -> Backend:
    """Pick the device, join the process group that torchrun describes (if any)."""
    if precision not in PRECISIONS:
        raise ValueError(f"config.precision={precision!r}: must be one of {PRECISIONS}")
    if compile not in COMPILE:
        raise ValueError(f"config.compile={compile!r}: must be one of {COMPILE}")
    device_type = detect_device(device)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cpu":
        dev = torch.device("cpu")
    else:
        dev = torch.device(device_type, local_rank)
        getattr(torch, device_type).set_device(dev)
    if world > 1 and not dist.is_initialized():
        # torch.distributed.nn.functional binds the default group into its functions'
        # default arguments when first imported, and DTensor (config.sharding=fsdp) imports
        # it lazily: the group would outlive teardown() there. Imported before the group
        # exists, it binds None, which means the default group at call time.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group(COLLECTIVES[device_type], timeout=datetime.timedelta(minutes=30),
                                device_id=dev if device_type != "cpu" else None)
    if precision in ("amp_bf16", "bf16") and device_type == "cpu":
        log.info("bf16 on CPU runs, but is rarely faster than fp32")
    # torch.compile targets CUDA and CPU (inductor); the NPU runs the same step eagerly.
    use_compile = {"on": True, "off": False, "auto": device_type == "cuda"}[compile]
    if use_compile and device_type == "npu":
        raise ValueError("config.compile='on' is not supported on NPU; use 'auto' or 'off'")
    return Backend(device_type, dev, precision, use_compile, rank, world, local_rank)


def teardown() -> None:
    """Leave the process group, if one was joined: call it when a run has finished.

    A collective backend's worker threads drop their references to a finished collective
    (and so to its tensors) only after the caller has been woken. A thread that does it
    while the interpreter is shutting down cannot take the GIL to release the tensors'
    Python objects: Python ends that thread in the middle of a C++ destructor, which
    aborts the process ("terminate called without an active exception"). Only deleting
    the group stops and joins those threads (gloo has no other shutdown), so this must
    happen while the interpreter is still whole."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    # A DeviceMesh (config.sharding=fsdp) keeps its groups in a registry of its own, and
    # DTensor's caches keep the mesh alive: without this its group would outlive the run.
    from torch.distributed.device_mesh import DeviceMesh
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()
            else:  # another torch version: say so rather than risk the abort unseen
                log.warning("DeviceMesh has no _pg_registry in this torch version: its process "
                            "group may outlive the run and abort the process at exit")


def seed_step(seed: int, step: int, rank: int) -> int:
    """One 63-bit seed per (seed, step, rank): every random draw of a step derives from it."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)
