"""Data-parallel training in real processes (gloo on CPU, launched by torchrun):

- 2 ranks train to the same parameters as 1 rank with the same global batch;
- only rank 0 writes metrics and checkpoints, evaluation counts every image once
  (7 images over 2 ranks);
- a checkpoint resumes with another number of ranks (2 -> 1 and 1 -> 2);
- two "nodes" meet through torchrun's c10d rendezvous on 127.0.0.1;
- the batch-size error names the world size.

A tiny ViT on a 48-image, 3-class folder keeps each run to a few seconds of compute.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import BUNDLED, ROOT

TINY = os.path.join(ROOT, "experiments", "vit_b32.py") + ":tiny"
STEPS = 4
CLASSES = ("airplane", "cat", "ship")
# Global batch 16 over 48 images: 3 steps per epoch, so 4 steps cross an epoch boundary.
COMMON = ["--config.data.num_workers=0", "--config.batch_size=16", "--config.eval_batch_size=8",
          f"--config.steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=2",
          "--config.eval_every=1000", "--config.optim.warmup_steps=1", "--config.model.depth=2",
          "--config.model.embed_dim=64", "--config.model.num_heads=2", "--config.model.num_classes=3",
          # SGD (with momentum, clipping at norm 1) is linear in the gradient, so the rounding
          # of a different reduction order stays at rounding level. AdamW divides by the
          # gradient's own size and amplifies it where the exact gradient is zero (the key
          # bias of attention, softmax being shift-invariant): there 1 and 2 ranks differ by
          # lr per step. Sharded AdamW is compared with unsharded AdamW on equal ranks below.
          "--config.optim.name=sgd", "--config.optim.lr=0.05"]
LAUNCHERS = os.path.join(ROOT, "launchers")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 training images per class; 7 eval images, which 2 ranks cannot split evenly."""
    root = tmp_path_factory.mktemp("folder")
    for i, cls in enumerate(CLASSES):
        for split, n in (("train", 16), ("val", 3 if i == 0 else 2)):
            src = os.path.join(BUNDLED, split, cls)
            dst = root / split / cls
            dst.mkdir(parents=True)
            for name in sorted(os.listdir(src))[:n]:
                shutil.copy(os.path.join(src, name), dst / name)
    return str(root)


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _check(p, cmd):
    if p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return p


def train(workdir, data, *overrides, nproc=1, timeout=300):
    """A run through the launchers: ``single.sh`` for 1 process, ``multi_gpu.sh`` for more."""
    env = dict(_env(), WORKDIR=str(workdir), PYTHON=sys.executable, NPROC=str(nproc))
    launcher = "single.sh" if nproc == 1 else "multi_gpu.sh"
    cmd = [os.path.join(LAUNCHERS, launcher), TINY, f"--config.data.path={data}", *COMMON, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return _check(p, cmd)


def state(workdir, step=STEPS):
    path = os.path.join(workdir, "checkpoints", f"step_{step:08d}", "state.safetensors")
    return safetensors.torch.load_file(path)


def assert_close_states(a, b, rel=1e-5, prefixes=("params.", "opt.")):
    """Per tensor, ||a - b|| <= rel * ||a|| (float rounding differs with the reduction order)."""
    keys = [k for k in a if k.startswith(prefixes)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefixes)}
    for k in keys:
        x, y = a[k].double(), b[k].double()
        err = (x - y).norm().item()
        assert err <= rel * max(x.norm().item(), 1e-12), (k, err, x.norm().item())


def metric_rows(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def losses(workdir):
    return [r["train/loss"] for r in metric_rows(workdir) if "train/loss" in r]


def opt_bytes(stderr):
    """{rank: bytes} from the ``rank R: optimizer state N bytes`` lines every rank logs."""
    return {int(r): int(n) for r, n in re.findall(r"rank (\d+): optimizer state (\d+) bytes", stderr)}


def resume_from(src_workdir, dst_workdir, step=2):
    """A fresh workdir holding only ``src``'s checkpoint of ``step``."""
    ck = os.path.join(dst_workdir, "checkpoints")
    os.makedirs(ck)
    name = f"step_{step:08d}"
    shutil.copytree(os.path.join(src_workdir, "checkpoints", name), os.path.join(ck, name))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data):
    wd = tmp_path_factory.mktemp("one_rank")
    p = train(wd, data)
    return wd, p


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, data):
    wd = tmp_path_factory.mktemp("two_ranks")
    p = train(wd, data, nproc=2)
    return wd, p


def test_two_ranks_train_like_one(one_rank, two_ranks):
    """Same global batch and seed: the same parameters and optimizer state, whether 1 or 2
    processes ran (the tiny ViT has no dropout, drop-path, mixup or BatchNorm, whose
    draws are per rank)."""
    (w1, _), (w2, _) = one_rank, two_ranks
    assert_close_states(state(w1), state(w2))
    for a, b in zip(losses(w1), losses(w2)):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_only_rank0_writes_and_eval_counts_every_image_once(two_ranks):
    wd, p = two_ranks
    rows = metric_rows(wd)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, STEPS + 1))  # one writer: no row twice
    evals = [r for r in rows if "eval/count" in r]
    assert len(evals) == 1 and evals[0]["eval/count"] == 7  # 4 + 3 images, none doubled
    assert len(os.listdir(os.path.join(wd, "tb"))) == 1
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["step_00000002", "step_00000004"]
    assert p.stdout.count("summary:") == 1 and p.stdout.count(f"step {STEPS}/{STEPS}") == 1
    # Both ranks ran (each logs its optimizer state) though only one wrote.
    assert set(opt_bytes(p.stderr)) == {0, 1}


def test_resume_with_another_number_of_ranks(tmp_path, data, one_rank, two_ranks):
    """The data position is the global step and checkpoints hold the whole state, so a
    2-rank checkpoint resumes on 1 rank, and a 1-rank checkpoint on 2 ranks."""
    (w1, _), (w2, _) = one_rank, two_ranks
    down, up = tmp_path / "2to1", tmp_path / "1to2"
    resume_from(w2, down)
    p = train(down, data)
    assert "resumed from" in p.stderr
    resume_from(w1, up)
    p = train(up, data, nproc=2)
    assert "resumed from" in p.stderr
    assert_close_states(state(w1), state(down))
    assert_close_states(state(w1), state(up))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_c10d_rendezvous(tmp_path, data, one_rank):
    """Two torchrun agents (``launchers/multi_node.sh``), one process each, as 2 nodes that
    meet through the c10d rendezvous; they share the workdir as nodes share a file system."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = dict(_env(), NNODES="2", NODE_RANK=str(node), NPROC="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RDZV_ID="mim-test", WORKDIR=str(tmp_path), PYTHON=sys.executable)
        cmd = [os.path.join(LAUNCHERS, "multi_node.sh"), TINY, f"--config.data.path={data}", *COMMON]
        procs.append((cmd, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env)))
    outs = []
    for cmd, proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            raise
        rc = proc.returncode
        # torchrun's known teardown race: the agent hosting the c10d store may exit while
        # the other agent still closes the rendezvous, which then fails with a broken pipe
        # after its worker has finished. Only that failure is tolerated; training itself
        # is checked below (summary, metrics, parameters equal to the 1-process run).
        if rc != 0 and "failed to shutdown the rendezvous" in err and "RendezvousConnectionError" in err:
            rc = 0
        outs.append(_check(subprocess.CompletedProcess(cmd, rc, out, err), cmd))
    assert sum(o.stdout.count("summary:") for o in outs) == 1
    assert [r["step"] for r in metric_rows(tmp_path) if "train/loss" in r] == list(range(1, STEPS + 1))
    assert_close_states(state(one_rank[0]), state(tmp_path))


def test_npu_launchers_and_report(tmp_path, two_ranks):
    """The NPU scripts compose the right command (printed with DRY_RUN=1, as no NPU is
    here), and the report gives images/s per device and in total from a run's metrics."""
    env = dict(_env(), DRY_RUN="1", PYTHON=sys.executable, WORKDIR=str(tmp_path / "w"),
               ASCEND_SET_ENV="/nonexistent")
    for script, want in (("train_performance_1p.sh", ["mim.main", "--config.steps=200"]),
                         ("train_performance_8p.sh", ["--nproc_per_node=8", "--config.steps=200"]),
                         ("train_full_1p.sh", ["mim.main"]),
                         ("train_full_8p.sh", ["--standalone", "--nproc_per_node=8"])):
        p = subprocess.run([os.path.join(LAUNCHERS, "npu", script), TINY, "--config.batch_size=64"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        line = [x for x in p.stderr.splitlines() if x.startswith("+ ")][-1]
        for w in want + ["--config.device=npu", f"--config={TINY}", "--config.batch_size=64"]:
            assert w in line, (script, w, line)
        assert ("--config.steps=" in line) == ("performance" in script)
        # the user's overrides come last, so they win over the script's
        assert line.index("--config.device=npu") < line.index("--config.batch_size=64")
    wd = two_ranks[0]
    p = subprocess.run([sys.executable, os.path.join(LAUNCHERS, "report.py"), f"--workdir={wd}",
                        "--devices=2", "--mode=full"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "images/s per device" in p.stdout and "images/s on 2 device(s)" in p.stdout
    assert "count 7" in p.stdout
    rep = json.load(open(os.path.join(wd, "report_full.json")))
    assert abs(rep["img_s_total"] - 2 * rep["img_s_per_device"]) < 1e-9


def test_batch_that_does_not_split_over_ranks_is_a_config_error(data):
    import importlib.util
    from mim import config as config_lib
    spec = importlib.util.spec_from_file_location("vit_b32", TINY.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.path = data
    c.batch_size = 30
    with pytest.raises(config_lib.ConfigError, match=r"config.batch_size: 30 does not split into "
                                                     r"4 rank\(s\) x 1 accumulation step\(s\)"):
        config_lib.validate(c, world_size=4)
    c.batch_size, c.grad_accum = 32, 3
    with pytest.raises(config_lib.ConfigError, match=r"2 rank\(s\) x 3 accumulation"):
        config_lib.validate(c, world_size=2)
    c.grad_accum = 1
    config_lib.validate(c, world_size=8)  # 4 images per rank
    c.sharding = "zero3"
    with pytest.raises(config_lib.ConfigError, match="config.sharding"):
        config_lib.validate(c, world_size=2)


def _batch_norm_worker(rank, world, port, out_dir):
    """Synchronised BatchNorm on each rank's half of a batch against plain BatchNorm on
    the whole batch: outputs, running statistics and torch.func gradients (averaged over
    ranks, as the train step does)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    from mim.nn import batch_norm as bn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g) * 3 + 1
    w_out = torch.randn(6, 3, generator=g)
    p, s = bn.init(6)
    p = {"weight": torch.rand(6, generator=g) + 0.5, "bias": torch.randn(6, generator=g),
         "w_in": torch.randn(6, 6, generator=g)}  # before the norm: its gradient flows through the statistics
    local = x.chunk(world)[rank]

    def loss(p, xs, sync):
        y, new = bn.batch_norm(p, s, xs @ p["w_in"], train=True, sync=sync)
        return (y @ w_out).square().sum(-1).mean(), (y, new)

    grads, (y, new) = torch.func.grad(loss, has_aux=True)(p, local, True)
    for k in grads:  # the train step's mean over ranks
        torch.distributed.all_reduce(grads[k])
        grads[k] /= world
    ref_grads, (ref_y, ref_new) = torch.func.grad(loss, has_aux=True)(p, x, False)
    torch_bn = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        torch_bn.weight.copy_(p["weight"]), torch_bn.bias.copy_(p["bias"])
    torch_y = torch_bn.train()(x @ p["w_in"])
    result = {"y": (y, ref_y.chunk(world)[rank], torch_y.detach().chunk(world)[rank]),
              "running_var": (new["running_var"], ref_new["running_var"], torch_bn.running_var),
              "running_mean": (new["running_mean"], ref_new["running_mean"], torch_bn.running_mean)}
    result.update({f"grad_{k}": (grads[k], ref_grads[k]) for k in grads})
    torch.save(result, os.path.join(out_dir, f"bn{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_synchronised_batch_norm_equals_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_batch_norm_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        res = torch.load(tmp_path / f"bn{r}.pt")
        for name, values in res.items():
            for other in values[1:]:
                torch.testing.assert_close(values[0], other.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_sigterm_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, data):
    """torchrun passes a SIGTERM on to its workers; the ranks agree on the step to stop
    at (saving is collective), write one checkpoint and exit before torchrun's grace
    period ends."""
    import signal
    import time
    env = dict(_env(), WORKDIR=str(tmp_path), PYTHON=sys.executable, NPROC="2")
    cmd = [os.path.join(LAUNCHERS, "multi_gpu.sh"), TINY, f"--config.data.path={data}", *COMMON,
           "--config.steps=100000", "--config.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)  # the launcher exec'd torchrun: this is torchrun
            break
    t0 = time.time()
    out, _ = proc.communicate(timeout=120)
    log = "".join(lines) + out
    assert time.time() - t0 < 30, log[-3000:]  # before torchrun's 30 s grace period ran out
    stops = re.findall(r"stopped by signal \S+ after step (\d+)", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]
    steps = sorted(os.listdir(tmp_path / "checkpoints"))
    assert steps == [f"step_{int(stops[0]):08d}"], (steps, stops)


def _teardown_worker(rank, world, port, out_dir, sharded):
    """gloo's worker threads of the process (by name) before the group, with it, and after
    ``backend.teardown()``; ``sharded``: after an FSDP gather (DTensor, a DeviceMesh)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from mim import backend

    def gloo_threads():
        tasks = "/proc/self/task"
        return sum("gloo" in open(os.path.join(tasks, t, "comm")).read() for t in os.listdir(tasks))

    before = gloo_threads()
    backend.setup("cpu", "fp32", "off")
    total = torch.ones(())
    torch.distributed.all_reduce(total)
    if sharded:
        from mim.train import sharding
        be = backend.Backend("cpu", torch.device("cpu"), "fp32", False, rank, world)
        fsdp = sharding.create("fsdp", ["w"], be)
        w = fsdp.gather(fsdp.shard(torch.arange(6.0).view(2, 3)))
        assert torch.equal(w, torch.arange(6.0).view(2, 3))
        del fsdp, w
    during = gloo_threads()
    backend.teardown()
    after = gloo_threads()
    torch.save({"before": before, "during": during, "after": after, "total": total.item()},
               os.path.join(out_dir, f"teardown{rank}.pt"))


@pytest.mark.parametrize("sharded", [False, True], ids=["data_parallel", "fsdp"])
def test_teardown_joins_the_process_group_threads(tmp_path, sharded):
    """The gloo group's worker threads end in ``backend.teardown()``, while Python is
    whole: one left to finish a collective during interpreter shutdown aborts the process
    ("terminate called without an active exception"). Under FSDP, DTensor's lazy import
    of ``torch.distributed.nn.functional`` would bind the group into function defaults
    and keep the threads alive, unless imported before the group exists (backend.setup)."""
    import torch.multiprocessing as mp
    mp.spawn(_teardown_worker, args=(2, _free_port(), str(tmp_path), sharded), nprocs=2, join=True)
    for r in (0, 1):
        t = torch.load(tmp_path / f"teardown{r}.pt")
        assert t["total"] == 2.0
        assert t["before"] == 0 and t["during"] > 0 and t["after"] == 0, t
