"""Every experiment's ``:tiny`` trains 2 steps, writes a checkpoint, evaluates (k-NN too
where it declares one) and draws its pictures: in fp32 (what every ``:tiny`` declares) and
under each low-precision policy, whose inputs are cast in one place
(``Backend.cast_inputs``) for the step, evaluation, pictures and the bench alike.

A policy's first-step loss must also be the fp32 run's first-step loss (same seed, so the
same parameters and batch) within the policy's tolerance, non-zero and finite: a loss that
is finite but wrong (a reduction or a cast in the wrong dtype) fails here. Mask counts
past fp16's largest value (65,504) are test_mask_count_precision's.
"""
import glob
import json
import math
import os

import pytest

from conftest import ROOT, experiment
from mim.train import loop

EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "[!_]*.py")))
# Every policy. At batch 8 no mask count nears fp16's range (65,504):
# test_mask_count_precision runs each policy on micro-batches that mask more than that.
POLICIES = ["bf16", "fp16", "amp_bf16", "amp_fp16"]
# Bound on |first-step loss / fp32 first-step loss - 1|: four units of the compute dtype's
# roundoff (2^-8 bf16, 2^-11 fp16); the tiny models' first-step losses land 9-30x inside.
RTOL = {"bf16": 4 * 2.0 ** -8, "amp_bf16": 4 * 2.0 ** -8, "fp16": 4 * 2.0 ** -11,
        "amp_fp16": 4 * 2.0 ** -11}

# The fp32 run of each experiment, kept for the policies' comparison: this file's tests
# run in one process (setup.cfg: --dist loadfile), so each runs once whatever the order.
_FP32_RUNS = {}


def first_step_loss(workdir) -> float:
    """The training loss logged at step 1 (``log_every=1``): the loss of the initial
    parameters on the first batch; NaN if it was not finite (metrics.jsonl writes null)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] == 1 and "train/loss" in row:
                value = row["train/loss"]
                return float("nan") if value is None else float(value)
    raise AssertionError(f"no step-1 training loss in {workdir}/metrics.jsonl")


def train_tiny(name, precision, small_data, workdir):
    """``(config, summary, first-step loss)`` of the ``:tiny`` run under ``precision``."""
    overrides = {"data.path": small_data, "steps": 2, "batch_size": 8, "eval_batch_size": 20,
                 "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "data.num_workers": 0,
                 "grad_accum": 1, "precision": precision}
    c = experiment(name, "tiny", **overrides)
    if "recon" in c:
        c.recon.every = 2
        c.recon.num_images = 2
    if c.knn_every:
        c.knn_every = 2
    summary = loop.train(c, str(workdir))
    return c, summary, first_step_loss(workdir)


def fp32_run(name, small_data, tmp_path_factory):
    if name not in _FP32_RUNS:
        workdir = tmp_path_factory.mktemp(f"{name}-fp32")
        _FP32_RUNS[name] = (workdir, *train_tiny(name, "fp32", small_data, workdir))
    return _FP32_RUNS[name]


@pytest.mark.parametrize("precision", ["fp32"] + POLICIES)
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_trains_and_evaluates_under_precision(name, precision, small_data, tmp_path_factory,
                                                   one_thread):
    if precision == "fp32":
        workdir, c, summary, loss = fp32_run(name, small_data, tmp_path_factory)
    else:
        workdir = tmp_path_factory.mktemp(f"{name}-{precision}")
        c, summary, loss = train_tiny(name, precision, small_data, workdir)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]), summary
    assert os.listdir(workdir / "checkpoints")
    assert summary["eval_count"] == 20, summary
    if c.knn_every:
        assert 0 <= summary["eval_knn_acc1"] <= 100, summary
    if "recon" in c:
        assert os.listdir(workdir / "reconstructions")
    assert math.isfinite(loss) and loss != 0.0, (precision, loss)
    if precision != "fp32":
        ref = fp32_run(name, small_data, tmp_path_factory)[-1]
        assert abs(loss / ref - 1) < RTOL[precision], (precision, loss, ref, loss / ref - 1)
