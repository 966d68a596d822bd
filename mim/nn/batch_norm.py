"""Batch normalisation (Ioffe & Szegedy 2015) whose batch statistics cover the global
batch over all data-parallel ranks (SyncBatchNorm), as pure functions that work under
``torch.func.grad``. MoBY's projector and predictor use it (Xie et al. 2021, Sec. 3.2,
following BYOL/MoCo v3: statistics of the whole batch, not of each device's part).

Gradients: the sum of the per-rank statistics is an all-reduce whose backward pass is
an all-reduce of the incoming gradients. With the step's average of the parameter
gradients over ranks (``mim.train.step``), that gives the gradient of the mean loss of
all ranks, as torch.nn.SyncBatchNorm + DDP do.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over ranks of x`` on every rank; backward: the sum of the gradients."""

    @staticmethod
    def forward(x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):  # the functorch-compatible form
        pass

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (identity on a single rank)."""
    return _AllReduceSum.apply(x) if _distributed() else x


def sync_batch_stats(mean: torch.Tensor, var: torch.Tensor, count) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(mean, biased variance, count)`` from each rank's per-channel mean, biased
    variance and number of samples. The variance combines as Chan et al. (1979):
    ``sum_r n_r (var_r + (mean_r - mean)^2) / n`` (two small all-reduces, no
    ``E[x^2] - E[x]^2`` cancellation). Differentiable; identity on a single rank."""
    # a fill, not a copy from the host: no synchronisation, and a CUDA graph can record it
    count = torch.full((1,), float(count), dtype=mean.dtype, device=mean.device)
    if not _distributed():
        return mean, var, count[0]
    first = all_reduce_sum(torch.cat([mean * count, count]))
    n = first[-1]
    g_mean = first[:-1] / n
    g_var = all_reduce_sum(count * (var + (mean - g_mean) ** 2)) / n
    return g_mean, g_var, n


def init(num_features: int, dtype=torch.float32) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``(params, state)`` as torch.nn.BatchNorm1d's parameters and buffers."""
    params = {"weight": torch.ones(num_features, dtype=dtype), "bias": torch.zeros(num_features, dtype=dtype)}
    state = {"running_mean": torch.zeros(num_features, dtype=dtype),
             "running_var": torch.ones(num_features, dtype=dtype),
             "num_batches_tracked": torch.zeros((), dtype=torch.int64)}
    return params, state


def batch_norm(p: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], x: torch.Tensor, *,
               train: bool, momentum: float = 0.1, eps: float = 1e-5,
               sync: bool = True) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Normalise ``x`` of shape ``(N, C)`` or ``(N, C, ...)`` (channels on dim 1, as
    torch.nn.BatchNorm1d/2d). ``p`` may lack weight/bias (``affine=False``). In training
    the statistics are those of the global batch (``sync``) and a new ``state`` with
    the running averages (unbiased variance, as torch) is returned; ``state`` is not
    modified."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    if train:
        dims = [d for d in range(x.ndim) if d != 1]
        xf = x.float()
        mean = xf.mean(dims)
        var = xf.var(dims, unbiased=False)
        count = x.numel() // x.shape[1]
        if sync:
            mean, var, n = sync_batch_stats(mean, var, count)
        else:
            n = torch.full((), float(count), device=x.device)
        with torch.no_grad():
            unbiased = var.detach() * n / (n - 1).clamp(min=1)
            state = {"running_mean": torch.lerp(state["running_mean"], mean.detach().to(state["running_mean"].dtype), momentum),
                     "running_var": torch.lerp(state["running_var"], unbiased.to(state["running_var"].dtype), momentum),
                     "num_batches_tracked": state["num_batches_tracked"] + 1}
    else:
        mean, var = state["running_mean"].float(), state["running_var"].float()
    y = (x.float() - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    if "weight" in p:
        y = y * p["weight"].reshape(shape) + p["bias"].reshape(shape)
    return y.to(x.dtype), state
