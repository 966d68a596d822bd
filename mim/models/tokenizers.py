"""Visual tokenizers: frozen networks that turn an image into a grid of discrete token ids,
the targets of BEiT pretraining (Bao et al., 2022, Sec. 2.2).

``config.tokenizer`` names one (``name``), its weights file (``weights``; "" builds it from
the run's seed: a random DALL-E encoder for tests, a fitted k-means codebook), the side of the image it reads (``image_size``;
BEiT: 112 px, the ``--second_input_size``), its compute dtype (``dtype``) and its own model
fields (``model``). Two are known: ``dalle`` (BEiT's DALL-E dVAE encoder) and ``kmeans``
(:mod:`mim.models.patch_kmeans`: a patch codebook fitted on the run's first training
crops when ``weights`` is "", saved beside the run; the ``:tiny`` recipes' default).
A tokenizer is a :class:`Tokenizer` of functions in :data:`TOKENIZERS`;
adding one is one entry there and a weight reader under ``mim/checkpoints`` (the DALL-E
encoder's is :func:`mim.checkpoints.dalle.load`), named in the BEiT task's loader table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import ml_collections
import torch

from mim.models import dalle, patch_kmeans

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """``model_config(**kw)`` -> model fields; ``init(gen, model_cfg)`` -> tree;
    ``logits(params, x, model_cfg, dtype)`` -> ``(B, vocab, h, w)`` for an input already
    normalised with ``input_mean`` / ``input_std`` (on [0, 1] pixels); ``downsample``: image
    pixels per token side; ``vocab_size(model_cfg)``; ``fit(images, model_cfg, gen)`` ->
    tree, for a tokenizer built from training images rather than initialised (``None``:
    ``weights=""`` initialises it from the seed); ``fit_images(model_cfg)``: how many."""
    model_config: Callable
    init: Callable
    logits: Callable
    vocab_size: Callable
    downsample: int
    input_mean: Tuple[float, ...]
    input_std: Tuple[float, ...]
    fit: Optional[Callable] = None
    fit_images: Optional[Callable] = None


def _dalle_logits(params, x, model_cfg, dtype):
    return dalle.apply(params, x, model_cfg, float16=dtype == torch.float16)


TOKENIZERS = {
    "dalle": Tokenizer(
        model_config=dalle.config, init=dalle.init, logits=_dalle_logits,
        vocab_size=lambda m: m.vocab_size, downsample=dalle.DOWNSAMPLE,
        input_mean=(dalle.INPUT_MEAN,) * 3, input_std=(dalle.INPUT_STD,) * 3),
    "kmeans": Tokenizer(
        model_config=patch_kmeans.config, init=patch_kmeans.init,
        logits=patch_kmeans.logits, vocab_size=lambda m: m.vocab_size,
        downsample=patch_kmeans.DOWNSAMPLE, input_mean=(0.0,) * 3, input_std=(1.0,) * 3,
        fit=patch_kmeans.fit, fit_images=lambda m: m.fit_images),
}


def get(cfg) -> Tokenizer:
    if cfg.name not in TOKENIZERS:
        raise ValueError(f"config.tokenizer.name={cfg.name!r}: must be one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[cfg.name]


def config(name: str = "dalle", weights: str = "", image_size: int = 112, dtype: str = "float32",
           interpolation: str = "lanczos", **model) -> ml_collections.ConfigDict:
    """``config.tokenizer``. ``image_size`` and ``interpolation``: the tokenizer's view of
    each crop (BEiT: ``--second_input_size 112``, ``--second_interpolation lanczos``).
    ``dtype="float16"`` runs the DALL-E encoder as the official code does on CUDA (every
    convolution but the output one in float16); "float32" is what it does on the CPU.
    ``model`` overrides the tokenizer's own fields (``n_hid``, ...; ``vocab_size``, ``pool``
    for ``kmeans``)."""
    if name not in TOKENIZERS:
        raise ValueError(f"tokenizer name={name!r}: must be one of {sorted(TOKENIZERS)}")
    c = ml_collections.ConfigDict(dict(
        name=name, weights=weights, image_size=image_size, dtype=dtype,
        interpolation=interpolation, model=TOKENIZERS[name].model_config(**model)))
    validate(c)
    return c


def validate(cfg) -> None:
    tok = get(cfg)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"config.tokenizer.dtype={cfg.dtype!r}: must be one of {sorted(DTYPES)}")
    if cfg.image_size % tok.downsample:
        raise ValueError(f"config.tokenizer.image_size={cfg.image_size}: must be a multiple of "
                         f"{tok.downsample} (the {cfg.name} tokenizer's pixels per token)")
    if cfg.model.name != cfg.name:
        raise ValueError(f"config.tokenizer.model is a {cfg.model.name!r} config for tokenizer "
                         f"{cfg.name!r}")


def grid_size(cfg) -> int:
    """Tokens per side."""
    return cfg.image_size // get(cfg).downsample


def vocab_size(cfg) -> int:
    return get(cfg).vocab_size(cfg.model)


def normalization(cfg) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """``(mean, std)`` that turn [0, 1] pixels into the tokenizer's input (DALL-E:
    ``0.8 x + 0.1`` = ``(x + 0.125) / 1.25``)."""
    tok = get(cfg)
    return tok.input_mean, tok.input_std


def init(gen: torch.Generator, cfg) -> dict:
    return get(cfg).init(gen, cfg.model)


def token_ids(params, x: torch.Tensor, cfg) -> torch.Tensor:
    """``(B, h * w)`` int64 token ids (row-major, as BEiT's ``input_ids.flatten(1)``) of
    ``x`` normalised with :func:`normalization`, without gradients and outside autocast:
    the tokenizer runs in ``cfg.dtype`` whatever the run's precision policy."""
    tok = get(cfg)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        logits = tok.logits(params, x.float(), cfg.model, DTYPES[cfg.dtype])
    return logits.argmax(dim=1).flatten(1)
