"""Entry point: ``python -m mim.main --config=experiments/X.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=512``. Exit status: 0
finished (or already complete), 1 failed, 2 a command-line or config mistake (found before
any work), 3 stopped by SIGTERM or a first Ctrl-C after a checkpoint (the same command
resumes), 130 a second Ctrl-C (:mod:`mim.cli`). A mistake or failure prints one line;
``MIM_DEBUG=1`` or ``--verbose`` shows the traceback.
"""
from __future__ import annotations

import os

# OpenMP's compute threads sleep instead of spinning while they wait for work: spinning
# threads took the CPU the data workers and other processes need, doubling the CPU time
# of a vit_b32.py:tiny step on a shared 2-core machine (docs in README, "demo"). Set before
# torch loads its OpenMP runtime; OMP_WAIT_POLICY=ACTIVE in the environment keeps spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mim import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file: experiments/X.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and pictures")
flags.DEFINE_bool("verbose", False, "errors show their traceback (as MIM_DEBUG=1 does)")


def parse_flags(argv):
    """absl's flag parsing, with each mistake as a :class:`mim.cli.UsageMistake`."""
    cli.check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise cli.UsageMistake(cli.flag_message(e)) from e
    except (AttributeError, KeyError) as e:
        message = cli.unknown_field(e, argv)
        if message is None:
            raise
        raise cli.UsageMistake(message) from e


def main(argv) -> int:
    if len(argv) > 1:
        raise cli.UsageMistake(f"unexpected arguments: {argv[1:]}")
    cli.check_workdir(_WORKDIR.value)
    from mim import backend
    from mim.train import loop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _CONFIG.value
    if config.mode == "eval":
        result = loop.evaluate_only(config, _WORKDIR.value)
    elif config.mode == "knn":
        result = loop.knn_only(config, _WORKDIR.value)
    else:
        result = loop.train(config, _WORKDIR.value)
    # The process group's threads must not outlive the interpreter (backend.teardown).
    # Not after an error: joining them could wait on a collective that never completes.
    backend.teardown()
    return cli.EXIT_STOPPED if (result or {}).get("status") == "stopped" else cli.EXIT_FINISHED


def run(argv=None):
    argv = list(sys.argv if argv is None else argv)
    debug = cli.debug(argv)

    def guarded(fn):
        def call(*args):
            try:
                return fn(*args)
            except KeyboardInterrupt:
                if debug:
                    raise
                # Ctrl-C outside the training steps (which stop at a checkpoint instead)
                sys.stderr.write("\nmim.main: interrupted\n")
                sys.exit(cli.EXIT_INTERRUPTED)
            except Exception as e:  # noqa: BLE001 - one line for a person, the traceback on request
                if debug:
                    raise
                sys.stderr.write(f"mim.main: error: {cli.one_line(e)}\n")
                sys.stderr.flush()
                sys.exit(cli.exit_code(e))
        return call

    flags.mark_flags_as_required(["config", "workdir"])
    app.run(guarded(main), argv=argv, flags_parser=guarded(parse_flags))


if __name__ == "__main__":
    run()
