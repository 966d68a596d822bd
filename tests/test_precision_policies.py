"""Every experiment's ``:tiny`` trains 2 steps, writes a checkpoint, evaluates (k-NN too
where it declares one) and draws its pictures: under its own precision (no recipe rots)
and under each low-precision policy, whose inputs are cast in one place
(``Backend.cast_inputs``) for the step, evaluation, pictures and the bench alike."""
import glob
import math
import os

import pytest

from conftest import ROOT, experiment
from mim.train import loop

EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "[!_]*.py")))


@pytest.mark.parametrize("precision", ["declared", "bf16", "fp16", "amp_bf16"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_trains_and_evaluates_under_precision(name, precision, small_data, tmp_path, one_thread):
    overrides = {"data.path": small_data, "steps": 2, "batch_size": 8, "eval_batch_size": 20,
                 "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "data.num_workers": 0,
                 "grad_accum": 1}
    if precision != "declared":
        overrides["precision"] = precision
    c = experiment(name, "tiny", **overrides)
    if "recon" in c:
        c.recon.every = 2
        c.recon.num_images = 2
    if c.knn_every:
        c.knn_every = 2
    summary = loop.train(c, str(tmp_path))
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]), summary
    assert os.listdir(tmp_path / "checkpoints")
    assert summary["eval_count"] == 20, summary
    if c.knn_every:
        assert 0 <= summary["eval_knn_acc1"] <= 100, summary
    if "recon" in c:
        assert os.listdir(tmp_path / "reconstructions")
