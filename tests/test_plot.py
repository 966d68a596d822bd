"""mim.plot: curves from metrics.jsonl as PNG files, for one run and several overlaid."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import few_steps
from mim import plot

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_run(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


ROWS = [
    {"step": 10, "time": 1.0, "train/loss": 2.0, "train/lr": 1e-4, "train/img_s_per_device": 50.0},
    {"step": 20, "time": 2.0, "train/loss": 1.5, "train/lr": 2e-4, "train/grad_norm": 3.0},
    {"step": 20, "time": 2.1, "eval/acc1": 30.0, "eval/loss": 1.7, "eval/count": 100},
    # A resumed run logs step 20 again: the later value counts.
    {"step": 20, "time": 3.0, "train/loss": 1.4, "train/lr": 2e-4},
    {"step": 30, "time": 4.0, "train/loss": 1.1, "train/lr": 1e-4},
]


def png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10, "an image with content, not a blank canvas"
    return arr


def test_synthetic_log_to_png(tmp_path):
    run = synthetic_run(tmp_path / "run", ROWS)
    s = plot.read_metrics(run)
    assert s["train/loss"] == [(10, 2.0), (20, 1.4), (30, 1.1)]
    assert s["eval/acc1"] == [(20, 30.0)]
    assert plot.panels([s]) == [("loss", ["train/loss", "eval/loss"]), ("learning rate", ["train/lr"]),
                                ("eval/acc1", ["eval/acc1"]), ("train/grad_norm", ["train/grad_norm"])]
    fig = plot.figure([("run", s)])
    loss_ax = fig.axes[0]
    xy = loss_ax.lines[0].get_xydata()
    np.testing.assert_array_equal(xy, [[10, 2.0], [20, 1.4], [30, 1.1]])
    path = plot.write_curves(run)
    assert path == os.path.join(run, "curves.png")
    arr = png(path)
    # 3 columns x 2 rows of panels at 100 dpi (figure size in mim.plot.figure).
    assert arr.shape == (660, 1380, 3)


def test_partial_last_line_and_empty_log(tmp_path):
    run = synthetic_run(tmp_path / "run", ROWS[:2])
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 40, "train/lo')  # killed mid-write
    assert plot.read_metrics(run)["train/loss"] == [(10, 2.0), (20, 1.5)]
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1\n{"step": 2, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1: not a JSON line"):
        plot.read_metrics(run)
    empty = synthetic_run(tmp_path / "empty", [])
    assert plot.write_curves(empty) is None
    with pytest.raises(FileNotFoundError, match="no metrics log"):
        plot.read_metrics(str(tmp_path / "nothing"))


def test_overlay_cli(tmp_path, capsys):
    a = synthetic_run(tmp_path / "a", ROWS)
    b = synthetic_run(tmp_path / "b", [dict(r, **{"train/loss": r["train/loss"] * 2})
                                       for r in ROWS if "train/loss" in r])
    out = str(tmp_path / "both.png")
    plot.main([a, b, "--out", out, "--title", "two runs"])
    assert "wrote" in capsys.readouterr().out
    png(out)
    fig = plot.figure([("a", plot.read_metrics(a)), ("b", plot.read_metrics(b))])
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["a train/loss", "a eval/loss", "b train/loss"]


def test_real_run_writes_curves(tmp_path, small_data):
    from mim.train import loop
    c = few_steps("vit_b32", small_data, batch_size=16)
    loop.train(c, str(tmp_path))
    path = plot.write_curves(str(tmp_path))
    png(path)
    s = plot.read_metrics(str(tmp_path))
    assert [step for step, _ in s["train/loss"]] == [1, 2, 3]
    assert "eval/acc1" in s


def test_reconstruction_figure_enlarges_exactly(tmp_path):
    from mim import visualize
    rng = np.random.default_rng(0)
    cell, pad, rows = 8, 2, 2
    grid = np.full((rows * cell + (rows + 1) * pad, 4 * cell + 5 * pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(4):
            top, left = pad + r * (cell + pad), pad + c * (cell + pad)
            grid[top:top + cell, left:left + cell] = rng.integers(0, 255, (cell, cell, 3))
    run = tmp_path / "run"
    visualize.save_grid(run / "reconstructions" / "step_00000005.png", grid)
    synthetic_run(run, ROWS)
    plot.main([str(run), "--reconstruction", "--scale", "3"])
    big = png(run / "reconstruction.png")
    # Below the column titles: every pixel repeated 3x3, no smoothing.
    want = np.repeat(np.repeat(grid, 3, 0), 3, 1)
    assert big.shape[1] == want.shape[1] and big.shape[0] > want.shape[0]
    np.testing.assert_array_equal(big[-want.shape[0]:], want)
    # The titles are drawn above: the header is not blank.
    assert big[:-want.shape[0]].min() < 128
    with pytest.raises(ValueError, match="not 4 cells"):
        Image.fromarray(grid[:, :-1]).save(tmp_path / "bad.png")
        plot.reconstruction_figure(str(tmp_path / "bad.png"))
