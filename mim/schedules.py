"""Learning-rate and weight-decay schedules as each reference trainer computes them.

A schedule is a function of the optimizer-step *tensor* (``state["step"]``: optimizer
steps done), so it runs inside a compiled step without a host round-trip. It returns
``(shared, scaled)`` and a parameter group with lr scale ``s`` (layer decay, lr
multipliers) trains at ``shared + scaled * s``. That one affine form covers both ways the
references scale a group:

* MAE, BEiT and the ViT-B/32 port multiply one schedule value by the group's scale
  (``param_group["lr"] = lr * param_group["lr_scale"]``): ``shared = 0``.
* timm's schedulers (Swin, SimMIM, MoBY) and torch's (BEiT's linear probe) run each group's
  own curve from its initial lr ``base * s`` to an *unscaled* ``lr_min`` / ``eta_min``
  (and from an unscaled ``warmup_lr_init``): ``shared`` carries those constants.

The schedules also reproduce *when* each loop reads them:

=================  ===========================================================  ============
name               reference (file: function)                                   lr of step k
=================  ===========================================================  ============
``cosine``         MAE ``util/lr_sched.py: adjust_learning_rate``, per           f(k)
                   iteration (fractional epochs)
``beit_cosine``    BEiT ``utils.py: cosine_scheduler`` (``np.linspace`` warm-up)  f(k)
``timm_cosine``    Swin/SimMIM/MoBY ``lr_scheduler.build_scheduler`` -> timm     v(k*A - 1)
                   ``CosineLRScheduler`` (``t_in_epochs=False``), stepped by
                   ``step_update(epoch * num_steps + idx)`` after the optimizer
``timm_multistep`` SimMIM ``lr_scheduler.py: MultiStepLRScheduler``, same stepping  v(k*A - 1)
``vit_cosine``     ViT-pytorch ``utils/scheduler.py: WarmupCosineSchedule``,      f(k + 1)
                   ``scheduler.step()`` *before* ``optimizer.step()`` (train.py)
``epoch_cosine``   BEiT ``run_linear_eval.py``: ``CosineAnnealingLR(T_max=epochs)``  f(floor(k/E))
                   stepped once per epoch
``constant``       linear warm-up, then constant                                 f(k)
=================  ===========================================================  ============

``A`` is the gradient-accumulation count: Swin-family loops count micro-batches
(``num_steps = len(data_loader)``), so optimizer step ``k >= 1`` trains at the value
computed for micro-batch ``k*A - 1`` (the last ``step_update`` before it), and steps 0 and
1 both train at ``warmup_lr_init`` when ``A = 1``. ``E`` is optimizer steps per epoch.

Weight decay: BEiT's ``cosine_scheduler(weight_decay, weight_decay_end, ...)`` (no warm-up),
applied per iteration to the groups that decay (``param_group["weight_decay"] > 0``);
every other reference keeps it constant (``optim.weight_decay_end`` unset).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch

Pair = Tuple[torch.Tensor, torch.Tensor]

SCHEDULES = ("cosine", "beit_cosine", "timm_cosine", "timm_multistep", "vit_cosine",
             "epoch_cosine", "constant")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``lr(step) -> (shared, scaled)``; ``weight_decay(step)``: the decaying groups' weight
    decay (None: each group keeps its own constant value)."""
    lr: Callable[[torch.Tensor], Pair]
    weight_decay: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def group_lrs(self, step: torch.Tensor, scales: Sequence[float]) -> List[torch.Tensor]:
        shared, scaled = self.lr(step)
        return [shared + scaled * s for s in scales]

    def group_weight_decays(self, step: torch.Tensor, decays: Sequence[float]) -> list:
        """Per group: the scheduled value where the group decays, else its own (0)."""
        if self.weight_decay is None:
            return list(decays)
        wd = self.weight_decay(step)
        return [wd if d > 0 else d for d in decays]

    def __call__(self, step: torch.Tensor) -> torch.Tensor:
        """The lr of a group with scale 1 (what the logs show)."""
        shared, scaled = self.lr(step)
        return shared + scaled


def _f32(step: torch.Tensor) -> torch.Tensor:
    return step.to(torch.float32)


def _half_cosine(progress: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * progress))


# ---------------------------------------------------------------------------
# Schedules that scale one value per group (shared = 0)


def mae_cosine(base_lr: float, total_steps: int, warmup_steps: float = 0.0, min_lr: float = 0.0,
               warmup_init_lr: float = 0.0) -> Schedule:
    """MAE ``adjust_learning_rate`` (util/lr_sched.py), called every iteration with the
    fractional epoch ``it / len(data_loader) + epoch``: in optimizer steps, a linear warm-up
    ``base * k / W`` over ``W = warmup_epochs * steps_per_epoch`` steps (not rounded), then a
    half-cosine from ``base`` to ``min_lr`` over the remaining ``total - W`` steps.
    ``warmup_init_lr`` > 0 starts the warm-up there instead of at 0 (MAE has none)."""
    decay = max(total_steps - warmup_steps, 1e-12)

    def lr(step):
        s = _f32(step)
        warm = warmup_init_lr + (base_lr - warmup_init_lr) * s / max(warmup_steps, 1e-12)
        cos = min_lr + (base_lr - min_lr) * _half_cosine(torch.clamp((s - warmup_steps) / decay, 0.0, 1.0))
        return torch.zeros_like(s), torch.where(s < warmup_steps, warm, cos)

    return Schedule(lr)


def beit_cosine_values(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                       start_warmup_value: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """BEiT ``utils.cosine_scheduler`` indexed by the optimizer step: ``np.linspace(start,
    base, W)`` for the first ``W`` steps (its last warm-up step is already ``base``), then
    ``final + (base - final)/2 * (1 + cos(pi * i / (T - W)))`` for ``i = k - W``. Past the
    end (the reference would index out of range) it keeps its last value."""
    cos_len = max(total_steps - warmup_steps, 1)

    def value(step):
        s = torch.clamp(_f32(step), max=float(max(total_steps - 1, 0)))
        if warmup_steps > 1:
            warm = start_warmup_value + (base - start_warmup_value) * s / (warmup_steps - 1)
        else:  # np.linspace(start, base, 1) == [start]
            warm = torch.full_like(s, start_warmup_value)
        cos = final + (base - final) * _half_cosine((s - warmup_steps) / cos_len)
        return torch.where(s < warmup_steps, warm, cos)

    return value


def beit_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                warmup_init_lr: float = 0.0) -> Schedule:
    """BEiT's lr schedule (run_beit_pretraining.py, run_class_finetuning.py:
    ``cosine_scheduler(lr, min_lr, epochs, steps_per_epoch, warmup_epochs, warmup_steps)``,
    ``start_warmup_value`` 0: ``--warmup_lr`` is never passed), read at iteration ``it``
    = optimizer steps done, times each group's ``lr_scale``."""
    value = beit_cosine_values(base_lr, min_lr, total_steps, warmup_steps, warmup_init_lr)

    def lr(step):
        v = value(step)
        return torch.zeros_like(v), v

    return Schedule(lr)


def vit_cosine(base_lr: float, total_steps: int, warmup_steps: int = 0,
               warmup_init_lr: float = 0.0) -> Schedule:
    """ViT-pytorch ``WarmupCosineSchedule`` (a ``LambdaLR``: ``k / W`` during warm-up, then
    ``max(0, (1 + cos(pi * (k - W) / (T - W))) / 2)``) stepped *before* ``optimizer.step()``
    (train.py), so optimizer step ``k`` trains at the factor for ``k + 1``.
    ``warmup_init_lr`` > 0 starts the warm-up there instead of at 0 (the reference has none)."""
    def lr(step):
        s = _f32(step) + 1.0
        warm = warmup_init_lr + (base_lr - warmup_init_lr) * s / max(float(warmup_steps), 1.0)
        cos = base_lr * torch.clamp(_half_cosine((s - warmup_steps) / max(total_steps - warmup_steps, 1)), min=0.0)
        v = torch.where(s < warmup_steps, warm, cos)
        return torch.zeros_like(v), v

    return Schedule(lr)


def warmup_constant(base_lr: float, warmup_steps: int = 0, warmup_init_lr: float = 0.0) -> Schedule:
    def lr(step):
        s = _f32(step)
        frac = torch.clamp(s / max(warmup_steps, 1), max=1.0) if warmup_steps else torch.ones_like(s)
        return torch.zeros_like(s), warmup_init_lr + (base_lr - warmup_init_lr) * frac

    return Schedule(lr)


# ---------------------------------------------------------------------------
# Schedules that run each group's own curve (timm / torch schedulers)


def _timm_t(step: torch.Tensor, accum: int) -> torch.Tensor:
    """The scheduler's last ``step_update`` index before optimizer step ``k``: micro-batch
    ``k * accum - 1`` (none yet at ``k = 0``: the value set at construction, equal to
    ``v(0)``)."""
    return torch.clamp(_f32(step) * accum - 1.0, min=0.0)


def _timm_warmup(t, warmup_t: int, warmup_lr_init: float, base_lr: float) -> Pair:
    """timm's warm-up ``warmup_lr_init + t * (base_g - warmup_lr_init) / warmup_t`` for a
    group of initial lr ``base_g = base_lr * s``, as (shared, scaled)."""
    frac = t / max(warmup_t, 1)
    return warmup_lr_init * (1.0 - frac), base_lr * frac


def timm_cosine(base_lr: float, total_micro: int, warmup_micro: int = 0, min_lr: float = 0.0,
                warmup_lr_init: float = 0.0, accum: int = 1) -> Schedule:
    """timm ``CosineLRScheduler(t_initial=T, lr_min, warmup_lr_init, warmup_t=W,
    cycle_limit=1, t_in_epochs=False)`` as Swin's ``build_scheduler`` makes it (``T``, ``W``
    in micro-batches): ``warmup_lr_init + t (base_g - warmup_lr_init) / W`` for ``t < W``,
    then ``lr_min + (base_g - lr_min)/2 (1 + cos(pi t / T))`` (counted from 0, not from the
    end of the warm-up), ``lr_min`` from ``T`` on; read at ``t = k*accum - 1``."""
    def lr(step):
        t = _timm_t(step, accum)
        ws, wb = _timm_warmup(t, warmup_micro, warmup_lr_init, base_lr)
        c = torch.where(t < total_micro, _half_cosine(t / max(total_micro, 1)), torch.zeros_like(t))
        cs, cb = min_lr * (1.0 - c), base_lr * c
        warm = t < warmup_micro
        return torch.where(warm, ws, cs), torch.where(warm, wb, cb)

    return Schedule(lr)


def timm_multistep(base_lr: float, milestones_micro: Sequence[int], gamma: float = 0.1,
                   warmup_micro: int = 0, warmup_lr_init: float = 0.0, accum: int = 1) -> Schedule:
    """SimMIM's ``MultiStepLRScheduler`` (lr_scheduler.py): timm's warm-up, then
    ``base_g * gamma ** bisect_right(milestones, t)`` (milestones ``epoch * len(loader)``,
    micro-batches), stepped as :func:`timm_cosine`."""
    def lr(step):
        t = _timm_t(step, accum)
        ws, wb = _timm_warmup(t, warmup_micro, warmup_lr_init, base_lr)
        passed = sum((t >= m).to(torch.float32) for m in milestones_micro) if milestones_micro else torch.zeros_like(t)
        decayed = base_lr * torch.pow(torch.full_like(t, gamma), passed)
        warm = t < warmup_micro
        return torch.where(warm, ws, torch.zeros_like(t)), torch.where(warm, wb, decayed)

    return Schedule(lr)


def epoch_cosine(base_lr: float, epochs: int, steps_per_epoch: int, min_lr: float = 0.0) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min)`` stepped once per
    epoch (BEiT run_linear_eval.py): epoch ``e`` trains every group at
    ``eta_min + (base_g - eta_min)/2 (1 + cos(pi e / T_max))``."""
    def lr(step):
        e = torch.floor(_f32(step) / max(steps_per_epoch, 1))
        c = _half_cosine(e / max(epochs, 1))
        return min_lr * (1.0 - c), base_lr * c

    return Schedule(lr)


def with_weight_decay(schedule: Schedule, weight_decay: float, weight_decay_end: float,
                      total_steps: int) -> Schedule:
    """BEiT's weight-decay schedule: ``cosine_scheduler(weight_decay, weight_decay_end,
    epochs, steps_per_epoch)`` (no warm-up), read per optimizer step by the decaying groups."""
    return dataclasses.replace(
        schedule, weight_decay=beit_cosine_values(weight_decay, weight_decay_end, total_steps))
