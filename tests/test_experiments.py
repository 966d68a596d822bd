"""Every experiment file: its docstring says how to run it and what it reaches, its
full config validates, and its ``:tiny`` description matches its config (each ``:tiny``
trains, evaluates and checkpoints in tests/test_precision_policies.py)."""
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


def _tiny_text(doc):
    """The ``:tiny`` entry of an experiment docstring's variant list, on one line."""
    start = doc.index(":tiny")
    end = doc.find("\n    :", start + 1)
    return " ".join(doc[start:end if end > 0 else None].split())


def _model(c):
    return c.model.encoder if "encoder" in c.model else c.model


TINY_FACTS = [
    # (pattern in the :tiny text, what it claims of the config)
    (r"(\d+)-block", lambda c: _model(c).depth),
    (r"(\d+)-d\b", lambda c: _model(c).embed_dim),
    (r"ViT[^(]*\(patch (\d+)\)|\(patch (\d+)\)", lambda c: _model(c).patch_size),
    (r"(\d+)-stage Swin", lambda c: len(_model(c).depths)),
    (r"Swin \([^)]*patch (\d+)", lambda c: _model(c).patch_size),
    (r"Swin \([^)]*window (\d+)", lambda c: _model(c).window_size),
    (r"Swin \([^)]*width (\d+)", lambda c: _model(c).embed_dim),
    (r"Swin \([^)]*depths ([\d-]+)", lambda c: "-".join(map(str, _model(c).depths))),
    (r"(\d+)-px mask patches", lambda c: c.model.mask_patch_size),
    (r"(\d+)[- ]px (?:images|CIFAR)", lambda c: c.data.image_size),
    (r"(\d+) steps", lambda c: c.steps),
    (r"steps of batch (\d+)", lambda c: c.batch_size),
    (r"with window (\d+) instead of", lambda c: _model(c).window_size),
]


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_tiny_description_matches_the_config(path):
    """Each number the docstring's ``:tiny`` entry states (blocks, width, patch, stages,
    window, mask patch, image size, steps, batch) is the one its config builds; "the tiny
    X of other.py:tiny" has that file's tiny model (but for a window it says it changes)."""
    import re
    mod = load(path)
    text = _tiny_text(mod.__doc__)
    c = mod.get_config("tiny")
    checked = 0
    for pattern, get in TINY_FACTS:
        m = re.search(pattern, text)
        if m:
            claim = next(g for g in m.groups() if g is not None)
            assert str(get(c)) == claim, f"{os.path.basename(path)} :tiny says {m.group(0)!r}; config: {get(c)}"
            checked += 1
    ref = re.search(r"of (\w+\.py):tiny", text)
    if ref:
        other = load(os.path.join(ROOT, "experiments", ref.group(1))).get_config("tiny")
        changed = {"window_size"} if "instead of" in text else set()
        mine, theirs = _model(c), _model(other)
        for k in ("embed_dim", "depth", "depths", "num_heads", "patch_size", "img_size", "window_size"):
            if k in theirs and k not in changed:
                assert mine.get(k) == theirs[k], f"{k}: {mine.get(k)} vs {ref.group(1)}'s {theirs[k]}"
        checked += 1
    assert checked or "shared tiny" in text, f"nothing checkable in {text!r}"


@pytest.mark.parametrize("path", [p for p in FILES if "def get_sweeps" in open(p).read()],
                         ids=os.path.basename)
def test_declared_sweeps_give_valid_configs(path):
    """Every point of every declared sweep, on the :tiny config and on the full one, names
    fields the config has and passes the task's checks (a sweep never fails at its start)."""
    from mim import sweep, tasks
    for arg in ("tiny", None):
        spec = path + (f":{arg}" if arg else "")
        base = sweep.load_config(spec)
        sweeps = sweep.load_module(path).get_sweeps(arg)
        assert sweeps
        for name in sweeps:
            for point in sweep.sweep_points(spec, name):
                c = sweep.apply_overrides(base, point, f"{name} {point}")
                c.data.path = c.data.path or "/data/imagenet"    # the full recipes name none
                config_lib.validate(c)
                task = tasks.get(c.task)
                if hasattr(task, "check"):
                    task.check(c)
