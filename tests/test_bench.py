"""mim.bench on every experiment's :tiny variant (mim step + eager and compiled peers, one
timed step, in process), the input-pipeline mode, the peak table, and the compiled-step
check: the whole train step of the tiny ViT and the tiny MAE traces as one graph."""
import glob
import importlib.util
import os

import pytest

from conftest import BUNDLED, ROOT
from mim import bench

FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if not os.path.basename(f).startswith("_"))


def tiny(path, batch_size=4):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.batch_size = batch_size
    c.data.num_workers = 0
    return c


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_bench_every_experiment(path, one_thread):
    out = bench.bench_train(tiny(path), steps=1, warmup=1, peers=("eager", "compiled"),
                            compile_backend="eager")
    assert set(out["results"]) == {"mim", "peer_eager", "peer_compiled"}
    for r in out["results"].values():
        assert r["images_per_s"] > 0 and r["peak_bytes"] > 0 and r["mfu"] is None  # CPU: no MFU
        assert r["final_loss"] == r["final_loss"]
    # The peer is the same architecture: FlopCounterMode counts the same model FLOPs.
    assert out["peer"]["flops_per_image"] == pytest.approx(out["flops_per_image"], rel=1e-3)
    assert "mim / peer_eager" in bench.format_report(out)


def test_bench_real_data(one_thread):
    c = tiny(os.path.join(ROOT, "experiments", "mae_base.py"))
    out = bench.bench_train(c, steps=1, warmup=1, peers=(), data="real")
    assert out["results"]["mim"]["images_per_s"] > 0 and "peer" not in out


def test_bench_data_mode():
    c = tiny(os.path.join(ROOT, "experiments", "vit_b32.py"), batch_size=8)
    c.data.num_workers = 1
    r = bench.bench_data(c, batches=2, images=16)
    assert r["one_worker_images_per_s"] > 0 and r["loader_images_per_s"] > 0
    assert r["num_workers"] == 1 and r["path"] == os.path.join(BUNDLED, "train")
    assert "per worker" in bench.format_data_report(r)


def test_peak_table():
    class Be:
        device_type = "cuda"
    import unittest.mock as mock
    for name, precision, want in [("NVIDIA H200", "amp_bf16", 989.4), ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
                                  ("NVIDIA H100 PCIe", "amp_bf16", 756.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
                                  ("Ascend910A", "amp_fp16", 256.0), ("Ascend910B3", "amp_bf16", 313.0)]:
        with mock.patch.object(bench, "device_name", return_value=name):
            assert bench.peak_flops(Be(), precision) == pytest.approx(want * 1e12), name
    with mock.patch.object(bench, "device_name", return_value="Ascend910A"):
        assert bench.peak_flops(Be(), "amp_bf16") is None       # the 910A has no bf16
    assert bench.peak_flops(Be(), "fp32", override_tflops=100.0) == 1e14


@pytest.mark.parametrize("name", ["vit_b32.py", "mae_base.py"])
def test_train_step_is_one_graph(name, one_thread):
    """The whole step (forward, torch.func backward, clipping, optimizer) traces with no
    graph break (fullgraph) and is not traced again on later steps: what torch.compile
    needs to wrap it as one graph. The ViT has stochastic depth, so the step draws."""
    import torch._dynamo.testing
    from mim import backend as backend_lib
    from mim.train import loop
    c = tiny(os.path.join(ROOT, "experiments", name))
    c.optim.clip_grad = 1.0
    if name == "vit_b32.py":
        c.model.drop_path_rate = 0.1
    setup = loop.Setup(c, "")
    run = bench.build_mim(setup, 10)
    batch = bench.synthetic_batch(c, setup.task, c.batch_size, "cpu")
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(run.train_step, backend=counter, fullgraph=True)
    for i in range(3):
        torch.manual_seed(backend_lib.seed_step(0, i, 0))
        run.state, metrics = step(run.state, batch)
    assert counter.frame_count == 1
    assert int(run.state["step"]) == 3 and torch.isfinite(metrics["loss"])
