"""The official checkpoints mim can load, by name (:mod:`mim.checkpoints.registry`).

    python -m mim.weights list
    python -m mim.weights download mae_pretrain_vit_base
    python -m mim.weights verify mae_pretrain_vit_base
    python -m mim.weights download dalle_encoder --trust-pickle

A name works wherever a checkpoint path does (``--config.init.checkpoint=NAME``,
``--config.tokenizer.weights=dalle_encoder``, ``mim.convert``, ``mim.embed``,
``mim.reconstruct``, ``mim.predict``): it is downloaded once into ``$MIM_CACHE``
(default ``~/.cache/mim``) and checked on every use. ``MIM_WEIGHTS_MIRROR=URL`` fetches
``URL/<file name>`` instead of the publishers' addresses.
"""
from __future__ import annotations

import argparse
import os
import sys

from mim import cli
from mim.checkpoints import registry


def _list() -> None:
    rows = [("name", "format", "fits", "source")]
    for r in registry.RELEASES:
        fits = r.experiment or "-"
        cached = " [cached]" if os.path.exists(registry.cache_path(r)) else ""
        rows.append((r.name + cached, r.format, fits, r.source))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(x.ljust(w) for x, w in zip(row, width)) + "  " + row[3])
    print(f"\ncache: {registry.cache_dir()} (MIM_CACHE); URLs: python -m mim.weights show NAME")


def _show(r: registry.Release) -> None:
    for k in ("name", "format", "experiment", "source", "size", "sha256", "md5_prefix", "note"):
        v = getattr(r, k)
        if v not in (None, ""):
            print(f"{k:10s} {v}")
    for u in r.urls:
        print(f"{'url':10s} {u}")
    print(f"{'cache':10s} {registry.cache_path(r)}")


def _release(name: str) -> registry.Release:
    r = registry.get(name)
    if r is None:
        raise cli.UsageMistake(f"no official checkpoint named {name!r} (python -m mim.weights list)")
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mim.weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every official checkpoint mim knows")
    for cmd, text in (("show", "URLs, format, cache path of NAME"),
                      ("download", "fetch NAME into the cache (resuming a partial download) and check it"),
                      ("verify", "check the cached file of NAME (size, SHA-256)")):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("name")
        if cmd == "download":
            s.add_argument("--trust-pickle", action="store_true",
                           help="dalle_encoder: unpickle OpenAI's module once to convert it")
    a = p.parse_args(argv)
    if a.command == "list":
        _list()
        return 0
    r = _release(a.name)
    if a.command == "show":
        _show(r)
    elif a.command == "verify":
        path = registry.cache_path(r)
        if not os.path.exists(path):
            raise registry.WeightsError(f"{r.name}: not in the cache ({path}); python -m mim.weights "
                                        f"download {r.name}")
        print(f"{path}: OK, sha256 {registry.check(r, path)}")
    else:
        path = registry.download(r)
        if r.format == "dalle":
            if not a.trust_pickle:
                raise cli.UsageMistake(f"{path}: downloaded; converting it unpickles OpenAI's module "
                                       f"(runs code from the file): add --trust-pickle if you trust it")
            path = registry.convert_dalle(r, trust_pickle=True)
        print(f"{path}: OK, sha256 {registry.check(r, registry.cache_path(r))}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command("mim.weights", main))
