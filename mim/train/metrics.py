"""Metric sinks: JSON lines and TensorBoard events (rank 0 only), and the console line."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Optional


def json_safe(obj):
    """``obj`` with every non-finite float (a diverged loss, an empty split's mean) as
    ``None``: ``json.dumps`` would write them as the bare tokens NaN / Infinity, which
    are not JSON and break strict readers (``jq``, JavaScript, most non-Python tools)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON (no NaN / Infinity tokens) of :func:`json_safe` ``(obj)``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def write_json(path: str, obj, indent: int = 1) -> None:
    """Strict JSON to ``path``, atomically (a temporary file renamed over it), so that a
    reader, or a run killed while writing, never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps(obj, indent=indent) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Writer:
    """``metrics.jsonl`` and TensorBoard events under ``workdir``.

    ``resume_step``: the step of the checkpoint a resumed run starts from. Rows a killed
    run wrote after it are dropped from ``metrics.jsonl`` (and hidden in TensorBoard,
    ``purge_step``), since the resumed run writes those steps again: one row per step."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: Optional[int] = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            if resume_step is not None:
                drop_rows_after(path, resume_step)
            self._jsonl = open(path, "a")
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: Dict[str, float], prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self._jsonl.write(dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def image(self, tag: str, hwc_uint8, step: int):
        if self.enabled:
            self._tb.add_image(tag, hwc_uint8, step, dataformats="HWC")

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def drop_rows_after(path: str, step: int) -> int:
    """Remove the rows of ``path`` (JSON lines with a ``step``) after ``step``, and a last
    line cut short by a kill; returns how many lines were removed."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1                    # a line a kill cut short
                continue
            if row.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def progress_line(step: int, total: int, m: Dict[str, float], img_s: float, data_s: float,
                  eta: Optional[float]) -> str:
    parts = [f"step {step}/{total}", f"loss {m.get('loss', float('nan')):.4f}",
             f"lr {m.get('lr', 0):.3e}", f"{img_s:.1f} img/s", f"data {data_s * 1e3:.0f} ms/step"]
    if eta is not None:
        parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)
