"""mim.bench on every experiment's :tiny variant (mim step + eager and compiled peers, one
timed step, in process), the input-pipeline mode, the peak table, and the compiled-step
check: the whole train step of the tiny ViT and the tiny MAE traces as one graph."""
import glob
import importlib.util
import os

import pytest

from conftest import BUNDLED, ROOT
from mim import bench, peers

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
    c = tiny(path)
    try:
        peers.build(c)
    except ValueError as e:   # recipes without a timm peer yet: mim's step alone
        assert "--peer=none" in str(e)
        out = bench.bench_train(c, steps=1, warmup=1, peers=())
        m = out["results"]["mim"]
        assert m["images_per_s"] > 0 and m["final_loss"] == m["final_loss"]
        assert m["scalar_reads_per_step"] == 0 and out["flops_per_image"] > 0
        return
    out = bench.bench_train(c, steps=1, warmup=1, peers=("eager", "compiled"),
                            compile_backend="eager")
    assert set(out["results"]) == {"mim", "peer_eager", "peer_compiled"}
    for r in out["results"].values():
        assert r["images_per_s"] > 0 and r["peak_bytes"] > 0 and r["mfu"] is None  # CPU: no MFU
        assert r["final_loss"] == r["final_loss"]
    # The peer is the same architecture: FlopCounterMode counts the same model FLOPs.
    assert out["peer"]["flops_per_image"] == pytest.approx(out["flops_per_image"], rel=1e-3)
    assert "mim / peer_eager" in bench.format_report(out)
    if c.task in ("beit_pretrain", "moby_pretrain"):
        # the untrained share (BEiT's tokenizer, MoBY's momentum branch), counted apart for
        # both: the same FLOPs, a part of the step's
        assert 0 < out["frozen_flops_per_image"] < out["flops_per_image"] / 2
        assert out["peer"]["frozen_flops_per_image"] == pytest.approx(out["frozen_flops_per_image"],
                                                                      rel=1e-6)
        assert f"of which {bench.FROZEN_SHARES[c.task]}" in bench.format_report(out)
    # mim's step never reads a value back (.item(), bool(t)): on an accelerator that would
    # make the host wait for the device in every step
    m = out["results"]["mim"]
    assert m["scalar_reads_per_step"] == 0 and m["aten_ops_per_step"] > 100
    assert out["results"]["peer_eager"]["aten_ops_per_step"] > 100
    assert "0 scalar reads" in bench.format_report(out)


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


@pytest.mark.parametrize("name", ["vit_b32.py", "mae_base.py", "beit_base.py", "moby_swin_tiny.py",
                                  "simmim_swin_base.py", "moby_swin_tiny_linear.py"])
def test_train_step_is_one_graph(name, one_thread):
    """The whole step (forward, torch.func backward, clipping, optimizer) traces with no
    graph break (fullgraph) and is not traced again on later steps: what torch.compile
    needs to wrap it as one graph (a break inside the loss would send the whole gradient
    back to eager mode). The ViT has stochastic depth, so the step draws; BEiT and MoBY
    run derived configs (mim.models.derived), Swin its drop-path rates."""
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


def test_command_line_writes_json_and_benchmarks_rows(tmp_path):
    """The documented command prints mim and peer figures from one run; ``--json`` keeps
    them with the command that made them, and ``--rows`` turns them into BENCHMARKS.md rows."""
    import json
    import subprocess
    import sys
    out = tmp_path / "vit.json"
    cmd = [sys.executable, "-m", "mim.bench", "--config=experiments/vit_b32.py:tiny",
           "--config.batch_size=8", "--config.data.num_workers=0", "--steps=1", "--warmup=1",
           "--peer=eager", "--threads=1", f"--json={out}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "mim / peer_eager: speed x" in run.stdout
    r = json.loads(out.read_text())
    assert r["command"].startswith("python -m mim.bench --config=experiments/vit_b32.py:tiny")
    rows = subprocess.run([sys.executable, "-m", "mim.bench", f"--rows={out},{out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert rows.returncode == 0, rows.stderr[-2000:]
    lines = rows.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    cells = [x.strip() for x in lines[0].strip("|").split("|")]
    assert len(cells) == 5 and cells[2] == f"`{r['command']}`"
    assert "mim " in cells[1] and "peer_eager " in cells[1] and "(mim x" in cells[1]
    assert cells[3] == r["device"] and cells[4] == r["date"]


def test_benchmarks_script_runs_every_row_and_prints_the_table(tmp_path):
    """launchers/benchmarks.sh with a stand-in for python that logs each mim.bench command
    and writes a result JSON; the real ``--rows`` makes the table."""
    import json
    import subprocess
    import sys
    result = {"config": {"task": "classify", "model": "vit", "precision": "bf16", "batch_size": 256},
              "results": {"mim": {"images_per_s": 100.0, "mfu": 0.4, "peak_bytes": 2 ** 30}},
              "device": "NVIDIA H200", "command": "python -m mim.bench x", "date": "2026-11-26"}
    (tmp_path / "result.json").write_text(json.dumps(result))
    stub = tmp_path / "python"
    stub.write_text(f"""#!/usr/bin/env bash
for a in "$@"; do
  case $a in
    --rows=*) exec {sys.executable} "$@" ;;
    --json=*) cp {tmp_path}/result.json "${{a#--json=}}" ;;
  esac
done
echo "$*" >> {tmp_path}/calls
""")
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), OUT=str(tmp_path / "out"), DATA_DIR="/data/imagenet")
    run = subprocess.run(["bash", "launchers/benchmarks.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 14 and all(c.startswith("-m mim.bench --config=experiments/") for c in calls)
    assert sum("--mode=data --data_dir=/data/imagenet" in c for c in calls) == 3
    assert any("--config.data.decode=device" in c for c in calls)
    assert any("--config.cuda_graphs=True" in c for c in calls)
    for c in calls:
        path = c.split("--config=")[1].split()[0].split(":")[0]
        assert os.path.isfile(os.path.join(ROOT, path)), path
    rows = run.stdout.strip().splitlines()
    assert len(rows) == 14 and all(r.startswith("| classify vit, bf16, batch 256") for r in rows)
    for name in ("beit_base", "beit_base_finetune", "moby_swin_tiny", "moby_swin_tiny_linear"):
        assert any(f"--config=experiments/{name}.py:perf" in c for c in calls), name
    assert "mim 100.0 img/s, MFU 40.0%, 1.0 GiB" in rows[0]
    env["ONLY"] = "mae_base"
    env["OUT"] = str(tmp_path / "only")
    (tmp_path / "calls").unlink()
    run = subprocess.run(["bash", "launchers/benchmarks.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and len((tmp_path / "calls").read_text().splitlines()) == 1
