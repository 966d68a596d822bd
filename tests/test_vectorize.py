"""mim.train.members / mim.sweep --vectorize: K members trained as one vmapped run equal K
separate runs, a vectorized run resumes bitwise, and what cannot be vectorized is refused
in one line naming the field.

Separate runs are made here, every time, with the ordinary train step or training loop;
nothing is compared with saved outputs. Drop path is off where members are compared with
separate runs (a vmapped step draws each member's drop-path masks from one generator,
not its separate run's; the input pipeline's draws are the member's own)."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import ROOT, experiment, no_drop_path
from mim import bench, optim, tree
from mim.checkpoints import io as ckpt
from mim.train import ema as ema_lib
from mim.train import loop
from mim.train import members as members_lib
from mim import sweep_vectorized
from mim.train.setup import Setup

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 5, 8
LRS = (1e-3, 2e-3, 5e-4)


def member_config(name, seed, lr, data=None, drop_path=False, **overrides):
    run = {} if data is None else {"data.path": data, "data.num_workers": 0, "eval_batch_size": 20,
                                   "log_every": 1, "eval_every": STEPS, "checkpoint_every": STEPS}
    c = experiment(name, "tiny", **{"seed": seed, "steps": STEPS, "batch_size": BATCH, **run,
                                    **overrides})
    if not drop_path:
        no_drop_path(c)
    c.optim["lr" if c.optim.lr > 0 else "base_lr"] = lr
    if c.task == "moby_pretrain":
        c.model.contrast_num_negative = 4 * BATCH
    if "recon" in c:
        c.recon.every = 0
    return c


def close(a, b, name):
    assert a.shape == b.shape, name
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=2e-5, msg=name)


SCALARS = [{"optim.weight_decay": 0.05, "optim.layer_decay": 0.75},
           {"optim.weight_decay": 0.1, "optim.layer_decay": 0.65, "optim.weight_decay_end": 0.3},
           {"optim.weight_decay": 0.02, "optim.layer_decay": 0.8, "optim.warmup_steps": 1,
            "optim.warmup_init_lr": 1e-5}]


@pytest.mark.parametrize("name,scalars", [("mae_base", None), ("moby_swin_tiny", None),
                                          ("vit_b32", SCALARS)], ids=["mae", "moby", "vit_wd_ld"])
def test_members_equal_separate_steps(name, scalars):
    """Three members (own seeds: own initial weights, batches and masks; own lr, and for
    ViT own weight decay, weight-decay schedule, layer decay and warm-up) after five
    vmapped steps: every tensor of the state (params, AdamW moments, MoBY's momentum
    encoder, queues and BatchNorm statistics) and every metric equal each separate run's."""
    configs = [member_config(name, seed, lr, **(scalars[k] if scalars else {}))
               for k, (seed, lr) in enumerate(zip((0, 1, 2), LRS))]
    _equal_separate_steps(configs, {"seed", "optim." + ("lr" if configs[0].optim.lr > 0 else "base_lr")})


@pytest.mark.parametrize("name,field,values,extra", [
    ("vit_b32", "data.label_smoothing", (0.0, 0.1, 0.3), {}),
    ("vit_b32", "ema.decay", (0.9, 0.5, 0.99), {}),
    ("vit_b32", "ema.decay", (0.3, 0.5, 0.9), {"ema.warmup": True}),
    # SGD at a large lr, no warm-up: the online encoder moves away from the momentum
    # encoder within five steps, so each member's momentum shows (AdamW's normalised steps
    # would turn the members' fp32 rounding differences into lr-sized ones)
    ("moby_swin_tiny", "model.contrast_momentum", (0.99, 0.6, 0.2),
     {"optim.name": "sgd", "optim.warmup_steps": 0, "lr": 1.0}),
], ids=["label_smoothing", "ema_decay", "ema_decay_warmup", "moby_momentum"])
def test_members_differing_in_a_step_scalar_equal_separate_steps(name, field, values, extra):
    """Three members whose label smoothing (the loss), EMA decay (the average, with and
    without timm's warm-up) or MoBY momentum (the momentum encoder's schedule) differ:
    after five vmapped steps, every state tensor and metric equals each separate run's."""
    extra = dict(extra)
    lr = extra.pop("lr", LRS[0])
    configs = [member_config(name, seed, lr, **{field: v, **extra})
               for seed, v in zip((0, 1, 2), values)]
    _equal_separate_steps(configs, {"seed", field})


def _equal_separate_steps(configs, fields):
    mem = members_lib.build(configs, ["unused"] * 3, STEPS, STEPS)
    assert fields <= set(mem.differing)
    task = mem.setups[0].task
    batches = [[bench.synthetic_batch(c, task, BATCH, "cpu", seed=100 * k + i) for i in range(STEPS)]
               for k, c in enumerate(configs)]
    state = mem.state
    for i in range(STEPS):
        state, metrics = mem.train_step(state, members_lib.stack_batches([b[i] for b in batches]))
    for k, c in enumerate(configs):
        built = Setup(c, "unused").build_train(STEPS, STEPS)
        alone = built.state
        for i in range(STEPS):
            alone, m = built.fns.train_step(alone, batches[k][i])
        got = tree.flatten(members_lib.member(state, k))
        for n, t in tree.flatten(alone).items():
            close(got[n], t, f"member {k} {n}")
        assert set(m) <= set(metrics)      # "weight_decay" only where a member schedules it
        for n in m:
            close(metrics[n][k], m[n], f"member {k} metric {n}")


def _last_state(workdir):
    return ckpt.load_tensors(ckpt.latest(os.path.join(workdir, "checkpoints"))[0])


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_vectorized_run_equals_separate_runs(tmp_path, small_data):
    """vit_b32:tiny through the runner and the real input pipeline: each member's
    checkpoint, metric log (every step) and evaluation equal its separate mim.train run."""
    configs = [member_config("vit_b32", seed, lr, data=small_data) for seed, lr in zip((0, 1, 2), LRS)]
    vec = [str(tmp_path / f"vec{k}") for k in range(3)]
    summaries = sweep_vectorized.train(configs, vec)
    for k, c in enumerate(configs):
        alone = str(tmp_path / f"alone{k}")
        want = loop.train(c, alone)
        got_state, want_state = _last_state(vec[k]), _last_state(alone)
        assert set(got_state) == set(want_state)
        for n in want_state:
            close(got_state[n], want_state[n], f"member {k} {n}")
        rows, want_rows = _rows(vec[k]), _rows(alone)
        assert [sorted(r) for r in rows] == [sorted(r) for r in want_rows]
        for r, w in zip(rows, want_rows):
            for key in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/acc1"):
                if key in w:
                    assert r[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (k, key)
        assert summaries[k]["status"] == want["status"] == "finished"
        assert summaries[k]["eval_acc1"] == pytest.approx(want["eval_acc1"], abs=1e-6)
        for f in ("config.json", "classes.json", "summary.json", "curves.png"):
            assert os.path.exists(os.path.join(vec[k], f)), f


def test_vectorized_resume_is_bitwise(tmp_path, small_data, capsys):
    """Killed after its step-2 checkpoint and started again, a vectorized run (drop path
    on: vmapped randomness) ends bitwise equal to the uninterrupted one."""
    configs = [member_config("vit_b32", seed, lr, data=small_data, drop_path=True, steps=4,
                             checkpoint_every=2, eval_every=4, keep_checkpoints=5,
                             **{"model.drop_path_rate": 0.1})
               for seed, lr in zip((3, 4), LRS)]
    whole = [str(tmp_path / f"whole{k}") for k in range(2)]
    again = [str(tmp_path / f"again{k}") for k in range(2)]
    sweep_vectorized.train(configs, whole)
    sweep_vectorized.train(configs, again)
    for w in again:  # the kill: the last checkpoint and the summary never written
        shutil.rmtree(os.path.join(w, "checkpoints", "step_00000004"))
        os.remove(os.path.join(w, "summary.json"))
    assert sweep_vectorized.common_checkpoint([os.path.join(w, "checkpoints") for w in again]) == 2
    capsys.readouterr()
    sweep_vectorized.train(configs, again)
    assert "resuming at step 2" in capsys.readouterr().out
    for a, b in zip(whole, again):
        sa, sb = _last_state(a), _last_state(b)
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
        drop = ("time", "train/img_s_per_device", "train/data_wait_s")
        assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(a)] == \
               [{k: v for k, v in r.items() if k not in drop} for r in _rows(b)]
    # started again, a finished vectorized run changes nothing
    assert [s["status"] for s in sweep_vectorized.train(configs, whole)] == ["finished"] * 2


def test_shape_changing_and_non_scalar_fields_are_refused():
    base = [member_config("vit_b32", s, 1e-3) for s in (0, 1)]
    deeper = member_config("vit_b32", 1, 1e-3)
    deeper.model.depth = base[0].model.depth + 1
    with pytest.raises(members_lib.MemberError, match=r"differ in model\.depth"):
        members_lib.check([base[0], deeper])
    other = member_config("vit_b32", 1, 1e-3)
    other.optim.clip_grad = 0.5
    with pytest.raises(members_lib.MemberError, match=r"optim\.clip_grad"):
        members_lib.check([base[0], other])
    bf16 = [member_config("vit_b32", s, 1e-3, precision="amp_bf16") for s in (0, 1)]
    with pytest.raises(members_lib.MemberError, match="config.precision"):
        members_lib.check(bf16)
    with pytest.raises(members_lib.MemberError, match="WORLD_SIZE=2"):
        members_lib.check(base, world_size=2)
    ema = [member_config("vit_b32", s, 1e-3, **{"ema.decay": d}) for s, d in ((0, 0.0), (1, 0.9))]
    with pytest.raises(members_lib.MemberError, match=r"ema\.decay .*ema\.decay > 0"):
        members_lib.check(ema)
    assert members_lib.check(base) == ["seed"]


def test_per_tensor_foreach_gives_the_foreach_numbers():
    """The loops that stand in for torch._foreach_* under vmap: bitwise the same updates
    (AdamW, SGD with Nesterov and weight decay, LARS), norms, clipping and EMA."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"w": (6, 5), "b": (6,), "v": (3, 4, 2)}
    groups = [optim.Group(["w", "v"], 1.0, 0.05), optim.Group(["b"], 0.5, 0.0)]
    params = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    lr = torch.tensor(0.01)
    for opt in (optim.AdamW(), optim.SGD(0.9, nesterov=True), optim.LARS()):
        results = []
        for per_tensor in (False, True):
            p = tree.clone(params)
            state = opt.init(p)
            ema = ema_lib.init(p)
            with members_lib.per_tensor_foreach() if per_tensor else _nothing():
                for g in grads:
                    g, norm = optim.clip_by_global_norm(list(g.values()), 1.0)
                    opt.update(p, dict(zip(shapes, g)), state, lr, groups)
                    ema_lib.update_(ema, p, torch.tensor(3), 0.9, True)
            results.append((p, state, ema, norm))
        a, b = (tree.flatten(dict(zip("psen", r))) for r in results)
        assert all(torch.equal(a[n], b[n]) for n in a), type(opt).__name__


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_every_foreach_op_mim_calls_has_a_per_tensor_stand_in():
    used = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "mim")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f)) as fh:
                    used |= set(re.findall(r"torch\.(_foreach_\w+)", fh.read()))
    assert used <= set(members_lib.FOREACH), sorted(used - set(members_lib.FOREACH))


SWEEP_EXPERIMENT = '''
import importlib.util
def _load(name):
    spec = importlib.util.spec_from_file_location(name, {root!r} + "/experiments/" + name + ".py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m

def get_config(arg=None):
    c = _load("vit_b32").get_config("tiny")
    c.data.path, c.data.num_workers = {data!r}, 0
    c.steps, c.batch_size, c.eval_batch_size = 3, 8, 20
    c.log_every, c.eval_every, c.checkpoint_every = 1, 3, 3
    return c

def get_sweeps(arg=None):
    return {{"lr": [{{"optim.lr": 1e-3}}, {{"optim.lr": 2e-3}}],
             "depth": [{{"model.depth": 2}}, {{"model.depth": 3}}]}}
'''


def test_sweep_vectorize_runs_seeds_and_points_as_one_run(tmp_path, small_data):
    from mim import sweep
    spec = tmp_path / "exp.py"
    spec.write_text(SWEEP_EXPERIMENT.format(root=ROOT, data=small_data))
    base = sweep.load_config(str(spec))
    work = str(tmp_path / "sweep")
    with pytest.raises(members_lib.MemberError, match=r"differ in model\.depth"):
        sweep.run(base, str(spec), "depth", work, seeds=2, vectorize=True)
    assert not os.path.exists(work)      # refused before any training
    rows = sweep.run(base, str(spec), "lr", work, seeds=2, vectorize=True)
    assert [r["status"] for r in rows] == ["2/2 done", "2/2 done"]
    seeds = set()
    for point in ("lr=0.001", "lr=0.002"):
        for k in range(2):
            d = os.path.join(work, point, f"seed={k}")
            with open(os.path.join(d, "summary.json")) as f:
                assert json.load(f)["vectorized_members"] == 4
            with open(os.path.join(d, "config.json")) as f:
                seeds.add((point, json.load(f)["seed"]))
    assert len(seeds) == 4
