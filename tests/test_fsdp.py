"""Fully sharded data parallel (``config.sharding="fsdp"``, DTensor) in 2 real processes:

- the sharded step equals the unsharded data-parallel step, for every optimizer, under
  fp32, O2 bf16 (the fp32 shards are the master weights) and fp16 loss scaling, with
  gradient accumulation and frozen parameters;
- each rank keeps about half of the parameters and optimizer state;
- a whole run (launcher, checkpoints, resume with sharding on or off and another number
  of ranks, evaluation, reconstruction pictures) gives the unsharded run's losses and
  state.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_distributed import (STEPS, _check, _env, _free_port, assert_close_states, data, losses,  # noqa: F401
                              metric_rows, one_rank, opt_bytes, resume_from, state, train, two_ranks)

WORLD = 2


def _step_worker(rank, world, port, out_dir):
    """One rank: the same batches through the unsharded and the sharded step for each
    (precision, optimizer) case; results to ``out_dir/rank<r>.pt``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.nn.functional as F
    from mim import backend, optim, schedules, tree
    from mim.models import vit
    from mim.train import sharding as sharding_lib
    from mim.train import step as step_lib

    # 5 classes: the head's 5 rows split 3 + 2; a 0-d, a 1-row and a (1, 1, D) tensor too.
    cfg = vit.config(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)

    def loss(p, s, b, train):
        logits, _ = vit.apply(p, b["image"], cfg, train=train)
        return F.cross_entropy(logits.float(), b["label"]) * p["temperature"], (s, {"logit_mean": logits.mean()})

    g = torch.Generator().manual_seed(100 + rank)  # each rank its own half of the batch
    batches = [{"image": torch.randn(4, 3, 16, 16, generator=g), "label": torch.randint(0, 5, (4,), generator=g)}
               for _ in range(3)]
    # Under O2 bf16 and compiled, SGD: AdamW divides by the gradient's own size, so where
    # the exact gradient is zero (attention's key bias) it turns rounding differences (a
    # bf16 against an fp32 gradient reduction; eager against compiled kernels) into
    # lr-sized ones.
    # (precision, optimizer, accumulation steps, frozen, clip mode, compile the sharded step)
    cases = [("fp32", "adamw", 1, (), "step", "off"), ("bf16", "sgd", 1, (), "step", "off"),
             ("amp_fp16", "adamw", 1, (), "step", "off"), ("fp32", "sgd", 2, ("pos_embed",), "step", "off"),
             ("fp32", "lars", 1, ("blocks.0",), "step", "off"), ("fp32", "sgd", 1, (), "step", "on"),
             ("fp32", "sgd", 2, (), "micro_batch", "off")]
    results = {}
    for precision, opt_name, accum, frozen, clip_mode, compile in cases:
        runs = {}
        for mode in ("none", "fsdp"):
            be = backend.setup("cpu", precision, compile if mode == "fsdp" else "off")
            params = vit.init(torch.Generator().manual_seed(0), cfg)
            params["temperature"] = torch.tensor(1.5)
            flat = tree.flatten(params)
            names = optim.trainable_names(list(flat), frozen)
            groups = optim.make_groups({n: flat[n].shape for n in names}, weight_decay=0.05,
                                       no_decay_patterns=("pos_embed", "cls_token"))
            opt = {"adamw": optim.AdamW(0.9, 0.95), "sgd": optim.SGD(0.9, nesterov=True),
                   "lars": optim.LARS(0.9)}[opt_name]
            shard = sharding_lib.create(mode, names, be)
            # with a model EMA (config.ema): averaged from the gathered fp32 shards
            st = step_lib.create_state(params, {}, opt, names, be, sharding=shard, ema=True)
            fns = step_lib.build(loss, opt, groups, schedules.mae_cosine(1e-2, 10, 1), be,
                                 grad_accum=accum, clip_grad=0.5, clip_mode=clip_mode, sharding=shard,
                                 ema_decay=0.9)
            ls, norms = [], []
            for b in batches:
                st, m = fns.train_step(st, b)
                ls.append(m["loss"].item())
                # an fp16 step whose gradients overflow is skipped (no norm): in both modes
                norms.append(m["grad_norm"].item() if "grad_norm" in m else 0.0)
            whole = shard.full_state(st) if shard is not None else tree.flatten(st)
            runs[mode] = ({k: v.detach().cpu().clone() for k, v in whole.items()}, ls, norms,
                          sharding_lib.persistent_bytes(st, names))
        results[(precision, opt_name, accum, frozen, clip_mode, compile)] = runs
        if clip_mode == "micro_batch":
            runs["reference"] = _ddp_micro_clip_reference(cfg, loss, batches, world, accum, groups)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _ddp_micro_clip_reference(cfg, loss, batches, world, accum, groups):
    """Swin-family ``train_one_epoch`` under DDP, re-stated: each ``(loss / accum).backward()``
    averages that micro-batch's gradient over the ranks (DDP's all-reduce) and adds it to
    ``.grad``; ``clip_grad_norm_`` then clips the running sum; ``optimizer.step()`` after the
    last micro-batch (torch.optim.SGD, Nesterov, the same lr per step). Every rank's
    batches are re-drawn here from their seeds, so this is one process's computation."""
    from mim import schedules, tree
    from mim.models import vit
    params = vit.init(torch.Generator().manual_seed(0), cfg)
    params["temperature"] = torch.tensor(1.5)
    leaves = {n: v.clone().requires_grad_() for n, v in tree.flatten(params).items()}
    opt = torch.optim.SGD([{"params": [leaves[n] for n in g.names], "weight_decay": g.weight_decay}
                           for g in groups], lr=0.0, momentum=0.9, nesterov=True)
    sched = schedules.mae_cosine(1e-2, 10, 1)
    per_rank = []
    for r in range(world):
        g = torch.Generator().manual_seed(100 + r)
        per_rank.append([{"image": torch.randn(4, 3, 16, 16, generator=g),
                          "label": torch.randint(0, 5, (4,), generator=g)} for _ in range(3)])
    for k in range(len(batches)):
        for grp in opt.param_groups:
            grp["lr"] = float(sched(torch.tensor(k)))
        opt.zero_grad()
        for i in range(accum):
            micro_grads = []
            for r in range(world):
                micro = {key: v.chunk(accum)[i] for key, v in per_rank[r][k].items()}
                value, _ = loss(tree.unflatten(leaves), {}, micro, True)
                micro_grads.append(torch.autograd.grad(value / accum, list(leaves.values())))
            with torch.no_grad():
                for j, p in enumerate(leaves.values()):
                    avg = sum(gs[j] for gs in micro_grads) / world
                    p.grad = avg if p.grad is None else p.grad + avg
            torch.nn.utils.clip_grad_norm_(list(leaves.values()), 0.5)
        opt.step()
    return {"params." + n: v.detach().clone() for n, v in leaves.items()}


def test_fsdp_step_equals_unsharded_step(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_step_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case, runs in ranks[0].items():
        (full, l_full, n_full, b_full), (sharded, l_sh, n_sh, b_sh) = runs["none"], runs["fsdp"]
        if "reference" in runs:  # clipping after every micro-batch, averaged over the ranks first
            assert_close_states(runs["reference"], full, rel=1e-5, prefixes=("params.",))
        # Under O2 bf16 the unsharded run averages bf16 gradients, the sharded one reduces
        # them in fp32: they agree to a few bf16 roundings (2**-8), elsewhere to fp32 rounding.
        rel = 3e-2 if case[0] == "bf16" else 2e-5 if case[-1] == "on" else 1e-5
        for a, b in zip(l_full + n_full, l_sh + n_sh):
            assert abs(a - b) <= rel * abs(a), (case, l_full, l_sh, n_full, n_sh)
        # The checkpoint layout of an unsharded run, with the same values.
        assert set(full) == set(sharded), case
        assert_close_states(full, sharded, rel=rel, prefixes=("params.", "opt.", "master.", "ema."))
        # Both ranks gathered the same whole state.
        other = ranks[1][case]["fsdp"][0]
        for k in full:
            assert torch.equal(sharded[k], other[k]), (case, k)
        # About half of what persists between steps on each rank (the rows of each tensor
        # split as torch.chunk does; the step counters are whole). Under O2 the unsharded
        # run keeps bf16 parameters, fp32 masters and 2 fp32 moments (14 bytes per
        # parameter); the sharded one fp32 shards and moments: (4 + 8) / 2 = 6 bytes.
        want = 6 / 14 if case[0] == "bf16" else 0.5
        for r in range(WORLD):
            total_full, total_sh = sum(ranks[r][case]["none"][3]), sum(ranks[r][case]["fsdp"][3])
            assert abs(total_sh / total_full - want) < 0.04, (case, r, total_sh, total_full)


def param_bytes(stderr):
    """{rank: bytes of trainable parameters} from the line every rank logs."""
    return {int(r): int(n) for r, n in
            re.findall(r"rank (\d+): optimizer state \d+ bytes, trainable parameters (\d+) bytes", stderr)}


@pytest.mark.slow
def test_fsdp_run_trains_checkpoints_and_resumes_like_unsharded(tmp_path, data, one_rank, two_ranks):
    """Through the launcher: 2 sharded ranks give the unsharded runs' losses and state
    (checkpoints are gathered into the unsharded layout), keep half of the parameters and
    optimizer state each, evaluate with the gathered parameters, and resume from and into
    unsharded runs with another number of ranks."""
    (w1, _), (w2, p2) = one_rank, two_ranks
    ws = tmp_path / "fsdp"
    p = train(ws, data, "--config.sharding=fsdp", nproc=2)
    for a, b in zip(losses(w2), losses(ws)):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert len(losses(ws)) == STEPS
    assert_close_states(state(w1), state(ws))
    evals = [r for r in metric_rows(ws) if "eval/acc1" in r]
    want = [r for r in metric_rows(w2) if "eval/acc1" in r]
    assert len(evals) == 1 and evals[0]["eval/count"] == 7
    assert abs(evals[0]["eval/loss"] - want[0]["eval/loss"]) <= 1e-5 * abs(want[0]["eval/loss"])
    for got, full in ((opt_bytes(p.stderr), opt_bytes(p2.stderr)),
                      (param_bytes(p.stderr), param_bytes(p2.stderr))):
        assert set(got) == {0, 1}
        for r in (0, 1):  # rows split as torch.chunk does; the step counter is whole
            assert 0.45 < got[r] / full[r] < 0.55, (got, full)
    up, down = tmp_path / "1to2_fsdp", tmp_path / "fsdp_to1"
    resume_from(w1, up)
    assert "resumed from" in train(up, data, "--config.sharding=fsdp", nproc=2).stderr
    resume_from(ws, down)
    assert "resumed from" in train(down, data).stderr
    assert_close_states(state(w1), state(up))
    assert_close_states(state(w1), state(down))


def test_fsdp_mae_draws_reconstructions_from_gathered_parameters(tmp_path, data):
    """A pretraining task with a picture hook: every rank gathers the parameters when a
    picture is due, rank 0 draws it."""
    wd = tmp_path / "mae"
    env = dict(_env(), WORKDIR=str(wd), PYTHON=sys.executable, NPROC="2")
    cmd = [os.path.join(ROOT, "launchers", "multi_gpu.sh"),
           os.path.join(ROOT, "experiments", "mae_base.py") + ":tiny", f"--config.data.path={data}",
           "--config.sharding=fsdp", "--config.data.num_workers=0", "--config.batch_size=16",
           "--config.steps=2", "--config.log_every=1", "--config.checkpoint_every=2",
           "--config.recon.every=1", "--config.recon.num_images=2"]
    _check(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env), cmd)
    assert sorted(os.listdir(wd / "reconstructions")) == ["step_00000001.png", "step_00000002.png"]
    assert len(losses(wd)) == 2 and all(math.isfinite(x) for x in losses(wd))
    saved = state(wd, step=2)
    assert saved["params.decoder_pred.weight"].shape == (4 * 4 * 3, 64)


def _reshard_worker(rank, world, port, out_dir):
    """Whole parameters alive during and after the forward, and gradients: without
    resharding, resharding after a forward that gathers everything first, and the eager
    forward that gathers each parameter when it reads it (O2 bf16: the gathered tensors
    are the ones used)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import gc
    import weakref

    import torch.nn.functional as F
    from mim import backend, tree
    from mim.models import vit
    from mim.train import sharding as sharding_lib

    be = backend.setup("cpu", "bf16", "off")
    cfg = vit.config(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=4)
    flat = tree.flatten(vit.init(torch.Generator().manual_seed(0), cfg))
    fsdp = sharding_lib.create("fsdp", list(flat), be)
    refs, peak = [], [0]
    gather = fsdp.gather

    def counting_gather(p, dtype=None):
        out = gather(p, dtype)
        if torch.is_grad_enabled():            # the forward's gathers, not the backward's
            refs.append(weakref.ref(out))
            peak[0] = max(peak[0], sum(r() is not None for r in refs))
        return out

    fsdp.gather = counting_gather
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(4, 3, 16, 16, generator=g).bfloat16(), torch.randint(0, 4, (4,), generator=g)
    out = {}
    for mode in ("keep", "reshard", "lazy"):
        refs.clear()
        peak[0] = 0
        leaves = {n: fsdp.shard(t.float()).requires_grad_() for n, t in flat.items()}
        if mode == "reshard":
            with fsdp.gathered(leaves, torch.bfloat16) as full:
                loss = F.cross_entropy(vit.apply(tree.unflatten(full), x, cfg, train=True)[0].float(), y)
                del full
        elif mode == "lazy":
            with fsdp.gathered(leaves, torch.bfloat16, frozen={}) as params:
                loss = F.cross_entropy(vit.apply(params, x, cfg, train=True)[0].float(), y)
        else:
            full = {n: fsdp.gather(p, torch.bfloat16) for n, p in leaves.items()}
            loss = F.cross_entropy(vit.apply(tree.unflatten(full), x, cfg, train=True)[0].float(), y)
            del full
        gc.collect()
        alive = sum(r() is not None for r in refs)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        out[mode] = (alive, peak[0], len(refs), [fsdp.full(t).float() for t in grads])
    torch.save(out, os.path.join(out_dir, f"reshard{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_fsdp_frees_gathered_parameters_between_forward_and_backward(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_reshard_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"reshard{r}.pt")
        (kept, _, n, g_kept), (freed, peak_all, _, g_freed) = out["keep"], out["reshard"]
        lazy_after, lazy_peak, lazy_n, g_lazy = out["lazy"]
        assert n == 4 * 12 + 8, n     # 12 tensors a block; patch embed, tokens, norm, head: 8
        assert kept >= 8, kept        # autograd keeps the weights of the linear layers, norms, ...
        assert freed == 0 and peak_all == n, (freed, peak_all)
        # gathered when read: a layer's weight and bias at a time (3 measured), not all 56
        assert lazy_after == 0 and lazy_n == n and lazy_peak <= 4, (lazy_after, lazy_peak)
        for a, b, c in zip(g_kept, g_freed, g_lazy):
            assert torch.equal(a, b) and torch.equal(a, c)
