"""The patch k-means tokenizer's codebook file (:mod:`mim.models.patch_kmeans`): one
safetensors tensor ``codebook`` of shape ``(vocab_size, 3 pool^2)``, as a run saves it
beside itself (``<workdir>/frozen/tokenizer.safetensors``)."""
from __future__ import annotations

import safetensors.torch

from mim.models import patch_kmeans


def load(path: str, model_cfg) -> dict:
    try:
        flat = safetensors.torch.load_file(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ValueError(f"{path}: not a safetensors codebook file ({type(e).__name__})") from None
    if set(flat) != {"codebook"}:
        raise ValueError(f"{path}: a k-means codebook file holds one tensor 'codebook', "
                         f"this one holds {sorted(flat)[:5]}")
    want = (model_cfg.vocab_size, patch_kmeans.feature_dim(model_cfg))
    if tuple(flat["codebook"].shape) != want:
        raise ValueError(f"{path}: codebook of shape {tuple(flat['codebook'].shape)}, config.tokenizer "
                         f"(vocab_size={model_cfg.vocab_size}, pool={model_cfg.pool}) needs {want}")
    return {"codebook": flat["codebook"].float()}

