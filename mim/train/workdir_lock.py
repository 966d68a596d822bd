"""One run per workdir: ``<workdir>/.lock`` names the process (pid, host) that trains
into it. It is created atomically (``O_CREAT | O_EXCL``); a second run into the same
workdir is refused naming the holder, and the lock of a process that no longer runs on
this host is taken over. Released when the run's process exits."""
from __future__ import annotations

import atexit
import json
import os
import socket
import time

from mim.cli import UsageMistake

LOCK = ".lock"


class WorkdirLocked(UsageMistake):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                     # someone else's process
    return True


def _holder(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def acquire(workdir: str) -> str:
    """Take ``workdir``'s lock for this process; returns the lock path."""
    path = os.path.join(workdir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is None:            # being written by its creator, or garbage: look again
                time.sleep(0.2)
                held = _holder(path)
            if held is not None and held.get("pid") == me["pid"] and held.get("host") == me["host"]:
                return path             # this process holds it already
            if held is not None and (held.get("host") != me["host"] or _alive(int(held.get("pid", -1)))):
                raise WorkdirLocked(
                    f"--workdir={workdir} is in use by process {held.get('pid')} on host "
                    f"{held.get('host')} (lock {path}); wait for it, stop it, or use another "
                    f"--workdir (remove the lock by hand only if that process is gone)")
            # a dead process's lock (or an unreadable one): take it over
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release, path, me["pid"])
        return path
    raise WorkdirLocked(f"--workdir={workdir}: could not take the lock {path}")


def release(path: str, pid: int) -> None:
    held = _holder(path)
    if held is not None and held.get("pid") == pid and held.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
