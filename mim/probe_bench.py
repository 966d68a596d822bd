"""What a linear-probe grid costs: the train step of a probe with one head against the same
probe with a grid of heads (``config.probe.lr_grid`` x ``wd_grid``), on synthetic batches,
same encoder, same batch (the figures in BENCHMARKS.md)::

    python -m mim.probe_bench --config=experiments/mae_base_linprobe.py:tiny --heads=16 --steps=30

Steps of the two alternate, so a busy machine's load falls on both alike. Prints the
median step time of each and their ratios; the grid's heads are ``heads``
learning rates around the run's (sqrt(2) apart) at the run's weight decay, or, with
``--wd=N``, ``heads / N`` learning rates times ``N`` weight decays.
"""
from __future__ import annotations

import os

# As mim.main: OpenMP threads wait passively, before torch loads its runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import ast  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mim import cli  # noqa: E402
from mim.tasks import probe_grid  # noqa: E402


def _config(spec: str, overrides: dict):
    """``FILE[:arg]`` with ``key=value`` overrides (values read as Python literals)."""
    from mim import sweep
    values = {}
    for k, v in overrides.items():
        try:
            values[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            values[k] = v
    return sweep.apply_overrides(sweep.load_config(spec), values, "probe_bench")


def grid(lr: float, wd: float, heads: int, n_wd: int):
    n_lr = heads // n_wd
    lrs = tuple(lr * 2.0 ** ((i - (n_lr - 1) / 2) / 2) for i in range(n_lr))   # sqrt(2) apart
    wds = tuple(round(wd + 1e-4 * i, 8) for i in range(n_wd)) if n_wd > 1 else ()
    return lrs, wds


class Runner:
    """One probe's built train step on a fixed synthetic batch."""

    def __init__(self, config, total: int):
        from mim.train.setup import Setup
        self.setup = Setup(config, tempfile.mkdtemp(prefix="probe_bench_"))
        built = self.setup.build_train(total, total)
        g = torch.Generator().manual_seed(0)
        size, n, dev = config.data.image_size, config.batch_size, self.setup.be.device
        self.batch = {"image": torch.randn(n, 3, size, size, generator=g).to(dev),
                      "label": torch.randint(0, config.model.num_classes, (n,), generator=g).to(dev)}
        self.state, self.step = built.state, built.fns.train_step

    def __call__(self) -> float:
        self.setup.be.synchronize()
        t = time.perf_counter()
        self.state, m = self.step(self.state, dict(self.batch))
        m["loss"].item()
        self.setup.be.synchronize()
        return time.perf_counter() - t


def _g(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mim.probe_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a linprobe experiment, e.g. experiments/mae_base_linprobe.py:tiny")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--wd", type=int, default=1, help="weight decays in the grid (heads / wd learning rates)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    if a.heads % a.wd:
        ap.error(f"--heads={a.heads} is not a multiple of --wd={a.wd}")
    overrides = dict(o.removeprefix("--config.").split("=", 1) for o in a.overrides)
    single = _config(a.config, overrides)
    if single.task != "linprobe":
        ap.error(f"{a.config} is a {single.task!r} experiment, not linprobe")
    with single.unlocked():
        single.data.path = single.data.path or "synthetic"
        if single.optim.clip_grad:          # a grid refuses global-norm clipping: both run without
            print(f"optim.clip_grad={single.optim.clip_grad} set to 0 for both probes")
            single.optim.clip_grad = 0.0
    lrs, wds = grid(probe_grid.base_lr(single), single.optim.weight_decay, a.heads, a.wd)
    many = single.copy_and_resolve_references()
    many.probe.lr_grid, many.probe.wd_grid = lrs, wds
    from mim.tasks import linprobe
    n_heads = len(linprobe.grid_heads(many))
    per = n_heads // a.heads        # heads per (lr, wd): the blocks of features='blocks'
    total = a.warmup + a.steps
    runs = {f"{per} head{'s' * (per > 1)}": Runner(single, total), f"{n_heads} heads": Runner(many, total)}
    times = {k: [] for k in runs}
    for i in range(total):  # interleaved step by step: a busy machine's load falls on both alike
        for k, run in runs.items():
            t = run()
            if i >= a.warmup:
                times[k].append(t)
    single_t, many_t = times.values()
    pair = statistics.median(m / s for s, m in zip(single_t, many_t))
    print(f"config {a.config} ({single.probe.features}"
          f"{', batch_norm' if single.probe.batch_norm else ''}, optim {single.optim.name}), batch "
          f"{single.batch_size}, device {next(iter(runs.values())).setup.be.device}, "
          f"{torch.get_num_threads()} threads; grid: lr {_g(lrs)}, wd {_g(wds or (single.optim.weight_decay,))}"
          + (f", x {per} blocks" if per > 1 else ""))
    for k, v in times.items():
        print(f"  {k:>9}: median step {statistics.median(v) * 1e3:8.2f} ms over {len(v)} steps "
              f"(min {min(v) * 1e3:.2f}, max {max(v) * 1e3:.2f})")
    print(f"  grid / single: median of per-step ratios {pair:.3f}, ratio of medians "
          f"{statistics.median(many_t) / statistics.median(single_t):.3f}, ratio of minima "
          f"{min(many_t) / min(single_t):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("mim.probe_bench", main))
