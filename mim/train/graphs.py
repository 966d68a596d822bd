"""``config.cuda_graphs``: the whole train step recorded once as a CUDA graph and replayed.

A ViT step launches thousands of kernels; when they are short (small models, small
per-device batches) the CPU cannot launch them as fast as the GPU runs them. A CUDA
graph launches the recorded sequence in one call.

It suits mim's step because the step is a function whose state is donated: the
optimizer writes the parameters and its moments in place, and the step never reads a
value back to the host (no ``.item()``). So the graph's inputs are (a) the state
tensors, which keep their addresses from step to step, and (b) the batch, copied into
static buffers before each replay. Random numbers (drop path, dropout) come from the
CUDA generator, which torch registers with the graph: each replay draws from the seed
and offset the generator has at that moment, so re-seeding it before a step (as the
loop does) works as it does eagerly.

:class:`GraphedStep` runs the first ``warmup`` calls normally on a side stream (lazy
initialisation, cuBLAS workspaces and ``torch.compile`` happen there), records the next
call and replays the recording from then on; every call is exactly one training step.
The batch's keys, shapes and dtypes must stay fixed (the training sampler's batches do),
and the state must be the same tensors at every call; both are checked.

The recording is made by ``capture(fn) -> replay``: :func:`cuda_capture` on a GPU. Tests
on the CPU pass a capture that calls ``fn`` again at replay, which exercises everything
here except the driver.
"""
from __future__ import annotations

import contextlib

from typing import Callable, Dict, Optional, Tuple

import torch

from mim import tree

WARMUP = 3      # ordinary steps before the recording


def cuda_capture(fn: Callable[[], object]) -> Tuple[Callable[[], None], object]:
    """Record ``fn()`` into a CUDA graph: (replay, what ``fn`` returned during the
    recording, whose tensors every replay overwrites)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def _side_stream(device):
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    return s


class GraphedStep:
    """``state, metrics = step(state, batch)`` replayed from a CUDA graph after
    ``warmup`` ordinary calls. ``metrics`` are fresh tensors (copies of the graph's
    outputs), safe to keep across steps."""

    def __init__(self, step: Callable, warmup: int = WARMUP,
                 capture: Callable[[Callable[[], object]], Tuple[Callable[[], None], object]] = cuda_capture):
        if warmup < 1:
            raise ValueError("cuda graphs need at least one warm-up step before recording")
        self.step, self.warmup, self.capture = step, warmup, capture
        self.calls = 0
        self.replay: Optional[Callable[[], None]] = None

    def __call__(self, state: dict, batch: Dict[str, torch.Tensor]):
        self.calls += 1
        if self.replay is None and self.calls <= self.warmup:
            device = next(iter(batch.values())).device
            stream = _side_stream(device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                out = self.step(state, batch)
            if stream is not None:
                torch.cuda.current_stream(device).wait_stream(stream)
            return out
        if self.replay is None:
            self._record(state, batch)
        else:
            self._check(state, batch)
            for k, v in batch.items():
                self.static_batch[k].copy_(v, non_blocking=True)
        self.replay()
        return state, {k: v.clone() for k, v in self.static_metrics.items()}

    def _record(self, state, batch):
        self.static_batch = {k: v.clone() for k, v in batch.items()}
        self.state_leaves = _leaves(state)

        def run():
            return self.step(state, self.static_batch)

        self.replay, (new_state, metrics) = self.capture(run)
        moved = [n for n, t in _leaves(new_state).items()
                 if n not in self.state_leaves or t is not self.state_leaves[n]]
        if moved:
            raise RuntimeError(f"config.cuda_graphs: the step returned new tensors for {moved[:4]} "
                               f"instead of updating the state in place; it cannot be replayed")
        self.static_metrics = dict(metrics)

    def _check(self, state, batch):
        leaves = _leaves(state)
        if leaves.keys() != self.state_leaves.keys() or any(
                t is not self.state_leaves[n] for n, t in leaves.items()):
            raise RuntimeError("config.cuda_graphs: the train state is not the one the graph was "
                               "recorded with (restored or rebuilt since?)")
        if batch.keys() != self.static_batch.keys():
            raise ValueError(f"config.cuda_graphs: batch keys {sorted(batch)} differ from the "
                             f"recorded {sorted(self.static_batch)}")
        for k, v in batch.items():
            s = self.static_batch[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise ValueError(f"config.cuda_graphs needs batches of one shape: {k} is "
                                 f"{tuple(v.shape)} {v.dtype}, recorded {tuple(s.shape)} {s.dtype}")


def _leaves(state) -> Dict[str, torch.Tensor]:
    return {n: t for n, t in tree.flatten(state).items() if isinstance(t, torch.Tensor)}
