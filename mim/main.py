"""Entry point: ``python -m mim.main --config=experiments/X.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=512``.
"""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file: experiments/X.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and pictures")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mim import backend
    from mim.train import loop
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _CONFIG.value
    if config.mode == "eval":
        loop.evaluate_only(config, _WORKDIR.value)
    else:
        loop.train(config, _WORKDIR.value)
    # The process group's threads must not outlive the interpreter (backend.teardown).
    # Not after an error: joining them could wait on a collective that never completes.
    backend.teardown()


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
