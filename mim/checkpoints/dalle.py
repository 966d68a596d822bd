"""Weights of the DALL-E dVAE encoder (BEiT's visual tokenizer) in the official ``.w`` / ``.b``
layout (:mod:`mim.models.dalle`), and a one-off conversion of OpenAI's ``encoder.pkl``.

OpenAI publishes the encoder as a pickled ``nn.Module`` (https://cdn.openai.com/dall-e/encoder.pkl;
BEiT's README also mirrors it). Unpickling runs code from the file, so mim never does it
while training. Convert it once, on a machine where you trust the file and have the
``DALL-E`` package (``pip install DALL-E attrs``; the pickle refers to its classes)::

    python -m mim.checkpoints.dalle --trust-pickle encoder.pkl dalle_encoder.safetensors

and set ``config.tokenizer.weights=dalle_encoder.safetensors``. Plain state dicts in the
same layout load directly: ``.safetensors``, or torch files read with ``weights_only=True``
(such as the ``dalle_encoder.pth`` other libraries publish), with the keys at the top level,
under ``model`` / ``state_dict`` / ``module``, or behind one prefix such as ``encoder.``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Dict

import safetensors.torch
import torch

from mim import tree as T
from mim.checkpoints import weights
from mim.models import dalle

_ANCHOR = "blocks.input.w"




def encoder_keys(flat: Dict[str, torch.Tensor], source: str = "") -> Dict[str, torch.Tensor]:
    """The encoder's entries, with the prefix before ``blocks.input.w`` (``encoder.``, ...)
    removed; entries outside that prefix (a decoder) are left out."""
    anchors = [k for k in flat if k == _ANCHOR or k.endswith("." + _ANCHOR)]
    if len(anchors) > 1:
        # The decoder has a blocks.input.w too: a file with both names them encoder/decoder.
        anchors = [k for k in anchors if k[:-len(_ANCHOR)].endswith("encoder.")]
    if len(anchors) != 1:
        raise ValueError(f"{source}: not a DALL-E encoder state dict: expected one '{_ANCHOR}' key, "
                         f"found {anchors or 'none'} (first keys: {list(flat)[:5]})")
    prefix = anchors[0][:-len(_ANCHOR)]
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def from_state_dict(flat: Dict[str, torch.Tensor], cfg, source: str = "state dict") -> dict:
    """Tree for ``cfg`` (:func:`mim.models.dalle.config`); every key and shape must match."""
    flat = encoder_keys(flat, source)
    want = dalle.param_shapes(cfg)
    missing = [k for k in want if k not in flat]
    unexpected = [k for k in flat if k not in want]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match the DALL-E encoder config {dict(cfg)}: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    wrong = [f"{k}: {tuple(flat[k].shape)} vs {shape}" for k, shape in want.items()
             if tuple(flat[k].shape) != shape]
    if wrong:
        raise ValueError(f"{source}: shapes differ from the DALL-E encoder config {dict(cfg)}: {wrong[:8]}")
    return T.unflatten({k: flat[k].float() for k in want})


def load(path, cfg) -> dict:
    """The encoder tree from a ``.safetensors`` file or a torch state-dict file (read with
    ``weights_only=True``). A pickled module (``encoder.pkl``) is refused with the command
    that converts it."""
    path = os.fspath(path)
    try:
        flat = weights.read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain state dict ({e}). If this is OpenAI's pickled "
                         f"encoder.pkl, convert it once where you trust the file: python -m "
                         f"mim.checkpoints.dalle --trust-pickle {path} dalle_encoder.safetensors") from e
    return from_state_dict(flat, cfg, source=path)


def convert_pickle(src: str, dst: str, trust_pickle: bool) -> Dict[str, torch.Tensor]:
    """Unpickle OpenAI's ``encoder.pkl`` (only with ``trust_pickle``) and save its state dict
    as safetensors at ``dst``; returns the saved tensors."""
    if not trust_pickle:
        raise PermissionError(
            f"{src}: converting a pickle runs code from the file; pass --trust-pickle only for a "
            f"file you trust (OpenAI's https://cdn.openai.com/dall-e/encoder.pkl)")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{src} refers to {e.name!r}: install OpenAI's package to "
                                  f"unpickle it (pip install DALL-E attrs)") from e
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(sd, Mapping):
        raise ValueError(f"{src} holds a {type(obj).__name__}, neither a module nor a state dict")
    flat = encoder_keys(dict(sd), src)
    out = {k: v.detach().float().contiguous() for k, v in flat.items()}
    safetensors.torch.save_file(out, dst)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mim.checkpoints.dalle",
        description="Convert OpenAI's pickled DALL-E encoder (encoder.pkl) into a safetensors "
                    "state dict for config.tokenizer.weights.")
    parser.add_argument("src", help="encoder.pkl")
    parser.add_argument("dst", help="output .safetensors")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="required: unpickling runs code from the file")
    args = parser.parse_args(argv)
    if not args.trust_pickle:
        parser.error(f"{args.src}: converting a pickle runs code from the file; add --trust-pickle "
                     f"if you trust it (OpenAI's https://cdn.openai.com/dall-e/encoder.pkl)")
    out = convert_pickle(args.src, args.dst, trust_pickle=True)
    n_hid = out["blocks.input.w"].shape[0]
    vocab = out["blocks.output.conv.w"].shape[0]
    print(f"wrote {args.dst}: {len(out)} tensors, n_hid={n_hid}, vocab_size={vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
