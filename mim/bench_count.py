"""What :mod:`mim.bench` counts besides time: model FLOPs (with the CPU attention kernel
that ``FlopCounterMode`` misses, and the untrained share of a step apart) and the aten
operators, scalar reads and value-dependent shapes of one eager step."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mim import tasks

FROZEN_SHARES = {"beit_pretrain": "tokenizer (frozen, forward only)",
                 "moby_pretrain": "momentum encoder + projector (forward only, no gradient)"}


def frozen_share(setup, state, batch) -> Optional[Callable[[], object]]:
    """The part of mim's step that is never trained, as a call for the FLOP counter: the
    task's frozen networks (``task.frozen_forward``: BEiT's tokenizer) or MoBY's momentum
    encoder and projector on both views; None for the other tasks."""
    c, task, be = setup.config, setup.task, setup.be
    fb = be.cast_inputs(batch, tuple(tasks.image_keys(task, c)))
    if hasattr(task, "frozen_forward"):
        return lambda: task.frozen_forward(setup.frozen, fb, c)
    if c.task == "moby_pretrain":
        from mim.models import moby
        ms = state["model_state"]

        def keys():
            pk, stats = moby.split_buffers(ms["projector_k"])
            for key in ("image", "image2"):
                feat = moby.encode(ms["encoder_k"], fb[key], c.model, train=False, target=True)
                moby.mlp(pk, stats, feat, c.model.proj_num_layers, c.model, train=False)
        return keys
    return None



def _cpu_attention_flops() -> dict:
    """``FlopCounterMode`` counts the CUDA attention kernels (flash, memory-efficient,
    cuDNN) but not the CPU one that ``scaled_dot_product_attention`` takes when no input
    needs a gradient or no mask does (ViT, the momentum or frozen encoders): count it as
    the CUDA ones, so a CPU count does not depend on which path attention took."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is None or bwd is None:
        return {}

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    return {fwd: forward, bwd: backward}     # FlopCounterMode passes shapes


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        fn()
    return counter.get_total_flops()


def _shape_from_data(func, args) -> bool:
    """An operator whose output shape depends on tensor values (``nonzero``,
    ``masked_select``, indexing with a boolean mask, which runs ``nonzero`` inside)."""
    aten = torch.ops.aten
    packet = func.overloadpacket
    if packet in (aten.nonzero, aten.masked_select):
        return True
    if packet is aten.index and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False


def count_ops(fn: Callable[[], object]) -> dict:
    """The aten operators one call of ``fn`` dispatches (each is at least one kernel
    launch on an accelerator, so eagerly the launch overhead scales with it) and, among
    them, scalar reads (``.item()``, ``bool(t)``: ``aten._local_scalar_dense``), which wait
    for the device when the tensor lives there, and the operators whose output shape
    depends on values (``nonzero``, boolean-mask indexing ``x[mask]``): the host reads
    the shape back, the same wait."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = reads = nonzero = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            Count.reads += func.overloadpacket is torch.ops.aten._local_scalar_dense
            Count.nonzero += _shape_from_data(func, args)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return {"aten_ops_per_step": Count.ops, "scalar_reads_per_step": Count.reads,
            "nonzero_per_step": Count.nonzero}
