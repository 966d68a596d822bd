"""Probe grids: every (lr, weight decay, block) linear head of a linear probe trained
together over ONE forward of the frozen encoder per batch (``config.probe.lr_grid``,
``config.probe.wd_grid``), as DINOv2's ``eval/linear.py`` trains its grid of classifiers.

Head ``k`` is its own parameter pair ``grid.<k>.weight`` / ``grid.<k>.bias`` and its own
optimizer parameter group: lr scale ``lr_k / base`` (``base``: ``optim.lr``, or
``optim.base_lr`` when the run sets that, the units of ``lr_grid``) on the run's schedule, and
weight decay ``wd_k`` (:func:`rules`). The forward stacks the heads along a leading axis and
computes every head's logits in one batched matmul; the loss is the sum of the heads'
losses, so the gradient reaching head ``k`` is exactly its own. Per-tensor optimizer
state and per-tensor quantities (LARS's trust ratio, the weight-decay masks) are then
each head's own: every head of a grid follows the trajectory of a probe trained alone with
that lr and weight decay from the same seed (``tests/test_probe_grid.py``), for AdamW,
SGD and LARS. Heads start from the single probe's initial weights (the same draws).

What couples heads is refused (:func:`check`): clipping by the global gradient norm, and a
weight-decay schedule (``optim.weight_decay_end``: one scheduled value for every decaying
group). Under ``fp16`` the loss scale is shared: an overflow in one head skips the step of
all (rare for a linear head; ``bf16`` has no loss scaling).

Selection: with ``probe.holdout`` > 0 a fixed fraction of the train split never trains
(:mod:`mim.data.holdout`) and the head with the best top-1 on it is selected; the run reports
that head's val accuracy (``acc1``), as DINOv2 selects on a held-out set. Without a
holdout the best head is picked on val itself (``best_head``; ``selected_on: val`` in the
summary: optimistic).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch

from mim.config import ConfigError
from mim.tasks import classify


@dataclasses.dataclass(frozen=True)
class Head:
    lr: float
    weight_decay: float
    block: Optional[int]       # features='blocks': the block it reads; None for pooled


def active(config) -> bool:
    p = config.probe
    return bool(tuple(p.get("lr_grid", ()))) or bool(tuple(p.get("wd_grid", ())))


def base_lr(config) -> float:
    """The lr that ``lr_grid`` values are in the units of: ``optim.lr``, or ``optim.base_lr``
    (scaled by batch/256 like it) when the run sets that."""
    o = config.optim
    return o.lr if o.lr > 0 else o.base_lr


def check(config) -> None:
    """One-line errors naming the field."""
    p, o = config.probe, config.optim
    for field in ("lr_grid", "wd_grid"):
        values = p.get(field, ())
        if isinstance(values, (int, float)) or isinstance(values, str):
            raise ConfigError(f"config.probe.{field}: must be a tuple of numbers, got {values!r}")
        for v in values:
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"config.probe.{field}: {v!r} is not a finite number")
        if len(set(values)) != len(tuple(values)):
            raise ConfigError(f"config.probe.{field}: repeated values in {tuple(values)}")
    if any(v <= 0 for v in p.get("lr_grid", ())):
        raise ConfigError(f"config.probe.lr_grid: every lr must be > 0, got {tuple(p.lr_grid)}")
    if any(v < 0 for v in p.get("wd_grid", ())):
        raise ConfigError(f"config.probe.wd_grid: every weight decay must be >= 0, got {tuple(p.wd_grid)}")
    h = p.get("holdout", 0.0)
    if not isinstance(h, (int, float)) or not 0.0 <= h < 1.0:
        raise ConfigError(f"config.probe.holdout: must be a fraction in [0, 1), got {h!r}")
    if not active(config):
        return
    if o.clip_grad:
        raise ConfigError("config.optim.clip_grad: a probe grid trains independent heads; clipping "
                          "by the global norm of all of them would couple them (set 0)")
    if tuple(p.get("wd_grid", ())) and o.weight_decay_end is not None:
        raise ConfigError("config.probe.wd_grid: optim.weight_decay_end schedules one weight decay "
                          "for every head; a weight-decay grid needs it unset (None)")


def heads(config, n_blocks: int) -> List[Head]:
    """Every head, in the order ``grid.<k>``: lr-major, then weight decay, then block."""
    p = config.probe
    lrs = tuple(p.get("lr_grid", ())) or (base_lr(config),)
    wds = tuple(p.get("wd_grid", ())) or (config.optim.weight_decay,)
    blocks = list(range(n_blocks)) if p.features == "blocks" else [None]
    return [Head(float(lr), float(wd), b) for lr in lrs for wd in wds for b in blocks]


def init(single: List[dict], hs: List[Head]) -> dict:
    """``grid.<k>``: a copy of the single probe's head of the features it reads (``single``:
    one ``{weight, bias}`` per feature, as the single probe draws them)."""
    return {str(k): {n: t.clone() for n, t in single[h.block or 0].items()} for k, h in enumerate(hs)}


def rules(config, hs: List[Head]):
    """(lr multipliers, weight decays) as ``(regex, value)`` rules over the flat names."""
    base = base_lr(config)
    lr = tuple((rf"^grid\.{k}\.", h.lr / base) for k, h in enumerate(hs))
    wd = tuple((rf"^grid\.{k}\.", h.weight_decay) for k, h in enumerate(hs))
    return lr, wd


def logits(grid: dict, feats: List[torch.Tensor], hs: List[Head]) -> torch.Tensor:
    """``(H, B, C)``: every head's logits from one stacked matmul. ``feats``: one ``(B, D)``
    per feature (one for pooled; one per block)."""
    w = torch.stack([grid[str(k)]["weight"] for k in range(len(hs))])      # (H, C, D)
    b = torch.stack([grid[str(k)]["bias"] for k in range(len(hs))])        # (H, C)
    if len(feats) == 1:
        x = feats[0].to(w.dtype)                                           # shared by every head
        h, c, d = w.shape
        out = (x @ w.reshape(h * c, d).t()).view(x.shape[0], h, c).transpose(0, 1)
        return out + b[:, None, :]
    x = torch.stack([feats[hd.block] for hd in hs]).to(w.dtype)           # (H, B, D)
    return torch.baddbmm(b[:, None, :], x, w.transpose(1, 2))


def loss(z: torch.Tensor, label: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The sum over heads of each head's mean cross-entropy."""
    h, b, c = z.shape
    return classify.smoothed_cross_entropy(z.float().reshape(h * b, c), label.repeat(h),
                                           label_smoothing, reduction="sum") / b


# ---------------------------------------------------------------------------
# Reporting


def select(val: dict, held: dict, unit: str) -> dict:
    """``val`` with each ``<unit>``'s holdout top-1 added and the selection made on it:
    ``selected_<unit>`` (best holdout top-1, ties to the lowest index) and ``acc1`` / ``acc5``
    / ``loss`` of that unit on val."""
    out = dict(val)
    ids = sorted(int(k[len(f"acc1_{unit}"):]) for k in held if k.startswith(f"acc1_{unit}"))
    for i in ids:
        out[f"holdout_acc1_{unit}{i}"] = held[f"acc1_{unit}{i}"]
    out["holdout_count"] = held.get("count", 0)
    best = max(ids, key=lambda i: held[f"acc1_{unit}{i}"])
    out.pop(f"best_{unit}", None)
    out.update({f"selected_{unit}": best, "holdout_acc1": held[f"acc1_{unit}{best}"]})
    for m in ("acc1", "acc5", "loss"):
        if f"{m}_{unit}{best}" in out:
            out[m] = out[f"{m}_{unit}{best}"]
    return out


def report(config, metrics: dict, hs: List[Head]):
    """``(summary entries, results.md text)``: every head's lr, weight decay, block and
    accuracies, and the selected one."""
    sel = metrics.get("selected_head", metrics.get("best_head"))
    rows = []
    for k, h in enumerate(hs):
        row = {"head": k, "lr": h.lr, "weight_decay": h.weight_decay}
        if h.block is not None:
            row["block"] = h.block
        for m in ("acc1", "acc5", "loss"):
            if f"{m}_head{k}" in metrics:
                row[f"val_{m}"] = metrics[f"{m}_head{k}"]
        if f"holdout_acc1_head{k}" in metrics:
            row["holdout_acc1"] = metrics[f"holdout_acc1_head{k}"]
        rows.append(row)
    on = "holdout" if "selected_head" in metrics else "val"
    extra = {"probe_heads": rows, "probe_selected": dict(rows[sel], selected_on=on)} if rows and sel is not None \
        else {"probe_heads": rows}
    cols = [c for c in ("head", "lr", "weight_decay", "block", "holdout_acc1", "val_acc1", "val_acc5", "val_loss")
            if any(c in r for r in rows)]
    fmt = {"lr": "{:.4g}", "weight_decay": "{:.4g}", "holdout_acc1": "{:.2f}", "val_acc1": "{:.2f}",
           "val_acc5": "{:.2f}", "val_loss": "{:.4f}"}
    lines = [f"# Linear-probe grid: {len(rows)} heads",
             "",
             f"Selected on the {'held-out part of the train split' if on == 'holdout' else 'val split (no probe.holdout: optimistic)'}: "
             f"head {sel}" + (f", val top-1 **{rows[sel]['val_acc1']:.2f}%**" if sel is not None and "val_acc1" in rows[sel] else ""),
             "",
             "| " + " | ".join(cols) + " | selected |",
             "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [fmt.get(c, "{}").format(r[c]) if c in r else "" for c in cols]
        lines.append("| " + " | ".join(cells) + f" | {'*' if r['head'] == sel else ''} |")
    return extra, "\n".join(lines) + "\n"
