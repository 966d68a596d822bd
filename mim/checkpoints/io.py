"""Atomic, verified checkpoints of the whole train state.

A checkpoint is a directory ``<workdir>/checkpoints/step_<N>/`` holding
``state.safetensors`` (every tensor of the state, flat "."-joined names) and
``meta.json`` (step, data position, seed, config, SHA-256 of the tensor file).
It is written into a temporary directory, fsynced, then renamed into place, so a
kill at any moment leaves either the old set or the new one. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import List, Optional, Tuple

import safetensors.torch

from mim import tree

log = logging.getLogger(__name__)
STATE, META = "state.safetensors", "meta.json"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    pass


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flat_state(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tree.flatten(state).items()}


def save(root: str, step: int, state: dict, meta: dict, keep: int) -> str:
    """Write ``state`` as checkpoint ``step`` under ``root``; keep the newest ``keep``."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = flat_state(state)
    safetensors.torch.save_file(tensors, os.path.join(tmp, STATE))
    meta = dict(meta, step=step, sha256=sha256(os.path.join(tmp, STATE)))
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    for name in (STATE, META):
        _fsync(os.path.join(tmp, name))
    if os.path.exists(final):  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    prune(root, keep)
    return final


def list_steps(root: str) -> List[Tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def verify(path: str) -> dict:
    """The checkpoint's metadata, or :class:`CheckpointError` if it is incomplete or corrupt."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {META}: {e}") from None
    state = os.path.join(path, STATE)
    if not os.path.exists(state):
        raise CheckpointError(f"{path}: {STATE} is missing")
    digest = sha256(state)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{path}: {STATE} checksum mismatch (truncated or corrupt)")
    return meta


def latest(root: str) -> Optional[Tuple[str, dict]]:
    """The newest checkpoint that verifies; corrupt newer ones are reported and passed over."""
    for step, path in reversed(list_steps(root)):
        try:
            return path, verify(path)
        except CheckpointError as e:
            log.error("ignoring corrupt checkpoint: %s", e)
    return None


def prune(root: str, keep: int):
    """Delete all but the newest ``keep`` checkpoints, never a good one in favour of a
    corrupt one: the newest checkpoint that verifies always stays."""
    steps = list_steps(root)
    if len(steps) <= keep:
        return
    good = latest(root)
    for step, path in steps[:-keep]:
        if good is not None and path == good[0]:
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_tensors(path: str, device="cpu") -> dict:
    return safetensors.torch.load_file(os.path.join(path, STATE), device=str(device))


def restore_into(state: dict, path: str) -> dict:
    """Copy a checkpoint's tensors into ``state`` (same structure, dtypes, devices)."""
    saved = load_tensors(path)
    flat = tree.flatten(state)
    missing = sorted(set(flat) - set(saved))
    unexpected = sorted(set(saved) - set(flat))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this experiment's train state: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (is the workdir from another experiment?)")
    for k, t in flat.items():
        if t.shape != saved[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(saved[k].shape)}, "
                                  f"this experiment expects {tuple(t.shape)}")
        t.copy_(saved[k])
    return state
