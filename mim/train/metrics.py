"""Metric sinks: JSON lines and TensorBoard events (rank 0 only), and the console line."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional


class Writer:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Dict[str, float], prefix: str = "train"):
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
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
