"""Variant arguments of the experiment files (big_vision's ``parse_arg`` style):
``:tiny,steps=100``, ``:size=large``, unknown keys a clear error; declared sweeps apply."""
import glob
import importlib.util
import os

import pytest

from conftest import ROOT
from mim import config as config_lib
from mim import sweep

FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if not os.path.basename(f).startswith("_"))


def load(path):
    spec = importlib.util.spec_from_file_location("v_" + os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(c):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update({f"{k}.{kk}": vv for kk, vv in _flat(v).items()})
        else:
            out[k] = v
    return out


shared = config_lib.import_sibling(os.path.join(ROOT, "experiments", "x.py"), "_common.py")


def test_parse_arg():
    v = shared.parse_arg("tiny, steps=100,size=large", "f.py", size="base", ratio=0.5)
    assert (v.tiny, v.perf, v.steps, v.size, v.ratio) == (True, False, 100, "large", 0.5)
    v = shared.parse_arg("ratio=1,perf=false", "f.py", ratio=0.5)
    assert v.ratio == 1.0 and isinstance(v.ratio, float) and v.perf is False
    assert vars(shared.parse_arg(None, "f.py")) == vars(shared.parse_arg("", "f.py"))
    with pytest.raises(ValueError, match=r"unknown variant key 'tiney' in 'tiney' of f.py; known keys: "
                                         r"batch_size, perf, steps, tiny"):
        shared.parse_arg("tiney", "f.py")
    with pytest.raises(ValueError, match="'steps' of f.py needs a value"):
        shared.parse_arg("steps", "f.py")
    with pytest.raises(ValueError, match="'x' is not a int"):
        shared.parse_arg("steps=x", "f.py")
    with pytest.raises(ValueError, match="'maybe' is not a bool"):
        shared.parse_arg("tiny=maybe", "f.py")


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_common_keys_in_every_file(path):
    mod = load(path)
    tiny = mod.get_config("tiny")
    short = mod.get_config("tiny,steps=7,batch_size=32")
    # Only the run length, the batch and a longer picture cadence differ.
    diff = {k for k, v in _flat(short).items() if _flat(tiny)[k] != v}
    assert diff <= {"steps", "batch_size", "recon.every"}, diff
    assert (short.steps, short.batch_size) == (7, 32)
    if "recon" in short and tiny.recon.every:
        assert short.recon.every == 7
    config_lib.validate(short)
    perf_tiny = mod.get_config("tiny,perf")
    assert perf_tiny.data.path == tiny.data.path and perf_tiny.log_every == 10
    with pytest.raises(ValueError, match=f"unknown variant key 'stepz'.*{os.path.basename(path)}"):
        mod.get_config("tiny,stepz=3")


def test_mae_size_argument():
    mod = load(os.path.join(ROOT, "experiments", "mae_base.py"))
    # He et al. 2022, Sec. A.1 / ViT (Dosovitskiy et al. 2021) Table 1: ViT-L/16 is 24
    # blocks of width 1024 with 16 heads; ViT-H/14 32 blocks of 1280 with 16 heads.
    large, huge = mod.get_config("size=large"), mod.get_config("size=huge")
    assert (large.model.depth, large.model.embed_dim, large.model.num_heads, large.model.patch_size) == (24, 1024, 16, 16)
    assert (huge.model.depth, huge.model.embed_dim, huge.model.patch_size) == (32, 1280, 14)
    base = mod.get_config(None)
    assert (base.model.depth, base.model.embed_dim) == (12, 768)
    with pytest.raises(ValueError, match="size='giant'.*base, large, huge"):
        mod.get_config("size=giant")
    lin = load(os.path.join(ROOT, "experiments", "mae_base_linprobe.py")).get_config("size=large")
    assert lin.model.embed_dim == 1024


@pytest.mark.parametrize("path", [f for f in FILES if hasattr(load(f), "get_sweeps")],
                         ids=os.path.basename)
def test_declared_sweeps_apply(path):
    mod = load(path)
    for arg in (None, "tiny"):
        base = mod.get_config(arg)
        base.data.path = base.data.path or "/data/imagenet"
        for name, points in mod.get_sweeps(arg).items():
            names = sweep.point_names(points)
            assert len(set(names)) == len(points) > 1
            for p in points:
                c = sweep.apply_overrides(base, p, name)
                config_lib.validate(c)
                for k, v in p.items():
                    node = c
                    for part in k.split("."):
                        node = node[part]
                    assert node == v


def test_mae_mask_ratio_sweep_is_the_papers_grid():
    sweeps = load(os.path.join(ROOT, "experiments", "mae_base.py")).get_sweeps(None)
    # Figure 5 of He et al. 2022 spans masking ratios 10%..90%.
    ratios = [p["model.mask_ratio"] for p in sweeps["mask_ratio"]]
    assert min(ratios) == 0.1 and max(ratios) == 0.9 and 0.75 in ratios
