"""How ``python -m mim.main`` talks to a person and to schedulers: its exit statuses, and
command-line mistakes and failures as one line each (:func:`one_line`); ``MIM_DEBUG=1``
or ``--verbose`` keeps the traceback instead (:func:`debug`).

Exit status:

* 0 (:data:`EXIT_FINISHED`): the run finished, or was already complete;
* 1 (:data:`EXIT_FAILED`): it failed (a non-finite loss, a broken checkpoint, a bug);
* 2 (:data:`EXIT_USAGE`): a mistake in the command line or the config, found before any work;
* 3 (:data:`EXIT_STOPPED`): SIGTERM or a first Ctrl-C stopped it after a checkpoint: the
  same command resumes it (``launchers/slurm.sbatch`` requeues on this status);
* 130 (:data:`EXIT_INTERRUPTED`): a second Ctrl-C ended it at once (128 + SIGINT, as shells).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageMistake(Exception):
    """A mistake in the command line, with the one line that names it."""


def debug(argv: Sequence[str]) -> bool:
    return os.environ.get("MIM_DEBUG", "") not in ("", "0") or "--verbose" in argv


def check_config_file(argv: Sequence[str]) -> None:
    # Checked before absl parses it: its loader reports a missing file twice, as tracebacks.
    for a in argv[1:]:
        if a.startswith("--config="):
            path = a[len("--config="):].split(":", 1)[0]
            if not os.path.isfile(path):
                raise UsageMistake(f"--config: no experiment file {path!r} (from {os.getcwd()})")


def unknown_field(e: Optional[BaseException], argv: Sequence[str]) -> Optional[str]:
    """ml_collections' error for an override of a field that does not exist (a KeyError
    inside an AttributeError), as one line naming the flag and keeping its "Did you mean"
    suggestion; None for any other error."""
    while e is not None:
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
            first, _, hint = e.args[0].partition("\n")
            key = first.strip("'\"")
            given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and key in a.split("=", 1)[0][len("--config."):].split(".")]
            where = given[0] if given else "--config"
            hint = hint.strip().rstrip("?")
            return f"{where}: the config has no field {key!r}" + (f"; {hint[0].lower()}{hint[1:]}?" if hint else "")
        e = e.args[0] if e.args and isinstance(e.args[0], BaseException) else (e.__context__ or e.__cause__)
    return None


def flag_message(e: BaseException) -> str:
    """absl's flag error as one line; an error raised inside the experiment file (an
    unknown variant key) arrives with its traceback as text: the flag and its last line."""
    message = str(e)
    if "Traceback (most recent call last)" in message:
        head = message.split(": Error whilst parsing", 1)[0].split("\n", 1)[0]
        last = [line.strip() for line in message.splitlines() if line.strip()][-1]
        message = f"{head}: {last.split(': ', 1)[-1]}"
    return message.splitlines()[0] if message else type(e).__name__


def check_workdir(path: str) -> None:
    """A ``--workdir`` that is a file, lies under a file or cannot be written is refused
    before any work (nothing is created here: that waits until the data is found)."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "is a file" if probe == path else f"lies under {probe}, which is not a directory"
        raise UsageMistake(f"--workdir={path} {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageMistake(f"--workdir={path} cannot be written ({probe} is not writable)")


def exit_code(e: BaseException) -> int:
    from mim.config import ConfigError
    from mim.data.folder import DatasetError
    return EXIT_USAGE if isinstance(e, (UsageMistake, ConfigError, DatasetError, FileNotFoundError)) \
        else EXIT_FAILED


def one_line(e: BaseException) -> str:
    message = " ".join(str(e).split()) or type(e).__name__
    if exit_code(e) == EXIT_USAGE:
        return message                       # it names the flag or field already
    return f"{type(e).__name__}: {message} (MIM_DEBUG=1 or --verbose shows the traceback)"


def run_command(prog: str, fn, argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``fn(argv)`` as ``mim.main`` runs a training: a mistake or a failure
    is one line ``prog: error: ...`` with exit status 2 (a mistake: :func:`exit_code`) or 1,
    the traceback with ``MIM_DEBUG=1`` / ``--verbose``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = debug(argv)
    argv = [a for a in argv if a != "--verbose"]
    try:
        return fn(argv) or EXIT_FINISHED
    except KeyboardInterrupt:
        if verbose:
            raise
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one line for a person, the traceback on request
        if verbose:
            raise
        sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        sys.stderr.flush()
        return exit_code(e)


def guard(prog: str, fn):
    """``fn`` (an absl ``app.run`` main) with its mistakes and failures as one line and
    :func:`exit_code`'s status, as :func:`run_command`."""
    import sys

    def main(argv):
        code = run_command(prog, lambda _: fn(argv), list(sys.argv[1:]))
        if code:
            sys.exit(code)
    return main
