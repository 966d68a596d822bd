"""A patch k-means tokenizer: each ``P x P`` patch of the tokenizer's view becomes the id of
its nearest centroid in a codebook fitted by k-means on the training images.

It is the small-data stand-in for BEiT's DALL-E encoder (a codebook learned from the
images, frozen, whose ids are the masked-prediction targets), in the spirit of iGPT's
9-bit colour palette (Chen et al., 2020, Sec. 3.1: k-means on RGB pixels, k = 512) but
per patch: a token's feature is its patch average-pooled to ``pool x pool`` cells of RGB
(``3 pool^2`` numbers), so the vocabulary holds coarse colour and layout, the content a
32-px image has; with ``normalize`` each token's numbers are standardised first (MAE's
normalised-pixel target), so it holds the patch's pattern without its colour. A randomly initialised DALL-E encoder of the ``:tiny`` size maps most
patches to a handful of ids; k-means spreads them over the vocabulary by construction.

Functions of the :class:`mim.models.tokenizers.Tokenizer` interface (``config``, ``init``,
``logits``) plus :func:`fit`, which the run calls once on its first training batches
(:mod:`mim.train.frozen`). The codebook is the whole tree: ``{"codebook": (vocab, 3 pool^2)}``.
"""
from __future__ import annotations

import ml_collections
import torch
import torch.nn.functional as F

# Image pixels per token side: the DALL-E encoder's 8, so that a 112-px view gives 14x14
# tokens for a 224-px / 16-px ViT and a 64-px view 8x8 for the :tiny one.
DOWNSAMPLE = 8


def config(vocab_size: int = 64, pool: int = 2, normalize: bool = False, fit_images: int = 2048,
           fit_iters: int = 30, **kw) -> ml_collections.ConfigDict:
    """``vocab_size``: centroids; ``pool``: feature cells per patch side (2: 12 numbers per
    token); ``normalize``: each token's features minus their mean over its ``3 pool^2``
    numbers, divided by their standard deviation (MAE's normalised-pixel target,
    models_mae.py ``norm_pix_loss``), so that tokens hold a patch's pattern, not its colour;
    ``fit_images``: training crops the codebook is fitted on; ``fit_iters``: Lloyd
    iterations after k-means++ seeding."""
    if kw:
        raise ValueError(f"patch k-means tokenizer: unknown fields {sorted(kw)}")
    if DOWNSAMPLE % pool:
        raise ValueError(f"patch k-means tokenizer: pool={pool} must divide {DOWNSAMPLE}")
    return ml_collections.ConfigDict(dict(name="kmeans", vocab_size=vocab_size, pool=pool,
                                          normalize=normalize, fit_images=fit_images,
                                          fit_iters=fit_iters))


def feature_dim(cfg) -> int:
    return 3 * cfg.pool * cfg.pool


def features(x: torch.Tensor, cfg) -> torch.Tensor:
    """``(B, h, w, 3 pool^2)`` patch features of ``(B, 3, H, W)`` images: each patch
    average-pooled to ``pool x pool`` cells, channels last within a cell; with
    ``cfg.normalize``, standardised per token as MAE's ``norm_pix_loss`` (unbiased variance,
    ``+ 1e-6`` under the square root)."""
    b, c, hh, ww = x.shape
    h, w, p = hh // DOWNSAMPLE, ww // DOWNSAMPLE, cfg.pool
    cells = F.adaptive_avg_pool2d(x.float(), (h * p, w * p))          # (B, 3, h p, w p)
    cells = cells.view(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)   # (B, h, w, p, p, 3)
    f = cells.reshape(b, h, w, p * p * c)
    if cfg.normalize:
        f = (f - f.mean(-1, keepdim=True)) / (f.var(-1, keepdim=True) + 1e-6) ** 0.5
    return f


def init(gen: torch.Generator, cfg) -> dict:
    """A codebook of uniform [0, 1] colours (tests; a run fits one with :func:`fit`)."""
    return {"codebook": torch.rand(cfg.vocab_size, feature_dim(cfg), generator=gen)}


def logits(params, x: torch.Tensor, cfg, dtype=torch.float32) -> torch.Tensor:
    """``(B, vocab, h, w)``: minus the squared distance of each patch to each centroid
    (its argmax is the nearest centroid). ``dtype`` is ignored: distances are fp32."""
    f = features(x, cfg)
    cb = params["codebook"].float()
    d = (f * f).sum(-1, keepdim=True) - 2 * f @ cb.t() + (cb * cb).sum(-1)
    return (-d).permute(0, 3, 1, 2)


def _nearest(f: torch.Tensor, cb: torch.Tensor):
    d = (f * f).sum(-1, keepdim=True) - 2 * f @ cb.t() + (cb * cb).sum(-1)
    dist, idx = d.min(dim=1)
    return dist.clamp(min=0), idx


def fit(images: torch.Tensor, cfg, gen: torch.Generator) -> dict:
    """The codebook of ``vocab_size`` centroids of the patch features of ``images``
    (``(N, 3, H, W)`` on [0, 1]): k-means++ seeding (Arthur & Vassilvitskii, 2007), then
    ``fit_iters`` Lloyd iterations; a centroid left empty is moved to the patch farthest
    from its own centroid. Deterministic for a given ``gen``."""
    f = features(images, cfg).reshape(-1, feature_dim(cfg)).double()
    k = cfg.vocab_size
    if f.shape[0] < k:
        raise ValueError(f"patch k-means tokenizer: {f.shape[0]} patches for {k} centroids")
    cb = f[torch.randint(0, f.shape[0], (1,), generator=gen)]
    dist = ((f - cb) ** 2).sum(-1)
    for _ in range(1, k):
        i = torch.multinomial(dist / dist.sum(), 1, generator=gen) if dist.sum() > 0 \
            else torch.randint(0, f.shape[0], (1,), generator=gen)
        cb = torch.cat([cb, f[i]])
        dist = torch.minimum(dist, ((f - f[i]) ** 2).sum(-1))
    for _ in range(cfg.fit_iters):
        dist, idx = _nearest(f, cb)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(cb).index_add_(0, idx, f)
        new = sums / counts.clamp(min=1).unsqueeze(1)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.argsort(descending=True)[:len(empty)]
            new[empty] = f[far]
        cb = new
    return {"codebook": cb.float()}
