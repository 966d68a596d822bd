"""How a run starts, stops and reports, apart from the steps themselves: the opening
banner, SIGTERM / Ctrl-C, ``summary.json`` and the answer to a rerun of a finished run.

A run ends in one of two states, written as ``status`` in ``summary.json``:
``"finished"`` (every planned step done; exit status 0) or ``"stopped"`` (SIGTERM or a
first Ctrl-C: a checkpoint of the steps done, exit status 3, the same command resumes).
See :mod:`mim.cli` for the exit statuses.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from typing import Optional

from mim.train import metrics as metrics_lib

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
FINISHED, STOPPED = "finished", "stopped"


class Stopper:
    """SIGTERM and a first SIGINT (Ctrl-C) set :attr:`signal`: the loop finishes the step
    it is in, writes a checkpoint and stops. A second SIGINT ends the process at once
    (exit status 130), without a checkpoint.

    Data-loader workers forked while it is installed inherit the handler; in them it does
    nothing, so a Ctrl-C (sent to the whole process group) does not kill them under the
    step the main process is finishing."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._pid = os.getpid()
        self._old = {}

    def __enter__(self):
        # Python only lets the main thread install handlers (a run started from another
        # thread, as some notebooks do, keeps the default ones).
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False

    def _on(self, signum, frame):
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signal is not None:
            sys.stderr.write("\nsecond interrupt: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            # The data-loader workers go first: one left sending a batch to a process that
            # is gone prints a ConnectionResetError traceback from its resource sharer.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(130)
        self.signal = signum
        sys.stderr.write(f"\n{signal.Signals(signum).name} received: stopping after this step with a "
                         f"checkpoint (Ctrl-C again to exit at once, losing the steps since the "
                         f"last checkpoint)\n")
        sys.stderr.flush()

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


def resume_command() -> str:
    """The command line of this process, as a person would type it again."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("mim", "main.py")):
        argv = ["python", "-m", "mim.main"] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


def read_summary(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, SUMMARY)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finished_summary(workdir: str, total: int, checkpoint_step: int) -> Optional[dict]:
    """For a run whose last checkpoint is at ``checkpoint_step``: if that is ``total``
    (only a finished run checkpoints its last step) its summary, else None. A summary
    written before runs recorded their status, or none at all, still counts as finished."""
    if checkpoint_step < total:
        return None
    s = read_summary(workdir)
    if not s or s.get("status") == STOPPED:
        return {"status": FINISHED, "steps": checkpoint_step, "summary": "no summary.json"}
    return s


def write_summary(workdir: str, summary: dict) -> str:
    path = os.path.join(workdir, SUMMARY)
    metrics_lib.write_json(path, summary)
    return path


def fmt(d: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def banner(*, device: str, precision: str, world: int, train_images: int, train_classes: int,
           eval_split: Optional[tuple], batch: int, grad_accum: int, total: int,
           steps_per_epoch: int, start: int, workdir: str) -> str:
    """What a run is about to do, in a few lines (printed by rank 0 before the first step)."""
    lines = [
        f"device {device}, precision {precision}, {world} process(es)",
        f"train split: {train_images} images in {train_classes} classes"
        + (f"; eval split: {eval_split[0]} images in {eval_split[1]} classes" if eval_split else ""),
        f"batch {batch} global, {batch // world} per device"
        + (f" ({grad_accum} accumulation steps of {batch // world // grad_accum})" if grad_accum > 1 else ""),
        f"steps {total} planned ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps)"
        + (f", resuming at step {start}" if start else ""),
        f"writing to {os.path.abspath(workdir)}",
    ]
    return "\n".join("run: " + line for line in lines)
