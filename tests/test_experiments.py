"""Every experiment file: its docstring says how to run it and what it reaches, its
full config validates, and its ``:tiny`` variant trains a few steps (no recipe rots)."""
import glob
import importlib.util
import os

import pytest

from conftest import ROOT
from mim import config as config_lib

FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if not os.path.basename(f).startswith("_"))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_docstring_and_variants(path):
    mod = load(path)
    doc = mod.__doc__ or ""
    assert "python -m mim.main --config=experiments/" in doc, "the docstring gives the command"
    assert "%" in doc or "top-1" in doc or "loss" in doc, "the docstring gives the expected result"
    full = mod.get_config(None)
    full.data.path = full.data.path or "/data/imagenet"
    config_lib.validate(full)
    for variant in ("tiny", "perf"):
        c = mod.get_config(variant)
        c.data.path = c.data.path or "/data/imagenet"
        config_lib.validate(c)
    with pytest.raises(ValueError):
        mod.get_config("no-such-variant")


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_tiny_variant_trains(path, tmp_path):
    from mim.train import loop
    c = load(path).get_config("tiny")
    c.steps = 2
    c.log_every = 1
    c.data.num_workers = 0
    c.eval_every = 1000
    summary = loop.train(c, str(tmp_path))
    assert summary["steps"] == 2
    assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    assert os.listdir(tmp_path / "checkpoints")
