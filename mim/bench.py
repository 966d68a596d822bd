"""Training-step benchmark with a peer in the same run, and input-pipeline throughput.

    python -m mim.bench --config=experiments/mae_base.py:perf [--config.batch_size=256] \
        [--steps=20 --warmup=5] [--peer=eager,compiled|none] [--data=synthetic|real]
    python -m mim.bench --config=experiments/vit_b32.py --mode=data [--data_dir=/data/imagenet]
    python -m mim.bench --rows=a.json,b.json      # BENCHMARKS.md rows from --json files

``--mode=train`` (default) builds the experiment's real train state and train step (the
functions :func:`mim.train.loop.train` uses), runs ``--warmup`` untimed and ``--steps``
timed steps on one device, and prints images/s, ms/step, the process's CPU time per
step (what to compare on a shared CPU machine), model FLOPs per image
(``torch.utils.flop_counter`` over one forward + backward of the step), MFU against the
device's dense peak, and peak memory. The same figures follow for the peer
(:mod:`mim.peers`: the architecture as timm ``nn.Module``\\ s with ``torch.optim``), eager
and ``torch.compile``'d, and the ratios mim / peer. For the eager contenders it also
counts the aten operators one step dispatches and the scalar reads (``.item()``) among
them: mim's step has none. For BEiT pretraining and MoBY the FLOPs of what the step
never trains (the tokenizer; the momentum branch) are printed apart, for mim and the
peer (:mod:`mim.bench_count`). The batch is synthetic (shaped like
the task's: images, labels or soft labels, and the per-sample extras of the task's
``batch_extras``) or, with ``--data=real``, the experiment's own input pipeline.

``--mode=data`` measures decode + augmentation: images/s of one worker (the train
transform and the task's extras, in this process) and of the loader with the config's
``data.num_workers``, each batch then moved to the config's device as the training loop
does (with ``--config.data.device_normalize=True``: uint8 batches, converted, normalised
and randomly erased there).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import platform
import resource
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from mim import backend as backend_lib
from mim import config as config_lib
from mim import optim, tasks
from mim.bench_count import (FROZEN_SHARES, count_flops, count_ops,  # noqa: F401 (re-exported)
                              frozen_share)
from mim.bench_data import bench_data, format_data_report  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Dense peaks (TFLOP/s, no 2:4 sparsity) per device and compute dtype, for MFU.
#   NVIDIA H100 / H200 datasheets: SXM bf16/fp16 989.4 (1979 is with sparsity), TF32 494.7,
#     fp32 66.9; H100 PCIe bf16 756, TF32 378, fp32 51.2; H100 NVL bf16 835, fp32 60.
#   NVIDIA A100 datasheet: bf16/fp16 312, TF32 156, fp32 19.5.
#   Ascend 910 (910A): fp16 256 (Huawei, Hot Chips 31, 2019, "DaVinci: A Scalable
#     Architecture for Neural Network Computing"); no bf16.
#   Ascend 910B: Huawei publishes no per-SKU peak; third-party figures range from
#     ~280 to ~376 fp16 depending on the SKU (B1..B4). 313 is a middle estimate:
#     override with --peak_tflops for a known part.
PEAKS = [
    # (substring of the lowercased device name, {dtype: TFLOP/s})
    ("h200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100 nvl", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("h100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("ascend910b", {"bf16": 313.0, "fp16": 313.0}),
    ("ascend910", {"fp16": 256.0}),
]


def device_name(be) -> str:
    if be.device_type == "cuda":
        return torch.cuda.get_device_name(be.device)
    if be.device_type == "npu":
        return torch.npu.get_device_name(be.device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def peak_dtype(precision: str) -> str:
    if precision in ("amp_bf16", "bf16"):
        return "bf16"
    if precision in ("amp_fp16", "fp16"):
        return "fp16"
    # fp32 matmuls use TF32 tensor cores only when allowed.
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(be, precision: str, override_tflops: float = 0.0) -> Optional[float]:
    """Dense peak FLOP/s of this device for the precision policy; None on CPU or for an
    unknown device (then no MFU is printed)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if be.device_type == "cpu":
        return None
    name = device_name(be).lower().replace("-", " ")
    for key, peaks in PEAKS:
        if key in name.replace(" ", "") or key in name:
            value = peaks.get(peak_dtype(precision))
            return value * 1e12 if value else None
    return None


# ----------------------------------------------------------------------------------------
# Memory.


def reset_peak_memory(be):
    if be.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(be.device)
    elif be.device_type == "npu":
        torch.npu.reset_peak_memory_stats(be.device)
    else:
        try:  # Linux >= 4.0: "5" resets the peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(be) -> int:
    """Peak bytes since :func:`reset_peak_memory`: device allocations, or on CPU the
    process's peak resident set (everything, Python and libraries included)."""
    allocated = be.max_memory_allocated()
    if allocated is not None:
        return allocated
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------
# Batches.


def synthetic_batch(config, task, batch_size: int, device, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A batch shaped like the input pipeline's: normalised images, labels (soft labels
    when mixup/cutmix are on), and the task's per-sample extras stacked."""
    gen = torch.Generator().manual_seed(seed)
    # every image key of the task's batches (several views, a tokenizer view), at its size
    batch = {k: torch.randn(batch_size, 3, v.size, v.size, generator=gen)
             for k, v in tasks.image_keys(task, config, train=True).items()}
    num_classes = config.model.get("num_classes", 0) or 1
    batch["label"] = torch.randint(0, num_classes, (batch_size,), generator=gen)
    d = config.data
    if (d.mixup > 0 or d.cutmix > 0) and config.model.get("num_classes", 0):
        # timm Mixup's targets: a smoothed one-hot mix; the values do not matter here.
        off = d.label_smoothing / num_classes
        batch["soft_label"] = torch.full((batch_size, num_classes), off)
        batch["soft_label"].scatter_(1, batch["label"][:, None], 1.0 - d.label_smoothing + off)
    extras_fn = getattr(task, "batch_extras", None)
    if extras_fn is not None:
        extras = [extras_fn(gen, config) for _ in range(batch_size)]
        for k in (extras[0] if extras else {}):
            batch[k] = torch.stack([e[k] for e in extras])
    return {k: v.to(device) for k, v in batch.items()}


class RealBatches:
    """The experiment's own training stream, ``skipped`` dropped, moved to the device."""

    def __init__(self, config, be, task, total: int):
        from mim.data import pipeline
        self.loader, _, _ = pipeline.train_loader(config, be, task, 0, total)
        self.it = iter(self.loader)
        self.device, self.data_config, self.to_device = be.device, config.data, pipeline.to_device
        self.views = tasks.image_keys(task, config, train=True)

    def __call__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.it)
        batch.pop("skipped", None)
        return self.to_device(batch, self.device, self.data_config, views=self.views)


# ----------------------------------------------------------------------------------------
# mim's step.


@dataclasses.dataclass
class MimRun:
    state: dict
    train_step: Callable
    grad_step: Callable          # never compiled: for the FLOP count
    groups: List[optim.Group]


def build_mim(setup, total_steps: int) -> MimRun:
    """The train state and step exactly as :func:`mim.train.loop.train` builds them
    (single process)."""
    built = setup.build_train(total_steps, max(total_steps, 1))
    return MimRun(built.state, built.fns.train_step, built.fns.eager_grad_step, built.groups)


# ----------------------------------------------------------------------------------------
# The peer's step.


def peer_optimizer(config, model: torch.nn.Module, groups: List[optim.Group], device_type: str):
    """``torch.optim`` with mim's parameter groups (same names, lr scales and weight
    decay); names mim does not have (timm's layout differs) get the default group.
    AdamW for AdamW and LARS (torch has no LARS; the probe trains one linear layer),
    SGD with momentum for SGD; fused on CUDA, foreach elsewhere."""
    o = config.optim
    lr = config_lib.learning_rate(config)
    by_name = {n: (g.lr_scale, g.weight_decay) for g in groups for n in g.names}
    keyed: Dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = by_name.get(name, (1.0, 0.0 if p.ndim <= 1 else o.weight_decay))
        keyed.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "lr": lr * s, "weight_decay": wd} for (s, wd), ps in keyed.items()]
    fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
    if o.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, **fast)
    return torch.optim.AdamW(param_groups, lr=lr, betas=(o.b1, o.b2), eps=o.eps, **fast)


class PeerRun:
    """The usual PyTorch step: autocast forward, backward (GradScaler for fp16),
    clipping, ``optimizer.step()``. The bf16/fp16 "O2" policies run as autocast (O1):
    ``torch.optim`` has no master weights."""

    def __init__(self, config, be, groups, compiled: bool, compile_backend: str = "inductor",
                 model: Optional[torch.nn.Module] = None, total_steps: int = 0):
        from mim import peers
        self.config, self.be = config, be
        torch.manual_seed(config.seed)
        self.model = model if model is not None else peers.build(config, total_steps).to(be.device)
        self.opt = peer_optimizer(config, self.model, groups, be.device_type)
        self.forward = torch.compile(self.model, backend=compile_backend) if compiled else self.model
        self.dtype = {"fp32": None, "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16,
                      "amp_fp16": torch.float16, "fp16": torch.float16}[config.precision]
        self.scaler = torch.amp.GradScaler(be.device_type) if self.dtype == torch.float16 else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # state updated once per step outside the gradient (MoBY's momentum encoder), run
        # eagerly before the forward as mim's ``update_state_before_step``
        self.before_step = getattr(self.model, "before_step", None)

    def loss(self, batch, eager: bool = False):
        forward = self.model if eager else self.forward
        if self.dtype is None:
            return forward(batch)
        with torch.autocast(self.be.device_type, dtype=self.dtype):
            return forward(batch)

    def train_step(self, batch):
        if self.before_step is not None:
            self.before_step()
        loss = self.loss(batch)
        clip = self.config.optim.clip_grad
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def forward_backward(self, batch):
        """Eagerly: the FLOP counter's dispatch mode must not see a compilation."""
        self.loss(batch, eager=True).backward()
        self.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------
# Measuring.


def time_steps(step: Callable[[int], object], be, warmup: int, steps: int) -> dict:
    """Run ``warmup`` then ``steps`` timed steps (``step(i)`` returns a loss tensor)."""
    reset_peak_memory(be)
    t0 = time.perf_counter()
    loss = None
    for i in range(warmup):
        loss = step(i)
    if loss is not None:
        float(loss)
    be.synchronize()
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    final = float(loss)        # waits for the device
    be.synchronize()
    t2, c2 = time.perf_counter(), time.process_time()
    # process CPU time: on a shared CPU machine the wall clock also counts the time other
    # processes hold the core, the CPU time only this process's work
    return {"warmup_s": t1 - t0, "step_s": (t2 - t1) / max(steps, 1),
            "cpu_step_s": (c2 - c1) / max(steps, 1), "peak_bytes": peak_memory(be),
            "final_loss": final}


def _free(be):
    gc.collect()
    if be.device_type == "cuda":
        torch.cuda.empty_cache()


def bench_train(config, *, steps: int = 10, warmup: int = 3, peers=("eager", "compiled"),
                data: str = "synthetic", compile_backend: str = "inductor",
                peak_tflops: float = 0.0) -> dict:
    """Measure mim's step and its peers; returns the figures (see :func:`format_report`)."""
    from mim.train import graphs, loop
    if data not in ("synthetic", "real"):
        raise ValueError(f"--data={data!r}: must be synthetic or real")
    config = config.copy_and_resolve_references()
    if data == "synthetic" and not config.data.path:
        config.data.path = "<synthetic>"     # validation wants a path; nothing reads it
    setup = loop.Setup(config, workdir="")
    c, be, task = setup.config, setup.be, setup.task
    if be.device_type == "cpu":
        # Without it glibc unmaps freed activations and whichever runs first (mim) pays
        # the page faults of every step: measure mim and the peers alike.
        backend_lib.keep_freed_cpu_memory()
    if be.distributed:
        raise RuntimeError("mim.bench measures one device; run it without torchrun")
    batch_size = c.batch_size
    # with config.cuda_graphs the graph is recorded after its own warm-up: not in the timing
    mim_warmup = max(warmup, graphs.WARMUP + 1) if c.cuda_graphs else warmup
    total = mim_warmup + steps + 1       # and one step whose operators are counted
    out = {"config": {"task": c.task, "model": c.model.get("name", c.task), "precision": c.precision,
                      "batch_size": batch_size, "compile": be.compile, "optimizer": c.optim.name,
                      "cuda_graphs": c.cuda_graphs,
                      "data": data},
           "device": device_name(be), "steps": steps, "warmup": warmup, "results": {}}
    peak = peak_flops(be, c.precision, peak_tflops)
    out["peak_tflops"] = peak / 1e12 if peak else None

    fixed = synthetic_batch(c, task, batch_size, be.device, c.seed) if data == "synthetic" else None

    def batches():
        if fixed is not None:
            return lambda: fixed
        return RealBatches(c, be, task, total)

    # --- mim
    run = build_mim(setup, total)
    groups = run.groups
    flop_batch = fixed if fixed is not None else batches()()
    flops = count_flops(lambda: run.grad_step(run.state, flop_batch))
    out["flops_per_image"] = flops / batch_size
    frozen = frozen_share(setup, run.state, flop_batch)
    if frozen is not None:
        # the forward of what the step never trains (BEiT's tokenizer, MoBY's momentum
        # branch), counted apart: part of the step's cost, not of the trained model's
        with torch.no_grad(), be.autocast():
            out["frozen_flops_per_image"] = count_flops(frozen) / batch_size
        out["frozen_label"] = FROZEN_SHARES.get(c.task, "frozen networks (forward only)")
    next_batch = batches()

    def mim_step(i):
        torch.manual_seed(backend_lib.seed_step(c.seed, i, be.rank))
        run.state, m = run.train_step(run.state, next_batch())
        return m["loss"]

    out["results"]["mim"] = time_steps(mim_step, be, mim_warmup, steps)
    out["results"]["mim"]["flops_per_image"] = out["flops_per_image"]
    if not be.compile and not c.cuda_graphs:    # operators are counted eagerly
        out["results"]["mim"].update(count_ops(lambda: mim_step(mim_warmup + steps)))
    del run, next_batch
    _free(be)

    # --- peers
    model = None
    for kind in peers:
        if kind not in ("eager", "compiled"):
            raise ValueError(f"--peer: unknown kind {kind!r} (eager, compiled, none)")
        peer = PeerRun(c, be, groups, compiled=kind == "compiled", compile_backend=compile_backend,
                       model=model, total_steps=total)
        model = peer.model          # eager and compiled peers train the same module
        entry = {}
        if "flops_per_image" not in out.get("peer", {}):
            out["peer"] = {"flops_per_image": count_flops(lambda: peer.forward_backward(flop_batch))
                           / batch_size}
            peer_frozen = getattr(model, "frozen_forward", None)
            if peer_frozen is not None:
                with torch.no_grad():
                    out["peer"]["frozen_flops_per_image"] = count_flops(
                        lambda: peer_frozen(flop_batch)) / batch_size
        next_batch = batches()
        entry = time_steps(lambda i: peer.train_step(next_batch()), be, warmup, steps)
        entry["flops_per_image"] = out["peer"]["flops_per_image"]
        if kind == "eager":
            entry.update(count_ops(lambda: peer.train_step(next_batch())))
        out["results"][f"peer_{kind}"] = entry
        del peer, next_batch
        _free(be)

    for name, r in out["results"].items():
        r["ms_per_step"] = 1e3 * r["step_s"]
        r["images_per_s"] = batch_size / r["step_s"]
        # MFU counts the model's FLOPs (mim's count) for every contender.
        achieved = out["flops_per_image"] * r["images_per_s"]
        r["tflops_achieved"] = achieved / 1e12
        r["mfu"] = achieved / peak if peak else None
    mim = out["results"]["mim"]
    for kind in peers:
        r = out["results"][f"peer_{kind}"]
        out[f"speedup_vs_peer_{kind}"] = mim["images_per_s"] / r["images_per_s"]
        out[f"cpu_time_speedup_vs_peer_{kind}"] = r["cpu_step_s"] / max(mim["cpu_step_s"], 1e-12)
        out[f"memory_vs_peer_{kind}"] = mim["peak_bytes"] / max(r["peak_bytes"], 1)
    return out


def _split_text(out: dict) -> str:
    """"; of which <the untrained share>: X GFLOP, the trained branch Y GFLOP (peer: X' / Y')"."""
    if "frozen_flops_per_image" not in out:
        return ""
    total, frozen = out["flops_per_image"], out["frozen_flops_per_image"]
    text = (f"; of which {out.get('frozen_label', 'frozen networks')}: {frozen / 1e9:.4g} GFLOP, "
            f"the trained branch (forward + backward) {(total - frozen) / 1e9:.4g} GFLOP")
    peer = out.get("peer", {})
    if "frozen_flops_per_image" in peer:
        text += (f" (peer: {peer['frozen_flops_per_image'] / 1e9:.4g} / "
                 f"{(peer['flops_per_image'] - peer['frozen_flops_per_image']) / 1e9:.4g})")
    return text


def format_report(out: dict) -> str:
    cfg = out["config"]
    lines = [f"device: {out['device']}",
             f"config: task={cfg['task']} model={cfg['model']} precision={cfg['precision']} "
             f"batch={cfg['batch_size']} optimizer={cfg['optimizer']} mim compile={cfg['compile']} "
             + ("cuda_graphs=True " if cfg.get("cuda_graphs") else "") +
             f"data={cfg['data']}; {out['warmup']} warm-up + {out['steps']} timed steps",
             f"model FLOPs per image (forward + backward): {out['flops_per_image'] / 1e9:.4g} GFLOP"
             + (f" (peer counts {out['peer']['flops_per_image'] / 1e9:.4g})" if "peer" in out else "")
             + _split_text(out),
             "peak: " + (f"{out['peak_tflops']:.1f} TFLOP/s dense" if out["peak_tflops"]
                         else "unknown (CPU or unlisted device): no MFU")]
    mem = "peak mem" if not out["device"].startswith("CPU") else "peak RSS"
    lines.append(f"{'':16s} {'img/s/device':>12s} {'ms/step':>9s} {'CPU ms/step':>11s} {'TFLOP/s':>9s} "
                 f"{'MFU':>7s} {mem + ' MiB':>13s} {'warm-up s':>9s}")
    for name, r in out["results"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"{name:16s} {r['images_per_s']:12.1f} {r['ms_per_step']:9.2f} "
                     f"{1e3 * r.get('cpu_step_s', float('nan')):11.2f} "
                     f"{r['tflops_achieved']:9.4f} {mfu:>7s} {r['peak_bytes'] / 2**20:13.0f} "
                     f"{r['warmup_s']:9.1f}")
    counted = [(n, r) for n, r in out["results"].items() if "aten_ops_per_step" in r]
    if counted:
        lines.append("eager step: " + "; ".join(
            f"{n} {r['aten_ops_per_step']} aten ops, {r['scalar_reads_per_step']} scalar reads (.item())"
            + (f", {r['nonzero_per_step']} nonzero (x[mask])" if r.get("nonzero_per_step") else "")
            for n, r in counted))
    for key in sorted(out):
        if key.startswith("speedup_vs_"):
            kind = key[len("speedup_vs_"):]
            cpu = out.get("cpu_time_speedup_vs_" + kind)
            lines.append(f"mim / {kind}: speed x{out[key]:.2f}"
                         + (f" (by process CPU time x{cpu:.2f})" if cpu else "")
                         + f", memory x{out['memory_vs_' + kind]:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Command line.


def table_row(r: dict) -> str:
    """A ``BENCHMARKS.md`` row (figure | value | command | machine | date) from the JSON
    that ``--json`` wrote."""
    if "loader_images_per_s" in r:
        figure = (f"input pipeline, {r['path']}, {r['image_size']} px, decode={r.get('decode', 'worker')}, "
                  f"device_normalize={r['device_normalize']}")
        value = (f"1 worker in process: {r['one_worker_images_per_s']:.0f} img/s; loader with "
                 f"{r['num_workers']} workers + `to_device`: {r['loader_images_per_s']:.0f} img/s; "
                 f"`to_device`: {r['to_device_ms_per_batch']:.2f} ms per batch of {r['batch_size']}")
        machine = f"{r['device']}, {r['cpu_count']} CPU cores"
    else:
        cfg = r["config"]
        figure = (f"{cfg['task']} {cfg['model']}, {cfg['precision']}, batch {cfg['batch_size']}"
                  + (", cuda_graphs" if cfg.get("cuda_graphs") else "") + ", mim vs peer")
        parts = []
        for name, e in r["results"].items():
            mfu = f", MFU {100 * e['mfu']:.1f}%" if e.get("mfu") is not None else ""
            ratio = r.get(f"speedup_vs_{name}")
            cpu = r.get(f"cpu_time_speedup_vs_{name}")
            parts.append(f"{name} {e['images_per_s']:.1f} img/s{mfu}, {e['peak_bytes'] / 2**30:.1f} GiB"
                         + (f" (mim x{ratio:.2f}" + (f", by CPU time x{cpu:.2f}" if cpu else "") + ")"
                            if ratio else ""))
        value = "; ".join(parts)
        machine = r["device"]
    cmd = r.get("command", "(not recorded)")
    return f"| {figure} | {value} | `{cmd}` | {machine} | {r.get('date', '')} |"


def main(argv):
    from absl import app
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if _ROWS.value:
        for path in _ROWS.value:
            with open(path) as f:
                print(table_row(json.load(f)))
        return
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=experiments/X.py[:variant] is required (or --rows=a.json,...)")
    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    if _MODE.value == "data":
        result = bench_data(config, data_dir=_DATA_DIR.value, batches=_STEPS.value)
        text = format_data_report(result)
    else:
        kinds = [k for k in _PEER.value.split(",") if k and k != "none"]
        result = bench_train(config, steps=_STEPS.value, warmup=_WARMUP.value, peers=kinds,
                             data=_DATA.value, compile_backend=_COMPILE_BACKEND.value,
                             peak_tflops=_PEAK.value)
        text = format_report(result)
    print(text, flush=True)
    result["command"] = shlex.join(["python", "-m", "mim.bench"] + sys.argv[1:])
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file: experiments/X.py[:arg]",
                                              lock_config=True)
    _MODE = flags.DEFINE_enum("mode", "train", ["train", "data"], "train step or input pipeline")
    _STEPS = flags.DEFINE_integer("steps", 10, "timed steps (train) or batches (data)")
    _WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation happens here)")
    _PEER = flags.DEFINE_string("peer", "eager,compiled", "peers to measure: eager, compiled, or none")
    _DATA = flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"], "batches for --mode=train")
    _DATA_DIR = flags.DEFINE_string("data_dir", "", "--mode=data: images (default: config.data.path)")
    _COMPILE_BACKEND = flags.DEFINE_string("compile_backend", "inductor", "torch.compile backend of the peer")
    _PEAK = flags.DEFINE_float("peak_tflops", 0.0, "dense peak TFLOP/s of the device (overrides the table)")
    _THREADS = flags.DEFINE_integer("threads", 0, "CPU: torch.set_num_threads (0: torch's default)")
    _JSON = flags.DEFINE_string("json", "", "also write the figures to this JSON file")
    _ROWS = flags.DEFINE_list("rows", [], "print BENCHMARKS.md rows from these --json files, run nothing")
    app.run(main)
