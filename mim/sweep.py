"""Ablation sweeps: every point of a named sweep of an experiment file, each in its own
workdir, then a results table.

    python -m mim.sweep --config=experiments/mae_base.py:tiny --sweep=mask_ratio \\
        --workdir=runs/mask_ratio --then=experiments/mae_base_linprobe.py:tiny

An experiment file declares its sweeps beside ``get_config`` (as big_vision and scenic
configs declare theirs, as lists of overrides)::

    def get_sweeps(arg=None):
        return {"mask_ratio": [{"model.mask_ratio": r} for r in (0.25, 0.5, 0.75)]}

Point ``i`` runs in ``WORKDIR/<name>/``, its name made of its overrides
(``mask_ratio=0.25``). ``--then=FILE[:variant]`` (repeatable) chains downstream runs:
each starts from the point's final checkpoint (``init.checkpoint``) in
``WORKDIR/<name>/<file stem>/``; ``--carry=model.depth`` also applies those override
keys to them (an encoder shape the downstream model must share). Any ``--config.x=y``
applies to every point, as for ``mim.main``.

Resuming. A run is finished when its newest checkpoint is at its last step; finished
runs are not run again, a killed one resumes from its checkpoint (the training loop
does that), so starting the same command again completes a sweep. Changing the config
of a run that exists is an error (use a new ``--workdir``).

Spreading. ``--shard=i/n``, or the launcher's ``SLURM_PROCID``/``SLURM_NTASKS`` (one
task per device: ``srun --ntasks=8 python -m mim.sweep ...``) or torchrun's
``RANK``/``WORLD_SIZE``: launcher ``i`` of ``n`` takes runs ``i, i+n, ...`` of the plan (a
run: one point at one seed with its ``--then`` stages; the ``--baseline`` runs last), each
on its own device (``SLURM_LOCALID`` / ``LOCAL_RANK``) as a one-device run. Every launcher
rewrites ``results.csv`` and ``results.md`` from what is on disk when its runs are
done, so the last one to finish writes the whole table; ``--table_only`` rewrites it.
The table holds each point's overrides and its final metrics (last logged value of
every evaluation metric and of the training loss, per stage); ``curves.png`` overlays
the points' curves.

Vectorizing. ``--vectorize`` trains a launcher's pretraining runs (every point and seed)
as ONE run with a leading member axis, the train step ``vmap``ped over it
(:mod:`mim.train.members`, :mod:`mim.sweep_vectorized`); each run's folder gets what it
would alone, and the ``--then`` stages follow as usual. Runs may differ only in the
scalar fields of ``members.VECTORIZABLE`` (``seed``, the lr / weight-decay fields, label
smoothing, EMA decay, MoBY's momentum); any other difference (a shape such as
``model.depth``) is refused, naming the field. One process, fp32 (see docs/sweeps.md).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections import config_flags

from mim.cli import UsageMistake
# the results table (mim.sweep_table), importable from here too
from mim.sweep_table import (_cell, _csv, _run_row, _status, _write, final_metrics,  # noqa: F401
                             mean_std, write_table)

log = logging.getLogger(__name__)

FLAGS = flags.FLAGS


def _define_flags():
    """The command line's flags, defined only when it runs: importing this module (for
    :func:`load_config`) leaves absl's global flags alone."""
    config_flags.DEFINE_config_file("config", None, "experiment file: experiments/X.py[:arg]",
                                    lock_config=True)
    flags.DEFINE_string("sweep", None, "name of a sweep the experiment file declares (none: "
                        "one point, the config as it is)")
    flags.DEFINE_string("workdir", None, "directory of the sweep: one folder per point")
    flags.DEFINE_multi_string("then", [], "downstream experiment FILE[:variant] started from "
                              "each point's final checkpoint (repeatable)")
    flags.DEFINE_list("carry", [], "override keys also applied to the --then runs")
    flags.DEFINE_string("shard", "", "i/n: take runs i, i+n, ... of the plan (default: SLURM or "
                        "torchrun's rank and size, else 0/1)")
    flags.DEFINE_integer("seeds", 1, "runs per point, with seed = config.seed + 0 .. seeds - 1; "
                         "the tables give mean +- standard deviation")
    flags.DEFINE_bool("baseline", False, "also run every --then stage from the random "
                      "initialisation (a 'random_init' row), at each seed")
    flags.DEFINE_bool("vectorize", False, "train the pretraining runs (points x seeds) as one "
                      "vmapped run (docs/sweeps.md)")
    flags.DEFINE_bool("table_only", False, "only rewrite results.csv / results.md")
    flags.DEFINE_bool("dry_run", False, "print the points and exit")


# Fields that change how a run executes, not what it computes: a resumed run may differ.
_MECHANICS = ("data.num_workers", "data.prefetch", "log_every")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


class SweepError(ValueError, UsageMistake):
    pass


class Stopped(RuntimeError):
    """A run returned before its last step (SIGTERM): the sweep stops with it."""


# ----------------------------------------------------------------------------------------
# Declarations.


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def load_module(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"experiment file not found: {path}")
    name = "mim_sweep_" + re.sub(r"\W", "_", os.path.basename(path)[:-3])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """``get_config(arg)`` of ``FILE[:arg]``, locked as ``mim.main`` locks it."""
    path, arg = split_spec(spec)
    c = load_module(path).get_config(arg)
    c.lock()
    return c


def sweep_points(spec: str, name: str) -> List[dict]:
    path, arg = split_spec(spec)
    module = load_module(path)
    if not hasattr(module, "get_sweeps"):
        raise SweepError(f"{path} declares no sweeps (no get_sweeps(arg))")
    sweeps = module.get_sweeps(arg)
    if name not in sweeps:
        raise SweepError(f"{path} has no sweep {name!r}; it declares: {', '.join(sorted(sweeps))}")
    points = [dict(p) for p in sweeps[name]]
    if not points or not all(points):
        raise SweepError(f"sweep {name!r} of {path}: every point needs at least one override")
    return points


def _fmt(v) -> str:
    if isinstance(v, (tuple, list)):
        return "x".join(_fmt(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def point_names(points: Sequence[dict]) -> List[str]:
    """Folder names from the overrides' last name parts (``mask_ratio=0.25``); the full
    dotted names where the short ones would collide."""
    def name(p, full):
        return "-".join(_UNSAFE.sub("_", f"{k if full else k.rsplit('.', 1)[-1]}={_fmt(v)}")
                        for k, v in p.items())

    names = [name(p, False) for p in points]
    if len(set(names)) < len(names):
        names = [name(p, True) for p in points]
    if len(set(names)) < len(names):
        raise SweepError(f"sweep points repeat: {names}")
    return names


def apply_overrides(config, overrides: dict, where: str):
    c = copy.deepcopy(config)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except (KeyError, AttributeError):
            raise SweepError(f"{where}: the config has no field {key!r}") from None
        except TypeError as e:
            raise SweepError(f"{where}: {key}={value!r}: {e}") from None
    return c


# ----------------------------------------------------------------------------------------
# Running.


def shard_from_env(flag: str = "") -> Tuple[int, int]:
    """``(index, count)`` of this launcher, and make the runs it starts single-device
    runs on the launcher's own device."""
    if flag:
        m = re.fullmatch(r"(\d+)/(\d+)", flag)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise SweepError(f"--shard={flag!r}: expected i/n with 0 <= i < n")
        return int(m.group(1)), int(m.group(2))
    env = os.environ
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "RANK" not in env:
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        # Each launcher trains alone: no process group over the launchers.
        env["RANK"], env["WORLD_SIZE"] = "0", "1"
        return rank, world
    return 0, 1


def finished_step(workdir: str) -> Optional[Tuple[int, int]]:
    """``(newest checkpoint step, total steps)`` of a run that has written its summary and
    did not stop early."""
    from mim.checkpoints import io as ckpt
    summary = os.path.join(workdir, "summary.json")
    found = ckpt.latest(os.path.join(workdir, "checkpoints"))
    if found is None or not os.path.exists(summary):
        return None
    with open(summary) as f:
        s = json.load(f)
    if s.get("status", "finished") != "finished":
        return None
    return found[1]["step"], s.get("total_steps", s["steps"])


def is_finished(workdir: str) -> bool:
    state = finished_step(workdir)
    return state is not None and state[0] >= state[1]


def final_checkpoint(workdir: str) -> str:
    from mim.checkpoints import io as ckpt
    found = ckpt.latest(os.path.join(workdir, "checkpoints"))
    if found is None:
        raise SweepError(f"{workdir} has no checkpoint")
    return found[0]


def _comparable(config_json: dict) -> dict:
    out = copy.deepcopy(config_json)
    for field in _MECHANICS:
        node = out
        *parents, leaf = field.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


def check_same_config(config, workdir: str):
    saved = os.path.join(workdir, "config.json")
    if not os.path.exists(saved):
        return
    with open(saved) as f:
        before = _comparable(json.load(f))
    now = _comparable(json.loads(config.to_json_best_effort()))
    if before != now:
        diff = sorted(k for k in set(_flat(before)) | set(_flat(now))
                      if _flat(before).get(k) != _flat(now).get(k))
        raise SweepError(f"{workdir} was run with another config (differs in {diff[:6]}); "
                         f"use a new --workdir")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_stage(config, workdir: str, label: str) -> bool:
    """Train ``config`` in ``workdir`` unless it is finished; True if it ran."""
    from mim.train import loop
    if is_finished(workdir):
        print(f"{label}: finished, not run again ({workdir})", flush=True)
        return False
    check_same_config(config, workdir)
    print(f"{label}: running in {workdir}", flush=True)
    loop.train(config, workdir)   # writes workdir/curves.png at its end
    if not is_finished(workdir):
        raise Stopped(f"{label} stopped before its last step; start the sweep again to resume")
    return True


def then_stages(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(folder, spec), ...]`` for the --then files, one folder per file stem."""
    out = []
    for spec in specs:
        stem = os.path.basename(split_spec(spec)[0])
        stem = stem[:-3] if stem.endswith(".py") else stem
        if stem in [s for s, _ in out]:
            raise SweepError(f"--then names {stem} twice; one downstream run per experiment file")
        out.append((stem, spec))
    return out


BASELINE = "random_init"      # the row of --then stages run from the random initialisation


def run_dirs(point_dir: str, seeds: int) -> List[str]:
    """The run folders of one point: the point's own with one seed, else ``seed=k/``."""
    return [point_dir] if seeds == 1 else [os.path.join(point_dir, f"seed={k}") for k in range(seeds)]


def plan(base, spec: str, sweep: Optional[str], then: Sequence[str] = (), carry: Sequence[str] = (),
         seeds: int = 1, baseline: bool = False):
    """``(names, points, stages, runs)``: every run of the sweep as ``(label, run_dir
    relative to the sweep's, pretraining config or None for the baseline, {stem: config},
    its overrides)``,
    all built before any training (a wrong field stops the sweep first)."""
    if seeds < 1:
        raise SweepError(f"--seeds={seeds}: must be at least 1")
    stages = then_stages(then)
    if baseline and not stages:
        raise SweepError("--baseline runs the --then stages from the random initialisation: "
                         "name at least one --then")
    points = sweep_points(spec, sweep) if sweep else [{}]
    names = point_names(points) if sweep else ["pretrained"]
    if BASELINE in names:
        raise SweepError(f"a sweep point may not be named {BASELINE!r}")
    then_configs = {stem: load_config(s) for stem, s in stages}
    for key in carry:
        if not any(key in p for p in points):
            raise SweepError(f"--carry={key}: no point of sweep {sweep!r} overrides it")
    runs = []
    for name, overrides in [*zip(names, points), *([(BASELINE, None)] if baseline else [])]:
        for k, run_dir in enumerate(run_dirs(name, seeds)):
            seed = {"seed": (overrides or {}).get("seed", base.seed) + k}
            where = f"sweep {sweep!r} point {name}"
            c = None if overrides is None else apply_overrides(base, {**overrides, **seed}, where)
            carried = {kk: v for kk, v in (overrides or {}).items() if kk in carry}
            downstream = {}
            for stem, tc in then_configs.items():
                downstream[stem] = apply_overrides(tc, {**carried, "seed": tc.seed + k},
                                                   f"--then {stem} of point {name}")
                if overrides is None:
                    downstream[stem].init.checkpoint = ""
            label = name if seeds == 1 else f"{name} seed={seed['seed']}"
            shown = None if overrides is None else {**overrides, **(seed if seeds > 1 else {})}
            runs.append((label, run_dir, c, downstream, shown))
    return names, points, [s for s, _ in stages], runs


def run(base, spec: str, sweep: Optional[str], workdir: str, then: Sequence[str] = (),
        carry: Sequence[str] = (), shard: Tuple[int, int] = (0, 1), seeds: int = 1,
        baseline: bool = False, vectorize: bool = False) -> List[dict]:
    """Run this launcher's share of the sweep, then write the table; returns its rows."""
    names, points, stages, runs = plan(base, spec, sweep, then, carry, seeds, baseline)
    index, count = shard
    if vectorize:   # the pretraining runs as one; the loop below then finds them finished
        from mim import sweep_vectorized
        sweep_vectorized.run_sweep(runs, workdir, shard)
    for j, (label, rel, c, downstream, _) in enumerate(runs):
        if j % count != index:
            continue
        run_dir = os.path.join(workdir, rel)
        label = f"[{index}/{count}] run {j + 1}/{len(runs)} {label}"
        if c is not None:
            run_stage(c, run_dir, label)
        for stem, tc in downstream.items():
            if c is not None:
                tc.init.checkpoint = os.path.abspath(final_checkpoint(run_dir))
            run_stage(tc, os.path.join(run_dir, stem), f"{label} -> {stem}")
    return write_table(workdir, names, points, stages, seeds, baseline)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raw = config_flags.get_config_filename(FLAGS["config"])  # FILE[:variant]
    workdir = FLAGS.workdir
    if FLAGS.dry_run:
        *_, runs = plan(FLAGS.config, raw, FLAGS.sweep, FLAGS.then, FLAGS.carry, FLAGS.seeds,
                        FLAGS.baseline)
        index, count = shard_from_env(FLAGS.shard)
        for i, (_, rel, c, downstream, overrides) in enumerate(runs):
            mark = "*" if i % count == index else " "
            stages = "".join(f" -> {stem}" for stem in downstream)
            what = "random init" if c is None else "pretrain"
            print(f"{mark} {i:3d} {os.path.join(workdir, rel)}  {what}{stages}  {overrides or ''}")
        return
    if FLAGS.table_only:
        names, points, stages, _ = plan(FLAGS.config, raw, FLAGS.sweep, FLAGS.then, FLAGS.carry,
                                        FLAGS.seeds, FLAGS.baseline)
        rows = write_table(workdir, names, points, stages, FLAGS.seeds, FLAGS.baseline)
    else:
        try:
            rows = run(FLAGS.config, raw, FLAGS.sweep, workdir, FLAGS.then, FLAGS.carry,
                       shard_from_env(FLAGS.shard), FLAGS.seeds, FLAGS.baseline, FLAGS.vectorize)
        except Stopped as e:
            # SIGTERM (preemption) reached a run: the same command resumes the sweep; the
            # exit status is mim.main's for a stopped run, which launchers requeue on.
            from mim.cli import EXIT_STOPPED
            print(e, flush=True)
            sys.exit(EXIT_STOPPED)
    with open(os.path.join(workdir, "results.md")) as f:
        print(f.read(), end="")
    print(f"wrote {os.path.join(workdir, 'results.csv')} ({len(rows)} points)")


def run_cli():
    _define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    from mim import cli
    app.run(cli.guard("mim.sweep", main))


if __name__ == "__main__":
    run_cli()
