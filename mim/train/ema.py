"""Model EMA: an exponential moving average of the trainable parameters, updated once per
optimizer step after the parameter update (``config.ema``).

As timm's ``ModelEmaV3`` (``ema.lerp_(param, 1 - decay)``): with ``warmup`` the decay of
update ``s`` (optimizer steps done, counting this one) is timm's ``get_decay(step=s)``:
0 at the first update (the average starts at the trained weights), then
``min(decay, 1 - (1 + t) ** -2/3)`` for ``t = s - 1``. Without it the decay is constant
from the first update, as BEiT's ``--model_ema`` (timm's ``ModelEma.update(model)``, the
average starting from the weights the run began with; run_class_finetuning.py updates it
after every optimizer step, ``--model_ema_decay`` 0.9999).

The average is kept in fp32 (from the fp32 master weights under the O2 policies), whole on
every rank (also under FSDP), in the train state as ``state["ema"]``: checkpointed and
resumed with everything else. BatchNorm statistics and other model state are not averaged
(``ModelEmaV3(exclude_buffers=True)``): evaluation of the average reads the run's own.
"""
from __future__ import annotations

from typing import Dict

import torch

WARMUP_POWER = 2.0 / 3.0     # ModelEmaV3's warmup_power (warmup_gamma 1)


def init(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The average at the start: the run's initial (trainable) weights, in fp32."""
    return {n: p.detach().to(torch.float32).clone() for n, p in params.items()}


def decay_at(step: torch.Tensor, decay, warmup: bool) -> torch.Tensor:
    """The decay of the update made after optimizer step ``step`` (steps done, counting it).
    ``decay``: a float, or a 0-d fp32 tensor (each member's own in a vectorized run)."""
    if not warmup:
        if isinstance(decay, torch.Tensor):
            return decay.to(torch.float32)
        return torch.full((), decay, dtype=torch.float32, device=step.device)
    t = torch.clamp(step.to(torch.float32) - 1.0, min=0.0)
    if isinstance(decay, torch.Tensor):  # min(max(x, 0), decay) = clamp(x, 0, decay): decay >= 0
        warm = torch.minimum(torch.clamp(1.0 - (1.0 + t) ** -WARMUP_POWER, min=0.0),
                             decay.to(torch.float32))
    else:
        warm = torch.clamp(1.0 - (1.0 + t) ** -WARMUP_POWER, min=0.0, max=decay)
    return torch.where(t <= 0, torch.zeros_like(t), warm)


@torch.no_grad()
def update_(ema: Dict[str, torch.Tensor], params: Dict[str, torch.Tensor], step: torch.Tensor,
            decay, warmup: bool) -> None:
    """``ema = lerp(ema, params, 1 - decay)`` in place, for every averaged name."""
    names = list(ema)
    weight = 1.0 - decay_at(step, decay, warmup)
    torch._foreach_lerp_([ema[n] for n in names], [params[n].to(torch.float32) for n in names],
                         weight.to(ema[names[0]].device))
