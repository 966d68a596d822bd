"""The results of a sweep (:mod:`mim.sweep`): ``results.csv`` / ``results.md`` with each
point's overrides and final metrics per stage (with several seeds, their mean and sample
standard deviation, and ``runs.csv``), ``curves.png`` per stage and ``trend.png``, all
read from what the runs wrote to disk."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Dict, List, Sequence, Tuple


def final_metrics(run_dir: str) -> Dict[str, float]:
    """The last logged training loss and evaluation metrics of a run (the k-NN evaluator's
    as ``eval_knn_*``, as the run's summary names them)."""
    from mim import plot
    if not os.path.exists(os.path.join(run_dir, plot.METRICS_FILE)):
        return {}
    series = plot.read_metrics(run_dir)
    out = {}
    if "train/loss" in series:
        out["train_loss"] = series["train/loss"][-1][1]
    for k, v in series.items():
        if k.startswith("eval/") and k != "eval/count":
            out["eval_" + k[5:]] = v[-1][1]
        elif k.startswith("knn/") and k not in ("knn/count", "knn/train_images"):
            out["eval_knn_" + k[4:]] = v[-1][1]
    return out


def _status(run_dir: str) -> str:
    from mim.sweep import is_finished
    if is_finished(run_dir):
        return "done"
    return "incomplete" if os.path.isdir(run_dir) else "not run"


def _run_row(run_dir: str, stages: Sequence[str]) -> dict:
    row = {"status": _status(run_dir)}
    for stage, d in [("", run_dir)] + [(s + "/", os.path.join(run_dir, s)) for s in stages]:
        if stage:
            row[stage + "status"] = _status(d)
        for k, v in final_metrics(d).items():
            row[stage + k] = v
    return row


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def write_table(workdir: str, names: Sequence[str], points: Sequence[dict],
                stages: Sequence[str], seeds: int = 1, baseline: bool = False) -> List[dict]:
    """``results.csv`` and ``results.md`` (written atomically), ``curves.png`` per stage
    and, with several seeds, ``runs.csv`` (one row per run), each metric's mean and
    standard deviation over the finished seeds (``results.csv``: ``m`` and ``m_std``;
    ``results.md``: ``mean ± std``) and ``trend.png`` (each metric against the swept
    value, with error bars, beside the baseline) for a sweep of one numeric field."""
    from mim import plot
    from mim.sweep import BASELINE, _fmt, run_dirs
    keys = list(dict.fromkeys(k for p in points for k in p))
    rows, metric_cols, per_run = [], [], []
    entries = list(zip(names, points)) + ([(BASELINE, {})] if baseline else [])
    for name, overrides in entries:
        row = {"point": name, **{k: _fmt(overrides[k]) if k in overrides else "" for k in keys}}
        runs = []
        for k, d in enumerate(run_dirs(os.path.join(workdir, name), seeds)):
            r = _run_row(d, stages)
            if name == BASELINE:
                r.pop("status")
            runs.append(r)
            per_run.append({"point": name, "seed": k, **r})
        if seeds == 1:
            row.update(runs[0])
        else:
            done = [r for r in runs if all(v == "done" for kk, v in r.items() if kk.endswith("status"))]
            row["status"] = f"{len(done)}/{seeds} done"
            for col in dict.fromkeys(kk for r in done for kk, v in r.items() if isinstance(v, float)):
                vals = [r[col] for r in done if col in r]
                row[col], row[col + "_std"] = mean_std(vals)
        metric_cols += [k for k in row if k not in metric_cols]
        rows.append(row)
    columns = list(dict.fromkeys(["point", *keys, *metric_cols]))
    os.makedirs(workdir, exist_ok=True)
    _write(os.path.join(workdir, "results.csv"), _csv(columns, rows))
    if seeds > 1:
        _write(os.path.join(workdir, "runs.csv"),
               _csv(list(dict.fromkeys(k for r in per_run for k in r)), per_run))
    # results.md: the std beside its mean; unreadable-image counts only where some were skipped
    shown = [c for c in columns if not (seeds > 1 and c.endswith("_std") and c[:-4] in columns)
             and not (c.endswith("skipped_images") and not any(r.get(c) for r in rows))]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, ""), row.get(c + "_std") if seeds > 1 else None)
                                       for c in shown) + " |")
    _write(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
    for stage in [""] + list(stages):
        dirs = [(label, os.path.normpath(os.path.join(d, stage)))
                for name, _ in entries for label, d in zip(
                    [name] if seeds == 1 else [f"{name}/seed={k}" for k in range(seeds)],
                    run_dirs(os.path.join(workdir, name), seeds))]
        dirs = [(label, d) for label, d in dirs if os.path.exists(os.path.join(d, plot.METRICS_FILE))
                and plot.panels([plot.read_metrics(d)])]
        if dirs:
            out = os.path.join(workdir, f"curves_{stage}.png" if stage else "curves.png")
            plot.save(plot.figure([(label, plot.read_metrics(d)) for label, d in dirs],
                                  title=stage or os.path.basename(os.path.normpath(workdir))), out)
    if len(keys) == 1 and all(isinstance(p.get(keys[0]), (int, float)) for p in points):
        base_row = rows[-1] if baseline else None
        fig = plot.trend_figure(keys[0], [(p[keys[0]], r) for p, r in zip(points, rows)], base_row)
        if fig is not None:
            plot.save(fig, os.path.join(workdir, "trend.png"))
    return rows


def _csv(columns, rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _cell(v, std=None) -> str:
    if isinstance(v, float) and std is not None:
        return f"{v:.4g} ± {std:.2g}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
