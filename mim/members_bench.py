"""What vectorized members cost: K members of an experiment trained as one vmapped step
(:mod:`mim.train.members`, ``mim.sweep --vectorize``) against the same K runs as K separate
calls of the ordinary train step, on synthetic batches (the figures in BENCHMARKS.md)::

    python -m mim.members_bench --config=experiments/vit_b32.py:tiny --members=1,4,16 --steps=5

Members differ in seed (own initial weights and batches) and lr. For each K the vectorized
step and the K separate steps alternate, so a busy machine's load falls on both alike;
prints the median wall and process CPU time of each (on a shared machine the CPU time
counts only this process's work), images/s per member (a member's batch over the wall time
all K members take for one step each), and the ratios.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from mim import cli  # noqa: E402


def _configs(spec: str, k: int, batch: int, overrides: dict):
    from mim import probe_bench
    out = []
    for i in range(k):
        c = probe_bench._config(spec, dict(overrides))
        c.unlock()
        c.seed, c.batch_size, c.precision, c.compile = i, batch, "fp32", "off"
        c.optim["lr" if c.optim.lr > 0 else "base_lr"] *= 1.25 ** (i % 4)
        if c.task == "moby_pretrain":
            c.model.contrast_num_negative = 4 * batch
        out.append(c)
    return out


def measure(spec: str, k: int, batch: int, steps: int, warmup: int, overrides: dict) -> dict:
    from mim import bench
    from mim.train import members as members_lib
    from mim.train.setup import Setup
    configs = _configs(spec, k, batch, overrides)
    total = warmup + steps
    mem = members_lib.build(configs, ["unused"] * k, total, total)
    task = mem.setups[0].task
    batches = [bench.synthetic_batch(c, task, batch, "cpu", seed=i) for i, c in enumerate(configs)]
    stacked = members_lib.stack_batches(batches)
    alone = [Setup(c, "unused").build_train(total, total) for c in configs]
    vec_t, sep_t, vec_c, sep_c = [], [], [], []
    state = mem.state
    for i in range(total):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = mem.train_step(state, stacked)
        float(m["loss"].sum())
        t1, c1 = time.perf_counter(), time.process_time()
        for b, built in zip(batches, alone):
            built.state, mk = built.fns.train_step(built.state, b)
        float(mk["loss"])
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            vec_t.append(t1 - t0)
            sep_t.append(t2 - t1)
            vec_c.append(c1 - c0)
            sep_c.append(c2 - c1)
    v, s = statistics.median(vec_t), statistics.median(sep_t)
    vc, sc = statistics.median(vec_c), statistics.median(sep_c)
    return {"members": k, "vectorized_s": v, "separate_s": s, "vectorized_cpu_s": vc,
            "separate_cpu_s": sc, "img_s_member_vectorized": batch / v,
            "img_s_member_separate": batch / s, "speedup": s / v, "speedup_cpu": sc / vc}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mim.members_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiments/X.py[:variant]")
    p.add_argument("--members", default="1,4,16", help="comma-separated K")
    p.add_argument("--batch_size", type=int, default=32, help="each member's batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = dict(o.split("=", 1) for o in a.overrides)
    from mim import bench, backend
    print(f"{a.config}, batch {a.batch_size} per member, {bench.device_name(backend.setup('cpu'))}, "
          f"torch {torch.__version__}")
    print("| K | vectorized step: wall (CPU) | K separate steps: wall (CPU) | img/s per member: "
          "vectorized | separate | separate / vectorized: wall (CPU time) |")
    print("|---|---|---|---|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # vmap's per-member fallbacks (documented)
        for k in (int(x) for x in a.members.split(",")):
            r = measure(a.config, k, a.batch_size, a.steps, a.warmup, overrides)
            print(f"| {k} | {r['vectorized_s'] * 1e3:.0f} ms ({r['vectorized_cpu_s'] * 1e3:.0f}) | "
                  f"{r['separate_s'] * 1e3:.0f} ms ({r['separate_cpu_s'] * 1e3:.0f}) | "
                  f"{r['img_s_member_vectorized']:.1f} | {r['img_s_member_separate']:.1f} | "
                  f"**{r['speedup']:.2f}** ({r['speedup_cpu']:.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("mim.members_bench", main))
