"""Reading weight files safely (never unpickling arbitrary objects), and starting a
run from a timm or mim checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import safetensors.torch
import torch

from mim import tree

log = logging.getLogger(__name__)


def _load(src):
    """The object a path holds (``.safetensors``; a mim checkpoint directory; or a torch
    file loaded with ``weights_only=True``), or ``src`` itself if it is a mapping."""
    if isinstance(src, Mapping):
        return src
    path = os.fspath(src)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        path = os.path.join(path, "state.safetensors")
    if path.endswith(".safetensors"):
        tensors = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if "args" in meta:  # a converted official file keeps its training arguments (registry)
            return {"model": tensors, "args": json.loads(meta["args"])}
        return tensors
    try:
        # MAE's training checkpoints also store its argparse Namespace, a class that
        # only sets attributes: allowing it keeps weights_only's guarantee.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's refusal names the offending global
        raise ValueError(
            f"{path}: not loadable with weights_only=True ({e}). If it is an official training "
            "checkpoint holding a config object (SimMIM/Swin pickle a yacs CfgNode), re-save "
            "only its 'model' entry where the file is trusted") from e


def _state_dict(obj, copy: bool) -> Dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = dict(obj[key])
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint entries that are not tensors: {bad[:10]}")
    if copy:
        return {k: v.detach().clone() for k, v in obj.items()}
    return dict(obj)


def _saved_args(obj) -> Optional[dict]:
    """The training arguments saved next to the weights (the reference scripts' ``"args"``
    argparse Namespace, or a plain mapping), as a dict; None when there are none."""
    if not isinstance(obj, Mapping) or "args" not in obj:
        return None
    args = obj["args"]
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        return dict(args)
    raise ValueError(f"checkpoint entry 'args' is a {type(args).__name__}, not an argparse "
                     "Namespace or a mapping")


def read_state_dict(src) -> Dict[str, torch.Tensor]:
    """A flat state_dict from a path (``.safetensors``; a mim checkpoint directory; or a
    torch file loaded with ``weights_only=True``) or an in-memory mapping (copied: steps
    update parameters in place). A ``{"model": ...}`` / ``{"state_dict": ...}`` /
    ``{"module": ...}`` wrapper is unwrapped."""
    return _state_dict(_load(src), copy=isinstance(src, Mapping))


def read_with_args(src) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """:func:`read_state_dict` and the training arguments the file saved with it (the
    official scripts' ``{"model": ..., "args": Namespace}``), or None, from one read."""
    obj = _load(src)
    return _state_dict(obj, copy=isinstance(src, Mapping)), _saved_args(obj)


def read_source(path, include_model_state: bool = False) -> Dict[str, torch.Tensor]:
    """Flat ``{name: tensor}`` of an official ``.pth`` / ``.safetensors`` file, a mim
    checkpoint directory or its ``state.safetensors`` (the ``params.*`` tensors, and with
    ``include_model_state`` the ``model_state.*`` ones such as a linear probe's batch-norm
    statistics), or a mim run's workdir (its newest checkpoint that verifies)."""
    from mim.checkpoints import io

    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, io.STATE)):
        found = io.latest(os.path.join(path, "checkpoints"))
        if found is None:
            raise FileNotFoundError(f"{path} is neither a mim checkpoint directory nor a mim "
                                    f"workdir with checkpoints/step_*")
        path = found[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path) or path.endswith(".safetensors"):
        saved = read_state_dict(path)
        if any(k.startswith("params.") for k in saved):
            flat = {k[len("params."):]: v for k, v in saved.items() if k.startswith("params.")}
            if include_model_state:
                flat.update({k[len("model_state."):]: v for k, v in saved.items()
                             if k.startswith("model_state.")})
            return flat
        return saved
    return read_state_dict(path)


def mim_params(path: str) -> Dict[str, torch.Tensor]:
    """The parameters of a mim train-state checkpoint (directory or state.safetensors)."""
    sd = read_state_dict(path)
    params = {k[len("params."):]: v for k, v in sd.items() if k.startswith("params.")}
    if not params:
        raise ValueError(f"{path} is not a mim checkpoint (no 'params.' tensors)")
    return params


def merge_into(params: dict, loaded: Dict[str, torch.Tensor], *, skip=(), adapt=None,
               source: str = "") -> dict:
    """Overwrite ``params`` leaves by name from ``loaded``.

    Names in ``skip`` (e.g. a classifier head of another class count) keep their fresh
    initialisation; ``adapt(name, tensor, target)`` may reshape (position embeddings).
    Any other missing, unexpected or mis-shaped name is an error."""
    flat = tree.flatten(params)
    missing = [k for k in flat if k not in loaded and k not in skip]
    unexpected = [k for k in loaded if k not in flat]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    out = {}
    for k, t in flat.items():
        if k in skip or k not in loaded:
            out[k] = t
            continue
        v = loaded[k]
        if adapt is not None:
            v = adapt(k, v, t)
        if v.shape != t.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(t.shape)}")
        out[k] = v.to(t.dtype)
    return tree.unflatten(out)
