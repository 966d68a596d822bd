"""The task protocol: frozen networks as inputs to the loss, state updated once per
optimizer step, several views per image, one place that casts inputs."""
import json
import math
import random
import types

import pytest
import safetensors.torch
import torch

import toy_tasks
from mim import backend as backend_lib
from mim import config as config_lib
from mim import optim, schedules, tasks, tree
from mim.checkpoints import io
from mim.train import frozen as frozen_lib
from mim.train import loop
from mim.train import step as step_lib

CPU = backend_lib.Backend("cpu", torch.device("cpu"), "fp32", False)


def register(monkeypatch, name, cls):
    module = types.ModuleType(name)
    for k, v in vars(cls).items():
        if not k.startswith("__"):
            setattr(module, k, v.__func__ if isinstance(v, staticmethod) else v)
    monkeypatch.setitem(__import__("sys").modules, f"toy_{name}", module)
    monkeypatch.setitem(tasks.TASKS, name, f"toy_{name}")
    return module


def toy_config(data, task, **kw):
    c = config_lib.base()
    c.task = task
    c.data.path = data
    c.data.image_size = toy_tasks.SIZE
    c.data.crop_pct = 1.0
    c.data.num_workers = 0
    c.batch_size = 8
    c.eval_batch_size = 20
    c.steps = 6
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 1000
    c.optim.name = "sgd"
    c.optim.lr = 0.02
    c.deterministic = True
    with c.unlocked():
        c.teacher_weights = ""
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def write_teacher(path, seed):
    net = toy_tasks.conv_init(torch.Generator().manual_seed(seed))
    safetensors.torch.save_file(tree.flatten(net), str(path))
    return net


def test_frozen_network_is_an_input_never_trained_or_saved(monkeypatch, small_data, tmp_path):
    register(monkeypatch, "toy_frozen", toy_tasks.FrozenTask)
    teacher = write_teacher(tmp_path / "teacher.safetensors", 1)
    c = toy_config(small_data, "toy_frozen", teacher_weights=str(tmp_path / "teacher.safetensors"))
    setup = loop.Setup(c, str(tmp_path / "run"))
    built = setup.build_train(6, 6)
    names = set(tree.flatten(built.state))
    assert not any("conv" in n for n in names), names          # not in params, opt or model state
    loop.train(c, str(tmp_path / "run"))
    path, meta = io.latest(str(tmp_path / "run" / "checkpoints"))
    saved = io.load_tensors(path)
    assert not any("conv" in k for k in saved)
    digest = frozen_lib.sha256(str(tmp_path / "teacher.safetensors"))
    assert meta["frozen_networks"] == {"teacher": {"weights": str(tmp_path / "teacher.safetensors"),
                                                   "sha256": digest}}
    # The frozen weights are what the file holds, unchanged by training...
    for k, v in tree.flatten(teacher).items():
        assert torch.equal(tree.flatten(setup.frozen["teacher"])[k], v)
        assert not tree.flatten(setup.frozen["teacher"])[k].requires_grad
    # ... and the head learnt from them (the loss fell).
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    # Resuming with another file is an error naming the network.
    write_teacher(tmp_path / "other.safetensors", 2)
    c2 = toy_config(small_data, "toy_frozen", teacher_weights=str(tmp_path / "other.safetensors"),
                    steps=8)
    with pytest.raises(frozen_lib.FrozenNetworkError, match="teacher"):
        loop.train(c2, str(tmp_path / "run"))
    # A missing file is named too.
    c3 = toy_config(small_data, "toy_frozen", teacher_weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(frozen_lib.FrozenNetworkError, match="missing.safetensors"):
        loop.train(c3, str(tmp_path / "run3"))


def test_frozen_network_stays_fp32_under_o2(monkeypatch, small_data, tmp_path):
    register(monkeypatch, "toy_frozen", toy_tasks.FrozenTask)
    c = toy_config(small_data, "toy_frozen", precision="bf16")
    setup = loop.Setup(c, str(tmp_path))
    assert setup.frozen["teacher"]["conv"]["weight"].dtype == torch.float32
    assert setup.frozen_record == {"teacher": {"random_init_seed": c.seed + 1000003}}
    built = setup.build_train(2, 2)
    assert tree.flatten(built.state["params"])["head.weight"].dtype == torch.bfloat16


# ---------------------------------------------------------------- once-per-step state


def _ema_by_hand(trajectory, init, total):
    """EMA over the parameters after each optimizer step k = 1..K, by hand."""
    ema = {k: v.clone().double() for k, v in init.items()}
    for k, params in enumerate(trajectory, 1):
        m = toy_tasks.momentum(k, total)
        ema = {n: m * ema[n] + (1 - m) * params[n].double() for n in ema}
    return ema


@pytest.mark.parametrize("grad_accum,compiled", [(1, False), (3, False), (3, True)])
def test_state_update_runs_once_per_optimizer_step(grad_accum, compiled):
    torch.manual_seed(0)
    be = backend_lib.Backend("cpu", torch.device("cpu"), "fp32", compiled)
    params, model_state = toy_tasks.EmaTask.init(None, torch.Generator().manual_seed(0))
    init = {k: v.clone() for k, v in tree.flatten(params).items()}
    names = list(init)
    groups = optim.make_groups({n: init[n].shape for n in names}, weight_decay=0.0)
    opt = optim.create("sgd", config_lib.base().optim)
    state = step_lib.create_state(params, model_state, opt, names, be)
    total = 6
    calls = []

    def after(p, s, k):
        calls.append(1)
        toy_tasks.EmaTask.update_state_after_step(p, s, k, total, None)

    fns = step_lib.build(lambda p, s, b, t: toy_tasks.EmaTask.loss(p, s, b, None, t, {}), opt, groups,
                         schedules.warmup_constant(0.3), be, grad_accum=grad_accum, after_step=after)
    trajectory = []
    for i in range(total):
        g = torch.Generator().manual_seed(i)
        batch = {"image": torch.randn(6, 3, toy_tasks.SIZE, toy_tasks.SIZE, generator=g),
                 "label": torch.randint(0, 4, (6,), generator=g)}
        state, _ = fns.train_step(state, batch)
        trajectory.append({k: v.clone() for k, v in tree.flatten(state["params"]).items()})
    if not compiled:
        assert len(calls) == total
    want = _ema_by_hand(trajectory, init, total)
    got = tree.flatten(state["model_state"])
    for n in names:
        torch.testing.assert_close(got[f"ema.{n}"].double(), want[n], rtol=1e-6, atol=1e-7)
    # the parameters moved, so the EMA is not trivially the initial value
    assert not torch.allclose(got["ema.head.weight"], init["head.weight"])


def test_state_update_before_step_sees_the_steps_done():
    be = CPU
    params = {"w": torch.zeros(3)}
    seen = []

    def before(p, s, k):
        seen.append(int(k))
        s["count"].add_(1)

    opt = optim.create("sgd", config_lib.base().optim)
    groups = optim.make_groups({"w": (3,)}, weight_decay=0.0)
    state = step_lib.create_state(params, {"count": torch.zeros((), dtype=torch.int64)}, opt, ["w"], be)
    fns = step_lib.build(lambda p, s, b, t: ((p["w"] * b["x"]).sum(), (s, {})), opt, groups,
                         schedules.warmup_constant(0.1), be, grad_accum=2, before_step=before)
    for _ in range(3):
        state, _ = fns.train_step(state, {"x": torch.ones(4, 3)})
    assert seen == [0, 1, 2] and int(state["model_state"]["count"]) == 3


class _Crash(RuntimeError):
    pass


def test_ema_state_resumes_bitwise_after_a_kill(monkeypatch, small_data, tmp_path):
    module = register(monkeypatch, "toy_ema", toy_tasks.EmaTask)
    c = toy_config(small_data, "toy_ema")
    loop.train(c, str(tmp_path / "straight"))
    kill_at = random.randint(1, 5)

    class Killer:
        def due(self, step):
            return step == kill_at

        def after_step(self, step, params, batch, metrics):
            raise _Crash(step)   # dies like kill -9: no checkpoint at this step

    monkeypatch.setattr(module, "hooks", lambda setup, writer: Killer(), raising=False)
    with pytest.raises(_Crash):
        loop.train(c, str(tmp_path / "killed"))
    monkeypatch.delattr(module, "hooks")
    loop.train(c, str(tmp_path / "killed"))
    a = io.load_tensors(io.latest(str(tmp_path / "straight" / "checkpoints"))[0])
    b = io.load_tensors(io.latest(str(tmp_path / "killed" / "checkpoints"))[0])
    assert set(a) == set(b) and any(k.startswith("model_state.ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), (kill_at, k)


# ---------------------------------------------------------------- inputs and views


def test_cast_inputs_casts_only_images_under_o2():
    batch = {"image": torch.randn(2, 3), "image2": torch.randn(2, 3), "noise": torch.rand(2, 5),
             "label": torch.tensor([1, 2])}
    o2 = backend_lib.Backend("cpu", torch.device("cpu"), "bf16", False)
    out = o2.cast_inputs(batch, ("image", "image2"))
    assert out["image"].dtype == out["image2"].dtype == torch.bfloat16
    assert out["noise"].dtype == torch.float32 and out["label"].dtype == torch.int64
    amp = backend_lib.Backend("cpu", torch.device("cpu"), "amp_bf16", False)
    assert amp.cast_inputs(batch, ("image",))["image"].dtype == torch.float32


def _first_batch(c, task_module):
    from mim.data import pipeline
    loader, _, _ = pipeline.train_loader(c, CPU, task_module, 0, 2)
    batch = next(iter(loader))
    return pipeline.to_device(batch, "cpu", c.data, views=tasks.image_keys(task_module, c))


def test_several_views_are_normalised_each_its_own_way(monkeypatch, small_data):
    module = register(monkeypatch, "toy_views", toy_tasks.ViewsTask)
    worker = _first_batch(toy_config(small_data, "toy_views"), module)
    device = _first_batch(toy_config(small_data, "toy_views", **{"data.device_normalize": True}), module)
    assert worker["image"].shape == (8, 3, 8, 8) and worker["small"].shape == (8, 3, 4, 4)
    for k in ("image", "small"):
        assert device[k].dtype == torch.float32
        torch.testing.assert_close(device[k], worker[k], rtol=0, atol=1e-5)
    # each key has its own statistics: the DALL-E map 0.8 x + 0.1 of [0, 1] pixels
    x = worker["small"]
    assert 0.1 - 1e-6 <= float(x.min()) and float(x.max()) <= 0.9 + 1e-6
    y = worker["image"]
    assert -2.0 - 1e-6 <= float(y.min()) and float(y.max()) <= 2.0 + 1e-6


def test_views_are_drawn_per_sample_and_view(monkeypatch, small_data):
    from mim.data import transforms as T
    from PIL import Image
    img = Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy())
    c = toy_config(small_data, "toy_views")
    both = T.MultiView({"image": toy_tasks.view_transform(c, 8, (0.2, 1.0)),
                        "small": toy_tasks.view_transform(c, 4, (0.2, 1.0))})
    alone = T.MultiView({"image": toy_tasks.view_transform(c, 8, (0.2, 1.0)),
                         "small": lambda im: None})

    def draw(mv, seed):
        torch.manual_seed(seed)
        return mv(img)

    a, b, other = draw(both, 5), draw(both, 5), draw(both, 6)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["small"], b["small"])
    assert not torch.equal(a["image"], other["image"])
    # a view's draws do not depend on what the other views drew
    assert torch.equal(draw(alone, 5)["image"], a["image"])


def test_own_views_refuse_device_decode(monkeypatch, small_data):
    from mim.config import ConfigError
    from mim.data import pipeline
    module = register(monkeypatch, "toy_views", toy_tasks.ViewsTask)
    c = toy_config(small_data, "toy_views", **{"data.device_normalize": True, "data.decode": "device"})
    with pytest.raises(ConfigError, match="config.data.decode"):
        pipeline.train_dataset(c, module)


def test_bench_batches_follow_the_task_views(monkeypatch, small_data):
    from mim import bench
    module = register(monkeypatch, "toy_views", toy_tasks.ViewsTask)
    b = bench.synthetic_batch(toy_config(small_data, "toy_views"), module, 4, "cpu")
    assert b["image"].shape == (4, 3, 8, 8) and b["small"].shape == (4, 3, 4, 4)


def test_views_task_trains(monkeypatch, small_data, tmp_path):
    register(monkeypatch, "toy_views", toy_tasks.ViewsTask)
    summary = loop.train(toy_config(small_data, "toy_views", steps=2, precision="bf16",
                                    **{"data.device_normalize": True}), str(tmp_path))
    assert math.isfinite(summary["final_loss"])
