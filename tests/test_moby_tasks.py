"""The MoBY recipe in the train loop: both experiment files' :tiny run; a run killed at a
random step and resumed ends bitwise equal to an uninterrupted one (parameters, momentum
branch, queues, pointer, BatchNorm statistics, optimizer state); 1 and 2 gloo processes
train to the same state (keys of both ranks in the queues, BatchNorm statistics of the
global batch); configuration errors name their field."""
import os
import random
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import BUNDLED, ROOT, experiment
from mim import tree
from mim.checkpoints import io
from mim.checkpoints import moby as moby_ckpt
from mim.config import ConfigError
from mim.models import moby
from mim.tasks import moby_pretrain
from mim.train import loop

# A smaller model than :tiny's, for the loop tests.
SMALL = {"model.encoder.embed_dim": 32, "model.mlp_hidden_dim": 64, "model.mlp_out_dim": 32,
         "model.contrast_num_negative": 64}


def pretrain_config(data, **kw):
    over = {"data.path": data, "steps": 2, "batch_size": 16, "eval_batch_size": 20,
            "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "knn_every": 2,
            "data.num_workers": 0, **SMALL}
    over.update(kw)
    return experiment("moby_swin_tiny", "tiny", **over)


def test_tiny_pretrains_then_evaluates_linearly(small_data, tmp_path, one_thread):
    c = pretrain_config(small_data)
    s = loop.train(c, str(tmp_path / "pre"))
    assert torch.isfinite(torch.tensor(s["final_loss"])) and s["eval_count"] == 20
    assert "eval_knn_acc1" in s and "eval_positive_cosine" in s
    saved = io.load_tensors(io.latest(str(tmp_path / "pre" / "checkpoints"))[0])
    assert int(saved["model_state.queue_ptr"]) == 32            # 2 steps of 16 keys
    assert int(saved["model_state.projector.linear_hidden.2.num_batches_tracked"]) == 4
    assert int(saved["model_state.projector_k.linear_hidden.2.num_batches_tracked"]) == 4
    # the online encoder moved, and the momentum encoder moved towards it by (1 - m(1))
    w = "encoder.layers.0.blocks.0.mlp.fc1.weight"
    assert not torch.equal(saved["params." + w], saved["model_state." + w.replace("encoder", "encoder_k", 1)])

    lin = experiment("moby_swin_tiny_linear", "tiny", **{
        "data.path": small_data, "steps": 2, "batch_size": 16, "eval_batch_size": 20,
        "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "data.num_workers": 0,
        "init.checkpoint": str(tmp_path / "pre"), "model.embed_dim": 32})
    s = loop.train(lin, str(tmp_path / "lin"))
    assert s["eval_count"] == 20 and "eval_acc1" in s
    lsaved = io.load_tensors(io.latest(str(tmp_path / "lin" / "checkpoints"))[0])
    enc = {k[len("params.encoder."):]: v for k, v in saved.items() if k.startswith("params.encoder.")}
    for k, v in enc.items():        # frozen: the pretrained online encoder, unchanged
        assert torch.equal(lsaved["params." + k], v), k
    assert not any(k.startswith(("params.encoder_k", "params.projector")) for k in lsaved)


class _Crash(RuntimeError):
    pass


def test_resume_after_a_kill_is_bitwise(monkeypatch, small_data, tmp_path, one_thread):
    """Online drop path 0.2 on, AdamW, clipping: everything of the state equal bitwise."""
    c = pretrain_config(small_data, steps=5, eval_every=1000, knn_every=0, checkpoint_every=2,
                        deterministic=True)
    loop.train(c, str(tmp_path / "straight"))
    kill_at = random.randint(1, 4)

    class Killer:
        def due(self, step):
            return step == kill_at

        def after_step(self, step, params, batch, metrics):
            raise _Crash(step)   # dies like kill -9: no checkpoint at this step

    monkeypatch.setattr(moby_pretrain, "hooks", lambda setup, writer: Killer(), raising=False)
    with pytest.raises(_Crash):
        loop.train(c, str(tmp_path / "killed"))
    monkeypatch.delattr(moby_pretrain, "hooks")
    loop.train(c, str(tmp_path / "killed"))
    a = io.load_tensors(io.latest(str(tmp_path / "straight" / "checkpoints"))[0])
    b = io.load_tensors(io.latest(str(tmp_path / "killed" / "checkpoints"))[0])
    assert set(a) == set(b)
    for part in ("model_state.encoder_k.", "model_state.projector_k.", "model_state.queue1",
                 "model_state.queue_ptr", "model_state.predictor.", "opt."):
        assert any(k.startswith(part) for k in a), part
    for k in a:
        assert torch.equal(a[k], b[k]), (kill_at, k)
    assert int(a["model_state.queue_ptr"]) == (5 * 16) % 64


# ---------------------------------------------------------------------------- two ranks

CLASSES = ("airplane", "cat", "ship")
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("moby_folder")
    for cls in CLASSES:
        for split, n in (("train", 16), ("val", 2)):
            src = os.path.join(BUNDLED, split, cls)
            (root / split / cls).mkdir(parents=True)
            for name in sorted(os.listdir(src))[:n]:
                shutil.copy(os.path.join(src, name), root / split / cls / name)
    return str(root)


def launch(workdir, data, nproc):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", WORKDIR=str(workdir),
               PYTHON=sys.executable, NPROC=str(nproc))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = "single.sh" if nproc == 1 else "multi_gpu.sh"
    over = [f"--config.{k}={v}" for k, v in SMALL.items()]
    cmd = [os.path.join(ROOT, "launchers", launcher),
           os.path.join(ROOT, "experiments", "moby_swin_tiny.py") + ":tiny",
           f"--config.data.path={data}", "--config.data.num_workers=0", "--config.batch_size=16",
           "--config.eval_batch_size=6", f"--config.steps={STEPS}", "--config.log_every=1",
           f"--config.checkpoint_every={STEPS}", "--config.eval_every=1000", "--config.knn_every=0",
           # drop path draws are per rank; SGD keeps the rounding of another reduction order
           # at rounding level (AdamW divides by the gradient's own size)
           "--config.model.encoder.drop_path_rate=0.0", "--config.optim.name=sgd",
           "--config.optim.base_lr=0.1", *over]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    path = os.path.join(workdir, "checkpoints", f"step_{STEPS:08d}", "state.safetensors")
    return safetensors.torch.load_file(path)


def test_two_ranks_train_like_one(folder, tmp_path):
    one = launch(tmp_path / "one", folder, 1)
    two = launch(tmp_path / "two", folder, 2)
    assert set(one) == set(two)
    bad = []
    for k in one:
        if k.startswith(("params.", "model_state.", "opt.")):
            x, y = one[k].double(), two[k].double()
            err = (x - y).norm().item()
            # relative 1e-5, plus 1e-6 absolute: the biases feeding a BatchNorm (and the
            # encoder's final norm bias) have a zero gradient (BN removes shifts), so their
            # gradients and momentum buffers are rounding noise of ~1e-7
            if err > 1e-5 * x.norm().item() + 1e-6:
                bad.append((k, err, x.norm().item()))
    assert not bad, bad
    # every rank's keys are in the queue, in rank order: the same columns as one rank's
    assert int(one["model_state.queue_ptr"]) == int(two["model_state.queue_ptr"]) == 48
    assert torch.equal(one["model_state.predictor.linear_hidden.2.num_batches_tracked"],
                       two["model_state.predictor.linear_hidden.2.num_batches_tracked"])


# ---------------------------------------------------------------------------- config


def test_queue_that_global_batches_do_not_fill_is_a_config_error(small_data):
    c = pretrain_config(small_data, batch_size=24)
    with pytest.raises(ConfigError, match=r"contrast_num_negative: 64 is not a multiple of the 24"):
        moby_pretrain.init(c, torch.Generator().manual_seed(0))
    c = pretrain_config(small_data, batch_size=32, grad_accum=4)   # 8 keys per micro-batch: fine
    moby_pretrain.init(c, torch.Generator().manual_seed(0))
    c = pretrain_config(small_data)
    c.model.encoder.img_size = 64
    with pytest.raises(ConfigError, match="model.encoder.img_size"):
        moby_pretrain.init(c, torch.Generator().manual_seed(0))


def test_start_from_a_reference_checkpoint(small_data, tmp_path):
    """``init.format='moby'``: parameters (the loop's loader) and the momentum branch,
    queues, pointer and statistics (the task's init) all come from the file."""
    c = pretrain_config(small_data)
    params, state = moby.init(torch.Generator().manual_seed(5), c.model)
    state["queue_ptr"] = torch.tensor([16])
    state["encoder_k"] = tree.map(lambda t: t + 1.0, state["encoder_k"])
    path = tmp_path / "moby.pth"
    torch.save({"model": moby_ckpt.export_official(params, state, c.model)}, path)
    c.init.checkpoint, c.init.format = str(path), "moby"
    fresh, got_state = moby_pretrain.init(c, torch.Generator().manual_seed(0))
    got = moby_ckpt.load_for_finetune(fresh, str(path), c.model)
    for a, b in zip(tree.leaves(got) + tree.leaves(got_state), tree.leaves(params) + tree.leaves(state)):
        assert torch.equal(a, b)
