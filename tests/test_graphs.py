"""``config.cuda_graphs`` (:mod:`mim.train.graphs`). On the CPU the CUDA graph is stood in
for by a capture that records nothing and re-runs the step at replay, writing into the
outputs the recording returned, as a graph's replay does; so warm-up, recording, static
batch buffers, output copies and the checks are exercised. Reference: the same step
without graphs. On CUDA the real graph is compared with the ungraphed step."""
import pytest
import torch
import torch.nn.functional as F

from mim import backend, config as config_lib, optim, schedules, tree
from mim.models import vit
from mim.train import graphs
from mim.train import step as step_lib

CFG = vit.config(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                 drop_path_rate=0.1)


def _loss(p, s, b, train):
    logits, _ = vit.apply(p, b["image"], CFG, train=train)
    return F.cross_entropy(logits.float(), b["label"]), (s, {"acc": (logits.argmax(-1) == b["label"]).float().mean()})


def _setup(device="cpu", compile_=False, **build):
    be = backend.setup(device, "fp32", "on" if compile_ else "off")
    params = vit.init(torch.Generator().manual_seed(0), CFG)
    names = list(tree.flatten(params))
    groups = optim.make_groups({n: tree.flatten(params)[n].shape for n in names}, weight_decay=0.05)
    opt = optim.AdamW(0.9, 0.95)
    state = step_lib.create_state(params, {}, opt, names, be)
    fns = step_lib.build(_loss, opt, groups, schedules.mae_cosine(1e-3, 20, 2), be, clip_grad=1.0, **build)
    return state, fns


def _batches(n, device="cpu", bs=8):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(bs, 3, 16, 16, generator=g).to(device),
             "label": torch.randint(0, 5, (bs,), generator=g).to(device)} for _ in range(n)]


def replaying_capture(fn):
    """A recording that runs ``fn`` once now (the first replay is that run) and again at
    every later replay, copying the results into the recorded outputs."""
    out = fn()
    pending = [True]

    def replay():
        if pending[0]:
            pending[0] = False
            return
        new = fn()
        for name, t in tree.flatten(out[1]).items():
            t.copy_(tree.flatten(new[1])[name])
    return replay, out


def _run(fns_step, state, batches, seed=0):
    losses, metrics = [], []
    for i, b in enumerate(batches):
        torch.manual_seed(seed + i)               # as the loop re-seeds every step
        state, m = fns_step(state, b)
        losses.append(m["loss"])
        metrics.append(m)
    return state, losses, metrics


@pytest.mark.parametrize("compile_", [False, True])
def test_graphed_step_is_the_step(compile_, one_thread):
    batches = _batches(6)
    s1, f1 = _setup(compile_=compile_)
    s2, f2 = _setup(compile_=compile_)
    graphed = graphs.GraphedStep(f2.train_step, warmup=2, capture=replaying_capture)
    s1, l1, _ = _run(f1.train_step, s1, batches)
    s2, l2, m2 = _run(graphed, s2, batches)
    assert graphed.replay is not None and graphed.calls == 6
    assert torch.equal(torch.stack(l1), torch.stack(l2))
    for k, v in tree.flatten(s1).items():
        assert torch.equal(v, tree.flatten(s2)[k]), k
    assert int(s2["step"]) == 6
    # the metrics of step 3 (the recording) and 4 were copied out: later replays left them alone
    assert not torch.equal(m2[2]["loss"], m2[3]["loss"]) and torch.equal(m2[2]["loss"], l1[2])


def test_a_changed_batch_or_state_is_refused():
    s, f = _setup()
    graphed = graphs.GraphedStep(f.train_step, warmup=1, capture=replaying_capture)
    b = _batches(3)
    s, _ = graphed(s, b[0])
    s, _ = graphed(s, b[1])                          # recorded
    with pytest.raises(ValueError, match="one shape: image is \\(4, 3, 16, 16\\)"):
        graphed(s, {"image": b[2]["image"][:4], "label": b[2]["label"][:4]})
    with pytest.raises(ValueError, match="batch keys"):
        graphed(s, {"image": b[2]["image"]})
    moved = dict(s, step=s["step"].clone())
    with pytest.raises(RuntimeError, match="not the one the graph was recorded with"):
        graphed(moved, b[2])


def test_a_step_that_returns_new_state_is_refused():
    def functional(state, batch):
        return {"w": state["w"] + batch["x"].sum()}, {"loss": state["w"].sum()}
    graphed = graphs.GraphedStep(functional, warmup=1, capture=replaying_capture)
    state = {"w": torch.zeros(3)}
    graphed(state, {"x": torch.ones(2)})
    with pytest.raises(RuntimeError, match=r"new tensors for \['w'\] instead of updating the state in place"):
        graphed(state, {"x": torch.ones(2)})


def test_where_graphs_cannot_run_is_named():
    with pytest.raises(ValueError, match="needs a CUDA device; this run is on cpu"):
        _setup(cuda_graphs=True)
    c = config_lib.base()
    c.data.path = "/data"
    c.optim.lr = 0.1
    for field, value, msg in (("device", "cpu", "needs a CUDA device"),
                              ("precision", "amp_fp16", "use bf16 or amp_bf16"),
                              ("sharding", "fsdp", "use none")):
        bad = c.copy_and_resolve_references()
        bad.cuda_graphs = True
        bad[field] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.cuda_graphs: .*{msg}"):
            config_lib.validate(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_graph_replays_the_step(compile_):
    batches = _batches(8, "cuda")
    s1, f1 = _setup("cuda", compile_)
    s2, f2 = _setup("cuda", compile_, cuda_graphs=True)
    assert isinstance(f2.train_step, graphs.GraphedStep)
    s1, l1, _ = _run(f1.train_step, s1, batches)
    s2, l2, _ = _run(f2.train_step, s2, batches)
    assert f2.train_step.replay is not None
    torch.testing.assert_close(torch.stack(l2), torch.stack(l1), rtol=1e-5, atol=1e-5)
    for k, v in tree.flatten(s1).items():
        torch.testing.assert_close(tree.flatten(s2)[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["vit_b32", "mae_base", "mae_base_linprobe", "simmim_vit_base",
                                  "simmim_swin_base"])
def test_the_step_never_waits_for_the_host(name):
    """What a graph needs, and what keeps the GPU queue full eagerly too: torch's sync
    debug mode raises on any device-to-host wait (``.item()``, a blocking copy)."""
    from conftest import experiment
    from mim import bench
    from mim.train import loop
    c = experiment(name, "tiny", **{"device": "cuda", "compile": "off", "batch_size": 8,
                                    "data.path": "<synthetic>"})
    setup = loop.Setup(c, workdir="")
    run = bench.build_mim(setup, 4)
    batch = bench.synthetic_batch(setup.config, setup.task, 8, setup.be.device)
    run.state, _ = run.train_step(run.state, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.state, m = run.train_step(run.state, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(m["loss"])
