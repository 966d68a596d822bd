"""Linear-probe grids (mim/tasks/probe_grid.py): every head of a grid follows the
trajectory of a probe trained alone with that lr and weight decay, for LARS, SGD and AdamW;
a run with a held-out split selects its head there and reports every head."""
import json

import pytest
import torch

from mim import config as config_lib
from mim import tree
from mim.data import holdout, pipeline
from mim.models import beit
from mim.tasks import linprobe
from mim.train import loop
from mim.train.setup import Setup

STEPS = 5


def probe(data, optimizer, features="pooled", batch_norm=False, **grid):
    c = config_lib.base()
    c.task = "linprobe"
    c.model = beit.config(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          drop_path_rate=0.0, num_classes=10)
    with c.unlocked():
        c.model.head_init_std = 0.01
    c.probe = linprobe.probe_config(features, batch_norm, **grid)
    c.data.path = data
    c.data.image_size = 32
    c.data.crop_pct = 1.0
    c.data.num_workers = 0
    c.batch_size = 16
    c.eval_batch_size = 40
    c.steps = STEPS
    c.log_every = STEPS
    c.init.format = "mim"
    c.optim.name = optimizer
    c.optim.lr = 0.1
    c.optim.weight_decay = 0.01
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 2
    return c


def batches(n=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(16, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (16,), generator=g)}
            for _ in range(n)]


def train(c, tmp_path):
    built = Setup(c, str(tmp_path)).build_train(STEPS, STEPS)
    state = built.state
    for b in batches():
        state, _ = built.fns.train_step(state, b)
    return tree.flatten(state["params"]), state


# (optimizer, features, batch_norm): MAE's LARS probe with BatchNorm, BEiT's per-block
# probes with SGD, a plain pooled head with AdamW.
CASES = [("lars", "pooled", True), ("sgd", "blocks", False), ("adamw", "pooled", False)]


# Grids whose heads move visibly apart in 5 steps (LARS moves a weight by about
# lr x 0.001 x its norm per step).
GRIDS = {"lars": ((1.0, 8.0), (0.0, 0.5)), "sgd": ((0.05, 0.4), (0.0, 0.05)), "adamw": ((1e-3, 1e-2), (0.0, 0.05))}


@pytest.mark.parametrize("optimizer,features,batch_norm", CASES)
def test_every_head_equals_a_probe_trained_alone(optimizer, features, batch_norm, tmp_path, one_thread):
    """The updates (trained minus initial weights) of each grid head equal those of a probe
    trained alone with the head's lr and weight decay, to fp32 rounding; heads differ."""
    lrs, wds = GRIDS[optimizer]
    grid_c = probe("unused", optimizer, features, batch_norm, lr_grid=lrs, wd_grid=wds)
    grid_params, grid_state = train(grid_c, tmp_path / "grid")
    heads = linprobe.grid_heads(grid_c)
    assert len(heads) == len(lrs) * len(wds) * (2 if features == "blocks" else 1)
    assert {k for k in grid_params if k.startswith("grid.")} == {
        f"grid.{k}.{w}" for k in range(len(heads)) for w in ("weight", "bias")}
    name = (lambda h: f"linear.{h.block}") if features == "blocks" else (
        lambda h: "head.1" if batch_norm else "head")
    start = tree.flatten(linprobe.init(probe("unused", optimizer, features, batch_norm),
                                       torch.Generator().manual_seed(0))[0])
    deltas = {}
    for lr in lrs:
        for wd in wds:
            c = probe("unused", optimizer, features, batch_norm)
            c.optim.lr, c.optim.weight_decay = lr, wd
            alone, alone_state = train(c, tmp_path / f"lr{lr}_wd{wd}")
            for k, h in enumerate(heads):
                if (h.lr, h.weight_decay) != (lr, wd):
                    continue
                for w in ("weight", "bias"):
                    init = start[f"{name(h)}.{w}"]
                    want = alone[f"{name(h)}.{w}"] - init
                    got = grid_params[f"grid.{k}.{w}"] - init
                    scale = want.abs().max().item()
                    assert scale > 0, f"head {k} {w} did not move"
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * scale,
                                               msg=lambda m: f"head {k} ({h}) {w}: {m}")
                    deltas[k, w] = got
            if batch_norm:  # one shared BatchNorm: the same statistics as each probe's own
                torch.testing.assert_close(grid_state["model_state"]["head"]["0"]["running_var"],
                                           alone_state["model_state"]["head"]["0"]["running_var"])
    # the heads of one feature differ: each trained with its own lr / weight decay
    for k, h in enumerate(heads):
        for j in range(k):
            if heads[j].block == h.block:
                d = deltas[k, "weight"]
                assert (d - deltas[j, "weight"]).abs().max() > 1e-3 * d.abs().max(), (heads[j], h)


def test_run_selects_on_the_holdout_and_reports_every_head(small_data, tmp_path, one_thread):
    c = probe(small_data, "sgd", lr_grid=(0.01, 0.3), wd_grid=(0.0, 0.1), holdout=0.25)
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 4
    n_all = pipeline.split_info(c, "train")[0]
    train_idx, held_idx = holdout.split(n_all, 0.25)
    assert len(held_idx) == 30 and not set(train_idx) & set(held_idx)
    assert pipeline.num_train_images(c) == n_all - 30
    summary = loop.train(c, str(tmp_path))
    rows = summary["probe_heads"]
    assert [(r["lr"], r["weight_decay"]) for r in rows] == [(a, b) for a in (0.01, 0.3) for b in (0.0, 0.1)]
    assert all({"val_acc1", "val_acc5", "holdout_acc1"} <= set(r) for r in rows)
    best = max(range(4), key=lambda k: rows[k]["holdout_acc1"])
    assert summary["eval_selected_head"] == best == summary["probe_selected"]["head"]
    assert summary["probe_selected"]["selected_on"] == "holdout"
    assert summary["eval_acc1"] == rows[best]["val_acc1"] == summary[f"eval_acc1_head{best}"]
    assert summary["eval_holdout_count"] == 30
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["probe_heads"] == rows
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 1 + 4 and "selected on the held-out" in table.lower()
    # mode=eval of the run's checkpoint reports the same heads and selection
    c.mode = "eval"
    result = loop.evaluate_only(c, str(tmp_path))
    assert result["selected_head"] == best and result["acc1"] == summary["eval_acc1"]


@pytest.mark.parametrize("field,value,match", [
    ("probe.lr_grid", (0.1, -0.1), "config.probe.lr_grid"),
    ("probe.wd_grid", (0.1, 0.1), "config.probe.wd_grid"),
    ("probe.holdout", 1.0, "config.probe.holdout"),
    ("optim.clip_grad", 1.0, "config.optim.clip_grad"),
    ("optim.weight_decay_end", 0.0, "config.probe.wd_grid"),
])
def test_bad_grid_configs_name_the_field(field, value, match):
    c = probe("unused", "sgd", lr_grid=(0.1, 0.2), wd_grid=(0.0, 0.1))
    node, key = c, field.split(".")
    for part in key[:-1]:
        node = node[part]
    node[key[-1]] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c)


def test_holdout_is_refused_for_streamed_data():
    c = probe("unused", "sgd", holdout=0.1)
    c.data.format = "wds"
    with pytest.raises(config_lib.ConfigError, match="config.probe.holdout"):
        holdout.fraction(c)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "amp_bf16"])
def test_grid_trains_and_evaluates_under_every_precision_policy(precision, small_data, tmp_path, one_thread):
    c = probe(small_data, "lars", "pooled", True, lr_grid=(1.0, 4.0), wd_grid=(0.0, 0.1), holdout=0.1)
    c.precision = precision
    c.steps, c.log_every, c.eval_every, c.checkpoint_every = 2, 2, 2, 2
    summary = loop.train(c, str(tmp_path))
    assert summary["status"] == "finished" and len(summary["probe_heads"]) == 4
    assert all(0 <= r["val_acc1"] <= 100 and 0 <= r["holdout_acc1"] <= 100 for r in summary["probe_heads"])
    assert summary["eval_selected_head"] in range(4)


def test_grid_run_resumes_to_the_uninterrupted_state(small_data, tmp_path, one_thread):
    """Each head's optimizer state is checkpointed: 2 steps, then continued to 4, equal 4."""
    def run(workdir, steps):
        c = probe(small_data, "adamw", lr_grid=(1e-3, 1e-2), wd_grid=(0.0, 0.05))
        c.steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 2, 2, 2
        c.deterministic = True
        return loop.train(c, str(workdir))

    from mim.checkpoints import io
    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4)
    a, b = (io.load_tensors(io.latest(str(tmp_path / d / "checkpoints"))[0]) for d in ("straight", "resumed"))
    assert {k for k in a if k.startswith("opt.mu.grid.")} and set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_holdout_selects_the_block_of_a_per_block_probe():
    val = {"count": 10, "acc1_block0": 30.0, "acc1_block1": 20.0, "acc5_block0": 60.0, "acc5_block1": 70.0,
           "loss_block0": 2.0, "loss_block1": 2.5, "best_block": 0, "acc1": 30.0, "acc5": 60.0, "loss": 2.0}
    held = {"count": 4, "acc1_block0": 25.0, "acc1_block1": 50.0}
    out = linprobe.select(val, held)
    assert out["selected_block"] == 1 and "best_block" not in out
    assert (out["acc1"], out["acc5"], out["loss"]) == (20.0, 70.0, 2.5)
    assert out["holdout_acc1"] == 50.0 and out["holdout_count"] == 4
