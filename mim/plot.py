"""Training curves as pictures, drawn with matplotlib from a run's ``metrics.jsonl``.

    python -m mim.plot runs/mae                          # runs/mae/curves.png
    python -m mim.plot runs/sweep/*/ --out=sweep.png     # several runs overlaid
    python -m mim.plot runs/mae --reconstruction         # + runs/mae/reconstruction.png

:func:`write_curves` writes ``curves.png`` next to ``metrics.jsonl``: one panel for the
loss (training, and evaluation where logged), one for the learning rate, one per other
training metric (gradient norm, ...) and one per evaluation metric (top-1, top-5, ...).
Several runs share the panels, one colour per run. Throughput and data-wait figures are
left out: they describe the machine, not the training. :func:`reconstruction_figure`
enlarges a pretraining run's reconstruction grid (32-px cells are hard to see) and titles
its columns.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
# Logged per log step but about the machine, or counts, not the optimisation.
_SKIP_SUFFIXES = ("/img_s_per_device", "/data_wait_s", "/skipped_images", "/count")

Series = Dict[str, List[Tuple[int, float]]]


def read_metrics(path: str) -> Series:
    """``{metric: [(step, value), ...]}`` sorted by step from a metrics.jsonl file (or
    the run directory holding it). A step logged twice (a run resumed from a checkpoint
    older than its last log) keeps its later value."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics log (is it a mim run directory?)")
    by_name: Dict[str, Dict[int, float]] = {}
    with open(path) as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            # A run killed mid-write leaves a partial last line; anything else is damage.
            if n == last:
                break
            raise ValueError(f"{path}:{n + 1}: not a JSON line") from None
        step = row.get("step")
        if not isinstance(step, int):
            raise ValueError(f"{path}:{n + 1}: row has no integer 'step'")
        for k, v in row.items():
            if k in ("step", "time") or not isinstance(v, (int, float)):
                continue
            by_name.setdefault(k, {})[step] = float(v)
    return {k: sorted(v.items()) for k, v in by_name.items()}


def panels(series: Sequence[Series]) -> List[Tuple[str, List[str]]]:
    """``[(title, [metric, ...]), ...]`` for the union of metrics of ``series``."""
    names = sorted(n for n in set().union(*[s.keys() for s in series])
                   if not n.endswith(_SKIP_SUFFIXES))
    out = []
    loss = [n for n in ("train/loss", "eval/loss") if n in names]
    if loss:
        out.append(("loss", loss))
    if "train/lr" in names:
        out.append(("learning rate", ["train/lr"]))
    for n in names:
        if n not in loss and n != "train/lr":
            out.append((n, [n]))
    return out


def figure(runs: Sequence[Tuple[str, Series]], title: str = ""):
    """A matplotlib ``Figure`` (not registered with pyplot) with one panel per metric
    group and one colour per run; solid lines for training, dashed for evaluation."""
    from matplotlib.figure import Figure

    groups = panels([s for _, s in runs])
    if not groups:
        raise ValueError("no metrics to plot")
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    width, height = 4.6 * cols, 3.3 * rows
    fig = Figure(figsize=(width, height))
    # Fixed margins in inches (tick labels, panel and figure titles): matplotlib's
    # constrained layout draws the same figure at twice the cost, paid at every run's end.
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                        top=1 - (0.65 if title else 0.35) / height, wspace=0.3, hspace=0.55)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for i, (panel_title, names) in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        for (label, s), colour in zip(runs, colours):
            for name in names:
                if name not in s:
                    continue
                steps, values = zip(*s[name])
                style = "--" if name.startswith("eval/") else "-"
                # Few points (evaluations, short runs) show as markers, else a lone point is invisible.
                marker = "o" if len(steps) <= 20 else None
                parts = [p for p in (label, name if len(names) > 1 else "") if p]
                ax.plot(steps, values, style, color=colour, marker=marker, markersize=3,
                        label=" ".join(parts) or None)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel_title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def _trend_metric(col: str) -> bool:
    last = col.rsplit("/", 1)[-1]
    return (last.startswith("eval_") or last == "train_loss") and not last.endswith(
        ("_std", "_count", "_skipped_images", "_used_tokens", "_lr"))


def trend_figure(field: str, points: Sequence[Tuple[float, dict]], baseline: Optional[dict] = None):
    """A sweep's final metrics against its one numeric field: one panel per metric
    (``eval_*`` and ``train_loss``, per stage ``stage/metric``), the mean with error bars
    of one standard deviation (the ``<metric>_std`` of :func:`mim.sweep_table.write_table`'s
    rows) and, where the baseline row has the metric, its mean as a dashed line with a
    band of one standard deviation. None when no point has a metric yet."""
    cols = list(dict.fromkeys(c for _, row in points for c, v in row.items()
                              if isinstance(v, float) and _trend_metric(c)))
    if not cols:
        return None
    from matplotlib.figure import Figure
    n = len(cols)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows))
    order = sorted(points, key=lambda p: p[0])
    for i, col in enumerate(cols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        xs = [x for x, row in order if col in row]
        ys = [row[col] for x, row in order if col in row]
        es = [row.get(col + "_std", 0.0) for x, row in order if col in row]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="pretrained")
        if baseline and isinstance(baseline.get(col), float):
            m, e = baseline[col], baseline.get(col + "_std", 0.0)
            ax.axhline(m, color="grey", linestyle="--", label="random init")
            if e:
                ax.axhspan(m - e, m + e, color="grey", alpha=0.2)
        ax.set_title(col)
        ax.set_xlabel(field)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, path: str) -> str:
    """Write a PNG atomically (temporary file, then rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def write_curves(workdir: str, out: Optional[str] = None) -> Optional[str]:
    """Draw ``workdir/metrics.jsonl`` into ``workdir/curves.png`` (or ``out``); returns
    the path, or None when the log holds no metric yet (a run stopped before its first
    log step)."""
    series = read_metrics(workdir)
    if not panels([series]):
        return None
    return save(figure([("", series)], title=os.path.basename(os.path.abspath(workdir))),
                out or os.path.join(workdir, CURVES_FILE))


def overlay(workdirs: Sequence[str], out: str, title: str = "") -> str:
    """Several runs (a sweep's points) in one figure, labelled by their directory names."""
    runs = []
    for d in workdirs:
        label = os.path.basename(os.path.normpath(d))
        runs.append((label, read_metrics(d)))
    return save(figure(runs, title=title), out)


RECONSTRUCTION_COLUMNS = ("original", "masked", "reconstruction", "reconstruction\n+ visible")


def reconstruction_figure(grid_png: str, out: Optional[str] = None, scale: int = 4,
                          pad: int = 2, columns: Sequence[str] = RECONSTRUCTION_COLUMNS):
    """A reconstruction grid (:func:`mim.visualize.reconstruction_grid`: one row per
    image, four cells separated by ``pad`` pixels) enlarged ``scale`` times without
    smoothing, each column titled. Written to ``out`` when given; returns the Figure."""
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    with Image.open(grid_png) as im:
        arr = np.asarray(im.convert("RGB"))
    height, width = arr.shape[:2]
    cell = (width - (len(columns) + 1) * pad) / len(columns)
    if cell <= 0 or cell != int(cell):
        raise ValueError(f"{grid_png}: {width} px wide is not {len(columns)} cells with "
                         f"{pad}-px gaps")
    cell = int(cell)
    header = 44                    # two lines of 8-pt column titles
    dpi = 100
    fig = Figure(figsize=(width * scale / dpi, (height * scale + header) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height * scale / (height * scale + header)))
    ax.imshow(arr, interpolation="nearest")
    ax.set_axis_off()
    for i, name in enumerate(columns):
        ax.text(pad + i * (cell + pad) + cell / 2, -2, name, ha="center", va="bottom",
                fontsize=8)
    if out:
        save(fig, out)
    return fig


def latest_reconstruction(workdir: str) -> str:
    """The newest ``reconstructions/step_*.png`` a pretraining run drew."""
    import glob
    found = sorted(glob.glob(os.path.join(workdir, "reconstructions", "step_*.png")))
    if not found:
        raise FileNotFoundError(f"{workdir}/reconstructions/ holds no step_*.png (a pretraining "
                                f"run with config.recon.every > 0 draws them)")
    return found[-1]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mim.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png for one run; "
                                 "curves.png in the current directory for several)")
    p.add_argument("--title", default="")
    p.add_argument("--reconstruction", action="store_true",
                   help="also write RUN/reconstruction.png: the run's newest reconstruction grid, "
                        "each cell enlarged (--scale) and the columns titled")
    p.add_argument("--scale", type=int, default=4)
    a = p.parse_args(argv)
    if len(a.runs) == 1 and not a.out:
        path = write_curves(a.runs[0])
        if path is None:
            raise SystemExit(f"{a.runs[0]}: metrics.jsonl holds no metric yet")
    else:
        path = overlay(a.runs, a.out or CURVES_FILE, a.title)
    print(f"wrote {path}")
    if a.reconstruction:
        for run in a.runs:
            out = os.path.join(run, "reconstruction.png")
            reconstruction_figure(latest_reconstruction(run), out, scale=a.scale)
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
