"""Weighted k-NN classification on frozen features (Wu et al. 2018, Sec. 3.4; the
protocol of DINO's and solo-learn's k-NN evaluators): every eval image votes with its
``k`` most cosine-similar train images, each weighted by ``exp(similarity / T)``; the class
with the largest summed weight wins. ``k = 20``, ``T = 0.07`` by default.

The features are the task's encoder features (:func:`mim.tasks.features`: the pooled
pre-logits of ViT, BEiT-style ViT, Swin, MAE's or SimMIM's encoder, MoBY's online
encoder) of the train split and of the eval split, both through the eval transform.
On several ranks each computes its share of both splits and the train bank is
all-gathered.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mim import tasks


def classify(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
             num_classes: int, k: int = 20, temperature: float = 0.07,
             chunk: int = 256) -> torch.Tensor:
    """Class scores ``(N, num_classes)`` of ``features`` (unnormalised: they are
    L2-normalised here, as the bank is), by weighted votes of the ``k`` nearest bank rows."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for q in F.normalize(features.float(), dim=1).split(chunk):
        sim = q @ bank.T
        top, idx = sim.topk(k, dim=1)
        weight = (top / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], weight)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _features(setup, params, model_state, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    from mim.data import pipeline
    c, be, task = setup.config, setup.be, setup.task
    loader = pipeline.split_loader(c, be, split)
    views = {"image": tasks.image_keys(task, c, train=False).get("image")}
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            if "image" not in batch:        # every file of this batch was unreadable (skipped)
                continue
            batch = pipeline.to_device(batch, be.device, c.data, train=False, views=views)
            batch = be.cast_inputs(batch, ("image",))
            with be.autocast():
                f = tasks.features(task, params, model_state, batch["image"], c)["pooled"]
            feats.append(f.float())
            labels.append(batch["label"])
    dim = feats[0].shape[1] if feats else 0
    f = torch.cat(feats) if feats else torch.zeros(0, dim, device=be.device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=be.device)
    return f, y


def _all_gather(x: torch.Tensor, be) -> torch.Tensor:
    if not be.distributed:
        return x
    sizes = [None] * be.world_size
    dist.all_gather_object(sizes, (x.shape[0], x.shape[1:] if x.ndim > 1 else ()))
    width = max(n for n, _ in sizes)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    gathered = [torch.zeros_like(padded) for _ in range(be.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, (n, _) in zip(gathered, sizes)])


def evaluate(setup, params, model_state) -> Dict[str, float]:
    """k-NN top-1 / top-5 (%) of the eval split against the train split."""
    c, be = setup.config, setup.be
    bank, bank_labels = _features(setup, params, model_state, c.data.train_split)
    query, labels = _features(setup, params, model_state, c.data.eval_split)
    bank, bank_labels = _all_gather(bank, be), _all_gather(bank_labels, be)
    num_classes = int(bank_labels.max().item()) + 1 if bank_labels.numel() else 1
    num_classes = max(num_classes, int(labels.max().item()) + 1 if labels.numel() else 1)
    scores = classify(bank, bank_labels, query, num_classes, c.knn.k, c.knn.temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices if scores.numel() else scores
    hit = top == labels[:, None]
    sums = torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum(),
                        torch.tensor(labels.shape[0], device=labels.device)]).double()
    if be.distributed:
        dist.all_reduce(sums)
    correct1, correct5, n = sums.tolist()
    out = {"acc1": 100.0 * correct1 / max(n, 1), "count": int(n), "train_images": int(bank.shape[0])}
    if num_classes >= 5:  # top-5 of fewer classes is always 100%
        out["acc5"] = 100.0 * correct5 / max(n, 1)
    return out
