"""mim's functional optimizers against torch.optim over many steps."""
import math

import pytest
import torch

from mim import optim, schedules


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    # float64 so that 50+ steps of momentum do not amplify rounding differences
    f = dict(generator=g, dtype=torch.float64)
    params = {"w": torch.randn(8, 5, **f), "b": torch.randn(8, **f), "pos_embed": torch.randn(1, 4, 5, **f)}
    x = torch.randn(16, 5, **f)
    y = torch.randn(16, 8, **f)
    return params, x, y


def _loss(p, x, y):
    return ((x @ p["w"].T + p["b"] + p["pos_embed"].sum() - y) ** 2).mean()


def _run_mim(opt, params, x, y, groups, steps, lr_fn, clip=None):
    params = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for s in range(steps):
        grads = torch.func.grad(_loss)(params, x, y)
        if clip:
            clipped, _ = optim.clip_by_global_norm(list(grads.values()), clip)
            grads = dict(zip(grads, clipped))
        opt.update(params, grads, state, torch.tensor(lr_fn(s), dtype=torch.float64), groups)
    return params


def _run_torch(make, params, x, y, group_spec, steps, lr_fn, clip=None):
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    o = make([{"params": [ps[n] for n in names], **kw} for names, kw in group_spec])
    for s in range(steps):
        for grp in o.param_groups:
            grp["lr"] = lr_fn(s) * grp.get("scale", 1.0)
        o.zero_grad()
        _loss(ps, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(ps.values()), clip)
        o.step()
    return {k: v.detach() for k, v in ps.items()}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_adamw_matches_torch(clip):
    params, x, y = _problem()
    groups = optim.make_groups({k: v.shape for k, v in params.items()}, weight_decay=0.05,
                               no_decay_patterns=("pos_embed",))
    wd = {n: grp.weight_decay for grp in groups for n in grp.names}
    assert wd == {"w": 0.05, "b": 0.0, "pos_embed": 0.0}
    lr_fn = lambda s: 1e-2 * (0.5 + 0.5 * math.cos(math.pi * s / 50))  # noqa: E731
    ours = _run_mim(optim.AdamW(0.9, 0.95, 1e-8), params, x, y, groups, 50, lr_fn, clip)
    ref = _run_torch(lambda g: torch.optim.AdamW(g, betas=(0.9, 0.95), eps=1e-8, foreach=False),
                     params, x, y, [(grp.names, {"weight_decay": grp.weight_decay}) for grp in groups],
                     50, lr_fn, clip)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-9, atol=1e-10)
        assert not torch.allclose(ours[k], params[k])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(nesterov):
    params, x, y = _problem(1)
    groups = optim.make_groups({k: v.shape for k, v in params.items()}, weight_decay=1e-4)
    lr_fn = lambda s: 0.05 * min(1.0, (s + 1) / 10)  # noqa: E731
    ours = _run_mim(optim.SGD(0.9, nesterov), params, x, y, groups, 60, lr_fn, clip=1.0)
    ref = _run_torch(lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=nesterov, foreach=False),
                     params, x, y, [(grp.names, {"weight_decay": grp.weight_decay}) for grp in groups],
                     60, lr_fn, clip=1.0)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-9, atol=1e-10)


def test_layer_decay_scales_lr_per_layer():
    """Layer decay against torch.optim.AdamW with one param group per layer (BEiT/MAE's
    param_groups_lrd builds exactly this)."""
    from mim.models import vit
    shapes = {"pos_embed": (1, 5, 4), "blocks.0.w": (4, 4), "blocks.1.w": (4, 4), "head.weight": (3, 4)}
    groups = optim.make_groups(shapes, weight_decay=0.0, layer_decay=0.5,
                               layer_id=lambda n: vit.layer_id(n, vit.config(depth=2)), num_layers=2)
    scale = {n: grp.lr_scale for grp in groups for n in grp.names}
    # layers 0..3 of depth 2: decay^(3 - id)
    assert scale == {"pos_embed": 0.125, "blocks.0.w": 0.25, "blocks.1.w": 0.5, "head.weight": 1.0}

    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    loss = lambda p: sum((v ** 3).sum() for v in p.values())  # noqa: E731
    ours = {k: v.clone() for k, v in params.items()}
    opt = optim.AdamW()
    st = opt.init(ours)
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    o = torch.optim.AdamW([{"params": [ref[n]], "lr": 0.1 * scale[n], "weight_decay": 0.0}
                           for n in shapes])
    for _ in range(10):
        opt.update(ours, torch.func.grad(loss)(ours), st, torch.tensor(0.1), groups)
        o.zero_grad()
        loss(ref).backward()
        o.step()
    for k in shapes:
        torch.testing.assert_close(ours[k], ref[k].detach(), rtol=1e-4, atol=1e-5)


def test_lars_matches_reference_formula():
    """LARS against a direct transcription of You et al. 2017, eq. (6)-(7), applied
    only to matrices (MAE's linear-probe LARS)."""
    params, x, y = _problem(2)
    groups = optim.make_groups({k: v.shape for k, v in params.items()}, weight_decay=0.0)
    for grp in groups:
        grp.weight_decay = 0.1  # LARS decays what it trusts (matrices) only; see below
    ours = _run_mim(optim.LARS(0.9, 0.001), params, x, y, groups, 20, lambda s: 0.5)
    ref = {k: v.clone() for k, v in params.items()}
    mom = {k: torch.zeros_like(v) for k, v in ref.items()}
    for _ in range(20):
        grads = torch.func.grad(_loss)(ref, x, y)
        for k in ref:
            d = grads[k]
            if ref[k].ndim > 1:
                d = d + 0.1 * ref[k]
                pn, un = ref[k].norm(), d.norm()
                q = 0.001 * pn / un if (pn > 0 and un > 0) else 1.0
                d = d * q
            mom[k] = 0.9 * mom[k] + d
            ref[k] = ref[k] - 0.5 * mom[k]
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-9, atol=1e-10)


def test_warmup_cosine_matches_formula():
    sched = schedules.mae_cosine(1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    for s in [0, 5, 10, 40, 99, 100, 150]:
        if s < 10:
            want = s / 10
        else:
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 10) / 90)))
        assert abs(sched(torch.tensor(s)).item() - want) < 1e-6, s


def test_clip_matches_torch():
    g = torch.Generator().manual_seed(4)
    a = [torch.randn(3, 4, generator=g) * 5, torch.randn(7, generator=g)]
    b = [t.clone().requires_grad_() for t in a]
    for t, src in zip(b, a):
        t.grad = src.clone()
    want = torch.nn.utils.clip_grad_norm_(b, 1.0)
    a, got = optim.clip_by_global_norm(a, 1.0)
    torch.testing.assert_close(got, want)
    for t, r in zip(a, b):
        torch.testing.assert_close(t, r.grad)


def test_warmup_from_init_lr_and_constant_schedule():
    cos = schedules.mae_cosine(1.0, total_steps=20, warmup_steps=10, warmup_init_lr=0.1)
    assert abs(cos(torch.tensor(0)).item() - 0.1) < 1e-7
    assert abs(cos(torch.tensor(5)).item() - 0.55) < 1e-6
    const = schedules.warmup_constant(2.0, warmup_steps=4, warmup_init_lr=1.0)
    assert [round(const(torch.tensor(s)).item(), 6) for s in (0, 2, 4, 9)] == [1.0, 1.5, 2.0, 2.0]
    assert schedules.warmup_constant(3.0)(torch.tensor(7)).item() == 3.0
