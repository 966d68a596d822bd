"""End to end through ``python -m mim.main``: the tiny ViT learns, a killed run resumes
to the same parameters, eval mode, and bad configs fail before any work."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import ROOT

TINY = os.path.join(ROOT, "experiments", "vit_b32.py") + ":tiny"
FAST = ["--config.data.num_workers=0", "--config.batch_size=32", "--config.eval_batch_size=500"]


def run_main(workdir, *overrides, config=TINY, check=True, timeout=900):
    cmd = [sys.executable, "-m", "mim.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _params(workdir):
    d = os.path.join(workdir, "checkpoints")
    last = sorted(os.listdir(d))[-1]
    return safetensors.torch.load_file(os.path.join(d, last, "state.safetensors"))


@pytest.mark.slow
def test_tiny_vit_learns_and_writes_outputs(tmp_path):
    """180 steps of 32 images (about 1.4 epochs): clearly above the 10% of chance."""
    p = run_main(tmp_path, *FAST, "--config.steps=180", "--config.optim.warmup_steps=20",
                 "--config.eval_every=180")
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["eval_acc1"] > 25.0, p.stdout[-2000:]
    assert "img/s" in p.stdout and "eta" in p.stdout and "summary:" in p.stdout
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert any("eval/acc1" in r for r in rows) and any("train/loss" in r for r in rows)
    assert os.listdir(tmp_path / "tb")
    assert json.load(open(tmp_path / "config.json"))["task"] == "classify"

    e = run_main(tmp_path, "--config.mode=eval", *FAST)
    assert "* Acc@1" in e.stdout
    acc = float(e.stdout.split("* Acc@1")[1].split()[0])
    assert abs(acc - summary["eval_acc1"]) < 1e-6

    # k-NN of the trained encoder's features: well above the 10% of chance.
    k = run_main(tmp_path, "--config.mode=knn", *FAST)
    knn_acc = float(k.stdout.split("Acc@1")[1].split()[0])
    assert knn_acc > 20.0, k.stdout[-2000:]


def test_killed_run_resumes_to_the_same_parameters(tmp_path, small_data):
    """SIGKILL at a random step (not on a checkpoint boundary in general), start again:
    bitwise the parameters and optimizer state of an uninterrupted run."""
    common = [*FAST, f"--config.data.path={small_data}", "--config.steps=16",
              "--config.checkpoint_every=4", "--config.log_every=1",
              "--config.eval_every=1000", "--config.deterministic=True", "--config.keep_checkpoints=2"]
    straight = tmp_path / "straight"
    run_main(straight, *common)

    kill_at = random.randint(5, 14)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mim.main", f"--config={TINY}", f"--workdir={killed}", *common]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith(f"step {kill_at}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    steps = sorted(n for n in os.listdir(killed / "checkpoints") if n.startswith("step_"))
    assert steps and steps[-1] < "step_00000016", (kill_at, steps)
    p = run_main(killed, *common)
    assert "resumed from" in p.stderr
    # one metrics row per step: those the killed run wrote after its checkpoint were dropped
    rows = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 17)), kill_at
    a, b = _params(straight), _params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (kill_at, k)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, small_data):
    cmd = [sys.executable, "-m", "mim.main", f"--config={TINY}", f"--workdir={tmp_path}", *FAST,
           f"--config.data.path={small_data}",
           "--config.steps=100000", "--config.checkpoint_every=100000", "--config.log_every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 3                      # stopped, resumable (mim.cli.EXIT_STOPPED)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["status"] == "stopped" and 3 <= summary["steps"] < 100000
    steps = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(steps) == 1 and int(steps[0][5:]) >= 3
    assert summary["steps"] == int(steps[0][5:])     # the steps done, not the steps planned


@pytest.mark.parametrize("override, message", [
    ("--config.optim.nme=sgd", "nme"),
    ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int()"),
])
def test_bad_flags_fail_with_a_message_naming_the_field(tmp_path, override, message):
    p = run_main(tmp_path, override, check=False, timeout=120)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout, (p.stdout[-1500:], p.stderr[-1500:])
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("key, value, message", [
    ("optim.name", "adam", "config.optim.name: 'adam' is not one of"),
    ("precision", "fp8", "config.precision: 'fp8' is not one of"),
    ("batch_size", 30, "does not split into 1 rank(s) x 4 accumulation"),
    ("data.path", "/nonexistent/data", "dataset split not found: /nonexistent/data/train"),
    ("optim.layer_decay", 1.5, "config.optim.layer_decay"),
    ("model.num_heads", 3, "config.model.num_heads: 3 does not divide model.embed_dim=128"),
    ("optim.schedule", "linear", "config.optim.schedule: 'linear' is not one of"),
    ("optim.milestones", (3.0,), "only schedule='timm_multistep' reads milestones"),
    ("optim.gamma", 0.5, "only schedule='timm_multistep' reads gamma"),
    ("optim.clip_mode", "layer", "config.optim.clip_mode: 'layer' is not one of"),
    ("optim.weight_decay_end", -0.1, "config.optim.weight_decay_end: must be >= 0"),
])
def test_bad_configs_fail_with_a_message_naming_the_field(tmp_path, key, value, message):
    """The same checks as through the command line (tests/test_cli_errors.py shows they
    print one line there), in this process: each stops before any file is written."""
    from conftest import experiment
    from mim.train import loop
    c = experiment("vit_b32", "tiny", **{"grad_accum": 4, key: value})
    with pytest.raises(Exception) as e:
        loop.train(c, str(tmp_path / "run"))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_missing_workdir_and_foreign_checkpoint_are_errors(tmp_path, small_data):
    p = subprocess.run([sys.executable, "-m", "mim.main", f"--config={TINY}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "workdir" in p.stderr
    data = f"--config.data.path={small_data}"
    run_main(tmp_path, *FAST, data, "--config.steps=2", "--config.eval_every=1000")
    p = run_main(tmp_path, *FAST, data, "--config.steps=4", "--config.model.depth=2", check=False)
    assert p.returncode != 0 and "another experiment" in p.stderr


def test_non_finite_loss_stops_the_run_and_keeps_good_checkpoints(tmp_path, small_data):
    p = run_main(tmp_path, *FAST, f"--config.data.path={small_data}", "--config.steps=50", "--config.optim.lr=1e30", "--config.optim.clip_grad=0",
                 "--config.log_every=1", "--config.checkpoint_every=1", "--config.max_nonfinite_steps=2",
                 "--config.optim.warmup_steps=0", check=False)
    assert p.returncode != 0
    assert "the loss was not finite for 2 consecutive steps" in p.stderr
    from mim.checkpoints import io as ckpt
    path, meta = ckpt.latest(str(tmp_path / "checkpoints"))
    for k, v in safetensors.torch.load_file(os.path.join(path, "state.safetensors")).items():
        assert torch.isfinite(v).all(), k


def test_same_seed_same_losses_different_seed_different(tmp_path, small_data):
    def losses(name, *extra):
        run_main(tmp_path / name, *FAST, f"--config.data.path={small_data}", "--config.steps=6", "--config.log_every=1",
                 "--config.eval_every=1000", "--config.deterministic=True", *extra)
        return [r["train/loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))
                if "train/loss" in r]
    a, b, c = losses("a"), losses("b"), losses("c", "--config.seed=1")
    assert len(a) == 6 and a == b
    assert a != c
