"""The functional train step: against a hand-written torch.autograd + torch.optim step,
eager vs compiled, gradient accumulation, precision policies and loss scaling."""
import pytest
import torch
import torch.nn.functional as F

from mim import backend, optim, tree, schedules
from mim.models import vit
from mim.train import step as step_lib

CFG = vit.config(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _loss(p, s, b, train):
    logits, _ = vit.apply(p, b["image"], CFG, train=train)
    return F.cross_entropy(logits.float(), b["label"]), (s, {})


def _setup(precision="fp32", compile_=False, accum=1, clip=1.0, lr=1e-3):
    be = backend.setup("cpu", precision, "on" if compile_ else "off")
    params = vit.init(torch.Generator().manual_seed(0), CFG)
    names = list(tree.flatten(params))
    groups = optim.make_groups({n: tree.flatten(params)[n].shape for n in names}, weight_decay=0.05)
    opt = optim.AdamW(0.9, 0.95)
    state = step_lib.create_state(params, {}, opt, names, be)
    fns = step_lib.build(_loss, opt, groups, schedules.mae_cosine(lr, 20, 2), be, grad_accum=accum, clip_grad=clip)
    return state, fns, groups


def _batches(n, bs=8):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(bs, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (bs,), generator=g)}
            for _ in range(n)]


def test_step_matches_autograd_and_torch_optim():
    state, fns, groups = _setup()
    params0 = tree.flatten(vit.init(torch.Generator().manual_seed(0), CFG))
    ref = {k: v.clone().requires_grad_() for k, v in params0.items()}
    o = torch.optim.AdamW([{"params": [ref[n] for n in g.names], "weight_decay": g.weight_decay} for g in groups],
                          betas=(0.9, 0.95), lr=0.0)
    sched = schedules.mae_cosine(1e-3, 20, 2)
    for i, b in enumerate(_batches(5)):
        state, m = fns.train_step(state, b)
        for grp in o.param_groups:
            grp["lr"] = sched(torch.tensor(i)).item()
        o.zero_grad()
        ref_loss = F.cross_entropy(vit.apply(tree.unflatten(ref), b["image"], CFG, train=True)[0], b["label"])
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(list(ref.values()), 1.0)
        o.step()
        assert abs(m["loss"].item() - ref_loss.item()) < 1e-5
    flat = tree.flatten(state["params"])
    for k in ref:
        torch.testing.assert_close(flat[k], ref[k].detach(), rtol=1e-4, atol=1e-5)
    assert state["step"].item() == 5


def test_gradient_accumulation_equals_full_batch():
    s1, f1, _ = _setup(accum=1)
    s2, f2, _ = _setup(accum=4)
    for b in _batches(3):
        s1, m1 = f1.train_step(s1, b)
        s2, m2 = f2.train_step(s2, b)
        assert abs(m1["loss"].item() - m2["loss"].item()) < 1e-5
    a, c = tree.flatten(s1["params"]), tree.flatten(s2["params"])
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)


def test_compiled_step_equals_eager():
    s1, f1, _ = _setup()
    s2, f2, _ = _setup(compile_=True)
    for b in _batches(3):
        s1, m1 = f1.train_step(s1, b)
        s2, m2 = f2.train_step(s2, b)
        assert abs(m1["loss"].item() - m2["loss"].item()) < 1e-4
    a, c = tree.flatten(s1["params"]), tree.flatten(s2["params"])
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16"])
def test_low_precision_policies_train(precision):
    state, fns, _ = _setup(precision, lr=3e-3)
    flat = tree.flatten(state["params"])
    want_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert flat["blocks.0.attn.qkv.weight"].dtype == want_dtype
    if precision == "bf16":  # O2: an fp32 master copy owned by the optimizer
        assert state["master"]["blocks.0.attn.qkv.weight"].dtype == torch.float32
    b = _batches(1)[0]
    losses = []
    for _ in range(8):
        state, m = fns.train_step(state, b)
        losses.append(m["loss"].item())
    assert losses[-1] < losses[0]
    if precision == "bf16":
        torch.testing.assert_close(tree.flatten(state["params"])["head.weight"],
                                   state["master"]["head.weight"].to(torch.bfloat16))


def test_fp16_loss_scaling_skips_overflow_and_lowers_scale():
    state, fns, _ = _setup("amp_fp16")
    b = _batches(1)[0]
    state, m = fns.train_step(state, b)
    assert m["loss_scale"].item() == 2.0 ** 16
    before = {k: v.clone() for k, v in tree.flatten(state["params"]).items()}
    bad = dict(b, image=b["image"].clone())
    bad["image"][0, 0, 0, 0] = float("inf")
    state, m = fns.train_step(state, bad)
    assert m["skipped"].item() == 1
    assert state["loss_scale"]["scale"].item() == 2.0 ** 15
    after = tree.flatten(state["params"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    state, m = fns.train_step(state, b)
    assert torch.isfinite(m["loss"])
