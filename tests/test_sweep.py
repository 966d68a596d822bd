"""mim.sweep: a two-point MAE mask-ratio sweep at a few steps, spread over two launchers,
chained into a linear probe, killed and resumed, and its results table checked against
the metric logs read independently."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ROOT
from mim import sweep, sweep_table
from mim.checkpoints import io as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERIMENT = '''
import importlib.util
def _load(name):
    spec = importlib.util.spec_from_file_location(name, {root!r} + "/experiments/" + name + ".py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

def get_config(arg=None):
    c = _load({name!r}).get_config("tiny")
    c.data.path = {data!r}
    c.data.num_workers = 0
    c.steps, c.batch_size, c.eval_batch_size = {steps}, 16, 20
    c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 1, {steps}, 2, 5
    if "recon" in c:
        c.recon.every = 0
    return c

def get_sweeps(arg=None):
    return {{"mask_ratio": [{{"model.mask_ratio": 0.5}}, {{"model.mask_ratio": 0.75}}]}}
'''


def write_experiment(path, name, data, steps):
    path.write_text(EXPERIMENT.format(root=ROOT, name=name, data=data, steps=steps))
    return str(path)


def last_values(run_dir):
    """Last value of each metric, read straight from the JSON lines."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            out.update(json.loads(line))
    return out


def test_sweep_shards_chains_resumes_and_tabulates(tmp_path, small_data):
    pre = write_experiment(tmp_path / "pre.py", "mae_base", small_data, steps=4)
    probe = write_experiment(tmp_path / "probe.py", "mae_base_linprobe", small_data, steps=2)
    work = str(tmp_path / "sweep")
    base = sweep.load_config(pre)
    p1, p2 = (os.path.join(work, n) for n in ("mask_ratio=0.5", "mask_ratio=0.75"))

    # Two launchers: the second runs only the second point (and its probe) ...
    rows = sweep.run(base, pre, "mask_ratio", work, then=[probe], shard=(1, 2))
    assert [r["status"] for r in rows] == ["not run", "done"]
    assert not os.path.exists(p1)
    # ... the first one the first point; its table then holds both.
    rows = sweep.run(base, pre, "mask_ratio", work, then=[probe], shard=(0, 2))
    assert [r["status"] for r in rows] == ["done", "done"]
    for p, ratio in ((p1, 0.5), (p2, 0.75)):
        with open(os.path.join(p, "config.json")) as f:
            assert json.load(f)["model"]["mask_ratio"] == ratio
        with open(os.path.join(p, "probe", "config.json")) as f:
            init = json.load(f)["init"]["checkpoint"]
        assert init == os.path.join(os.path.abspath(p), "checkpoints", "step_00000004")

    # A kill of the second point after its step-2 checkpoint: its last checkpoint and
    # summary are gone. Starting the sweep again finishes it; the first is not run again.
    shutil_rm = __import__("shutil").rmtree
    shutil_rm(os.path.join(p2, "checkpoints", "step_00000004"))
    os.remove(os.path.join(p2, "summary.json"))
    stamp = {f: os.path.getmtime(os.path.join(p1, f)) for f in ("metrics.jsonl", "summary.json")}
    t0 = time.time()
    rows = sweep.run(base, pre, "mask_ratio", work, then=[probe])
    assert {f: os.path.getmtime(os.path.join(p1, f)) for f in stamp} == stamp
    # Steps 1-2 come from before the kill, 3-4 from the resumed run.
    logged = [json.loads(line) for line in open(os.path.join(p2, "metrics.jsonl"))]
    assert sorted({r["step"] for r in logged if r["time"] < t0}) == [1, 2], logged
    assert sorted({r["step"] for r in logged if r["time"] > t0}) == [3, 4], logged
    assert [s for s, _ in ckpt.list_steps(os.path.join(p2, "checkpoints"))][-1] == 4

    # The table: overrides and final metrics, equal to the logs' last values.
    with open(os.path.join(work, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["mask_ratio=0.5", "mask_ratio=0.75"]
    assert [r["model.mask_ratio"] for r in table] == ["0.5", "0.75"]
    for r, p in zip(table, (p1, p2)):
        want, want_probe = last_values(p), last_values(os.path.join(p, "probe"))
        assert float(r["train_loss"]) == pytest.approx(want["train/loss"], rel=1e-12)
        assert float(r["eval_loss"]) == pytest.approx(want["eval/loss"], rel=1e-12)
        assert float(r["probe/eval_acc1"]) == pytest.approx(want_probe["eval/acc1"], rel=1e-12)
        assert r["status"] == r["probe/status"] == "done"
    md = open(os.path.join(work, "results.md")).read().splitlines()
    assert md[0].startswith("| point | model.mask_ratio |") and len(md) == 4
    for name in ("curves.png", "curves_probe.png"):
        with Image.open(os.path.join(work, name)) as im:
            im.verify()
    with Image.open(os.path.join(p1, "curves.png")) as im:
        im.verify()

    # The same workdir with another config is refused, naming the difference.
    other = sweep.apply_overrides(base, {"optim.base_lr": 1e-2}, "test")
    shutil_rm(os.path.join(p1, "checkpoints"))
    with pytest.raises(sweep.SweepError, match="optim.base_lr"):
        sweep.run(other, pre, "mask_ratio", work)


def test_bad_declarations_are_clear_errors(tmp_path, small_data):
    pre = write_experiment(tmp_path / "pre.py", "mae_base", small_data, steps=4)
    base = sweep.load_config(pre)
    with pytest.raises(sweep.SweepError, match="declares: mask_ratio"):
        sweep.sweep_points(pre, "depth")
    with pytest.raises(sweep.SweepError, match="no field 'model.mask_ration'"):
        sweep.apply_overrides(base, {"model.mask_ration": 0.5}, "point")
    with pytest.raises(sweep.SweepError, match="i/n"):
        sweep.shard_from_env("2/2")
    assert sweep.point_names([{"model.depth": 2, "optim.lr": 0.1}]) == ["depth=2-lr=0.1"]
    # Colliding short names fall back to the full dotted names.
    assert sweep.point_names([{"a.x": 1}, {"b.x": 1}]) == ["a.x=1", "b.x=1"]


def test_shard_from_launcher_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert sweep.shard_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert sweep.shard_from_env() == (5, 8)
    assert os.environ["LOCAL_RANK"] == "1"          # this task's device on its node
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sweep.shard_from_env() == (3, 4)
    # Each launcher's runs are one-device runs: no process group over the launchers.
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")


def test_cli_lists_the_declared_mae_sweep(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mim.sweep", "--config=experiments/mae_base.py:tiny",
         "--sweep=mask_ratio", f"--workdir={tmp_path}", "--dry_run", "--shard=1/2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["0.25}", "0.5}", "0.75}", "0.9}"]
    assert [line.startswith("*") for line in lines] == [False, True, False, True]


def test_a_stopped_run_stops_the_sweep(tmp_path, monkeypatch):
    from mim.train import loop
    # A run that returns before its last step (SIGTERM) leaves no finished checkpoint.
    monkeypatch.setattr(loop, "train", lambda config, workdir: {"status": "stopped"})
    with pytest.raises(sweep.Stopped, match="start the sweep again"):
        sweep.run_stage(None, str(tmp_path / "p"), "point 1")


def test_seeds_and_baseline_plan_and_tabulate(tmp_path, small_data, monkeypatch):
    """--seeds=3 --baseline: each point at seeds 0, 1, 2 (its --then stages too), the
    --then stages from the random initialisation at the same seeds, and a table of mean
    and sample standard deviation over the seeds (checked with statistics), per-run rows
    in runs.csv, and the trend picture."""
    import statistics

    pre = write_experiment(tmp_path / "pre.py", "mae_base", small_data, steps=4)
    probe = write_experiment(tmp_path / "probe.py", "mae_base_linprobe", small_data, steps=2)
    work = tmp_path / "sweep"
    ran = []
    acc = {("mask_ratio=0.5", 0): 30.0, ("mask_ratio=0.5", 1): 32.0, ("mask_ratio=0.5", 2): 37.0,
           ("mask_ratio=0.75", 0): 40.0, ("mask_ratio=0.75", 1): 41.0, ("mask_ratio=0.75", 2): 45.0,
           ("random_init", 0): 20.0, ("random_init", 1): 21.0, ("random_init", 2): 25.0}

    def fake_stage(config, run_dir, label):
        ran.append((os.path.relpath(run_dir, work), config.seed, config.init.checkpoint))
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        parts = os.path.relpath(run_dir, work).split(os.sep)
        point, seed = parts[0], int(parts[1].split("=")[1])
        value = acc[(point, seed)] + (0.5 if parts[-1] == "probe" else 0.0)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "train/loss": 1.0 + seed}) + "\n")
            f.write(json.dumps({"step": 4, "eval/acc1": value, "knn/acc1": value - 1,
                                "knn/count": 20}) + "\n")
        return True

    monkeypatch.setattr(sweep, "run_stage", fake_stage)
    monkeypatch.setattr(sweep, "final_checkpoint", lambda d: os.path.join(d, "checkpoints", "step_4"))
    monkeypatch.setattr(sweep_table, "_status", lambda d: "done")
    base = sweep.load_config(pre)
    rows = sweep.run(base, pre, "mask_ratio", str(work), then=[probe], seeds=3, baseline=True)
    pre_runs = [(d, s) for d, s, _ in ran if not d.endswith("probe")]
    assert pre_runs == [(f"mask_ratio={r}/seed={k}", k) for r in ("0.5", "0.75") for k in range(3)]
    probes = [(d, s, ck) for d, s, ck in ran if d.endswith("probe")]
    assert [s for _, s, _ in probes] == [0, 1, 2] * 3
    for d, _, ck in probes:
        if d.startswith("random_init"):
            assert ck == ""
        else:
            assert ck == os.path.abspath(os.path.join(work, os.path.dirname(d), "checkpoints", "step_4"))
    by_point = {r["point"]: r for r in rows}
    assert list(by_point) == ["mask_ratio=0.5", "mask_ratio=0.75", "random_init"]
    for point in by_point:
        vals = [acc[(point, k)] for k in range(3)]
        row = by_point[point]
        assert row["probe/eval_acc1"] == pytest.approx(statistics.mean(vals) + 0.5)
        assert row["probe/eval_acc1_std"] == pytest.approx(statistics.stdev(vals))
        assert row["probe/eval_knn_acc1"] == pytest.approx(statistics.mean(vals) - 0.5)
        assert "probe/eval_knn_count" not in row
        if point != "random_init":
            assert row["eval_acc1"] == pytest.approx(statistics.mean(vals))
            assert row["train_loss"] == pytest.approx(2.0) and row["train_loss_std"] == pytest.approx(1.0)
    with open(work / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 9 and float(runs[4]["probe/eval_acc1"]) == acc[("mask_ratio=0.75", 1)] + 0.5
    md = (work / "results.md").read_text()
    assert "33.5 ± 3.6" in md and "eval_acc1_std" not in md
    assert (work / "trend.png").stat().st_size > 0


def test_seeds_refusals(tmp_path, small_data):
    pre = write_experiment(tmp_path / "pre.py", "mae_base", small_data, steps=4)
    base = sweep.load_config(pre)
    with pytest.raises(sweep.SweepError, match="at least 1"):
        sweep.plan(base, pre, "mask_ratio", seeds=0)
    with pytest.raises(sweep.SweepError, match="name at least one --then"):
        sweep.plan(base, pre, None, baseline=True)
    names, points, _, runs = sweep.plan(base, pre, None, seeds=2)
    assert names == ["pretrained"] and points == [{}]
    assert [r[1] for r in runs] == ["pretrained/seed=0", "pretrained/seed=1"]
