"""Whole optimizer steps over time: mim's train step against an independent re-statement
of each reference trainer's loop, recipe by recipe.

The reference side is built from torch and timm parts only: the same loss function
differentiated by ``torch.autograd`` (forward passes and gradients are compared with the
official modules elsewhere), ``torch.optim.AdamW`` / ``SGD`` or MAE's LARS re-stated, the
reference's scheduler (timm's ``CosineLRScheduler`` / ``MultiStepLRScheduler``, torch's
``LambdaLR`` / ``CosineAnnealingLR``) or its formula (MAE ``adjust_learning_rate``, BEiT
``cosine_scheduler``), ``torch.nn.utils.clip_grad_norm_``, and the loop's order of
operations: when the lr and weight decay are set, when the scheduler steps, when the
gradient is clipped (once per step, or after every micro-batch's backward), when MoBY's
momentum encoder moves. Six optimizer steps with warm-up, accumulation 2 and a clipping
threshold that clips; every parameter, the model state (BatchNorm statistics, MoBY's
momentum branch and queues) and each group's lr and weight decay are compared after every
step at fp32 tolerance.

Elements whose gradient is zero in exact arithmetic (the key part of timm's fused qkv bias:
softmax is invariant to it) receive rounding noise in both implementations, which Adam
turns into steps of up to ``lr``: they are checked apart, as zero-gradient elements that
move by at most the sum of the lrs.
"""
import math
import os

import numpy as np
import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.multistep_lr import MultiStepLRScheduler

from conftest import no_drop_path
from mim import bench, config as config_lib, tree
from mim.train import step as step_lib
from mim.train.setup import Setup, schedule_for

STEPS, ACCUM, BATCH, STEPS_PER_EPOCH, TOTAL = 6, 2, 8, 3, 12
EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def _config(experiment, **optim):
    c = config_lib.import_sibling(os.path.join(EXPERIMENTS, experiment), experiment).get_config("tiny")
    no_drop_path(c)
    c.precision, c.compile, c.grad_accum, c.batch_size = "fp32", "off", ACCUM, BATCH
    c.optim.warmup_epochs, c.optim.warmup_steps = 0.0, 2
    c.optim.clip_grad = 0.02            # small enough that every step clips
    if c.optim.name == "adamw":         # steps of ~1e-3: a wrong lr shows beyond fp32 noise
        if c.optim.base_lr:
            c.optim.base_lr = 1e-3 * 256 / BATCH
        else:
            c.optim.lr = 1e-3
    c.optim.update(optim)
    if c.optim.schedule == "epoch_cosine":
        c.optim.warmup_steps = 0
    if c.task == "moby_pretrain":       # moby_main.py never accumulates (an update per batch)
        c.grad_accum = 1
        c.model.contrast_num_negative = 4 * BATCH
    return c


# --------------------------------------------------------------------------- the reference loop


class LARS(torch.optim.Optimizer):
    """MAE util/lars.py, re-stated: weight decay and the trust ratio on matrices only."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0., torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one)
                    dp = dp.mul(q)
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                st["mu"].mul_(g["momentum"]).add_(dp)
                p.add_(st["mu"], alpha=-g["lr"])


def _optimizer(c, torch_groups):
    o = c.optim
    if o.name == "adamw":
        return torch.optim.AdamW(torch_groups, betas=(o.b1, o.b2), eps=o.eps, foreach=False)
    if o.name == "sgd":
        return torch.optim.SGD(torch_groups, momentum=o.momentum, nesterov=o.nesterov, foreach=False)
    return LARS(torch_groups, momentum=o.momentum)


class ReferenceSchedule:
    """Sets each group's lr / weight decay the way the reference loop does, at the point in
    the loop where it does: ``before(k)`` ahead of optimizer step k's micro-batches,
    ``before_update(k)`` between the backward passes and ``optimizer.step()``,
    ``after(k)`` after it."""

    def __init__(self, c, opt, base_lr, name):
        self.c, self.opt, self.name, self.base = c, opt, name, base_lr
        o, micro = c.optim, STEPS_PER_EPOCH * c.grad_accum
        self.micro = micro
        if self.name == "timm_cosine":
            self.timm = CosineLRScheduler(opt, t_initial=TOTAL * c.grad_accum, lr_min=o.min_lr,
                                          warmup_lr_init=o.warmup_init_lr, warmup_t=o.warmup_steps * c.grad_accum,
                                          cycle_limit=1, t_in_epochs=False)
        elif self.name == "timm_multistep":  # SimMIM's MultiStepLRScheduler = timm's, milestones + 1
            ms = [int(m * micro) + 1 for m in o.milestones]
            self.timm = MultiStepLRScheduler(opt, decay_t=ms, decay_rate=o.gamma, warmup_t=o.warmup_steps * c.grad_accum,
                                             warmup_lr_init=o.warmup_init_lr, warmup_prefix=False, t_in_epochs=False)
        elif self.name == "vit_cosine":
            W = o.warmup_steps

            def lam(step):  # ViT-pytorch WarmupCosineSchedule
                if step < W:
                    return float(step) / float(max(1.0, W))
                progress = float(step - W) / float(max(1, TOTAL - W))
                return max(0.0, 0.5 * (1. + math.cos(math.pi * progress)))
            self.torch_sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        elif self.name == "epoch_cosine":
            self.torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, round(TOTAL / STEPS_PER_EPOCH), eta_min=o.min_lr)
        elif self.name == "beit_cosine":
            W, T = o.warmup_steps, TOTAL   # utils.cosine_scheduler, re-stated
            warm = np.linspace(o.warmup_init_lr, base_lr, W)
            iters = np.arange(T - W)
            cos = np.array([o.min_lr + 0.5 * (base_lr - o.min_lr) * (1 + math.cos(math.pi * i / len(iters)))
                            for i in iters])
            self.values = np.concatenate((warm, cos))
            wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
            self.wd_values = np.array([wd_end + 0.5 * (o.weight_decay - wd_end) * (1 + math.cos(math.pi * i / T))
                                       for i in range(T)])

    def before(self, k):
        o = self.c.optim
        if self.name == "cosine":   # MAE adjust_learning_rate(data_iter_step / len + epoch)
            epoch = k / STEPS_PER_EPOCH
            we, E = o.warmup_steps / STEPS_PER_EPOCH, TOTAL / STEPS_PER_EPOCH
            if epoch < we:
                lr = self.base * epoch / we
            else:
                lr = o.min_lr + (self.base - o.min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - we) / (E - we)))
            for g in self.opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
        elif self.name == "beit_cosine":   # train_one_epoch: it = start_steps + step
            for g in self.opt.param_groups:
                g["lr"] = self.values[k] * g["lr_scale"]
                if g["weight_decay"] > 0:
                    g["weight_decay"] = self.wd_values[k]

    def before_update(self, k):
        if self.name == "vit_cosine":     # train.py: scheduler.step(); optimizer.step()
            self.torch_sched.step()

    def after(self, k):
        if self.name.startswith("timm_"):   # step_update(epoch * num_steps + idx), last micro-batch
            self.timm.step_update((k + 1) * self.c.grad_accum - 1)
        elif self.name == "epoch_cosine" and (k + 1) % STEPS_PER_EPOCH == 0:
            self.torch_sched.step()


def _moby_momentum_update(params, model_state, k, m0):
    """Transformer-SSL models/moby.py ``_momentum_update_key_encoder`` at ``self.k = k``."""
    m = 1. - (1. - m0) * (np.cos(np.pi * k / TOTAL) + 1) / 2.
    with torch.no_grad():
        for src, dst in (("encoder", "encoder_k"), ("projector", "projector_k")):
            q, kk = tree.flatten(params[src]), tree.flatten(model_state[dst])
            for n, p in q.items():
                kk[n].copy_(kk[n] * m + p.detach() * (1. - m))


def reference(c, batches, schedule, clip_mode):
    """The reference loop, with its scheduler ``schedule`` and its clipping ``clip_mode``
    (given by the recipe, not read from mim's config)."""
    setup = Setup(c, "/nonexistent")
    params, model_state = setup.init_params()
    built = setup.build_train(TOTAL, STEPS_PER_EPOCH)     # mim's groups (tested against each
    groups, trainable = built.groups, built.trainable      # reference's rules in the recipe tests)
    flat = tree.flatten(params)
    leaves = {n: flat[n].clone().requires_grad_() for n in trainable}
    fixed = {n: v for n, v in flat.items() if n not in leaves}
    swin_family = schedule.startswith("timm_") or schedule == "epoch_cosine"
    base = config_lib.learning_rate(c)
    torch_groups = [{"params": [leaves[n] for n in g.names], "weight_decay": g.weight_decay,
                     # Swin-family and torch schedulers run each group from lr * scale; MAE and BEiT
                     # multiply their value by "lr_scale" (no such key for the former)
                     "lr": base * g.lr_scale, **({} if swin_family else {"lr_scale": g.lr_scale})}
                    for g in groups]
    opt = _optimizer(c, torch_groups)
    sched = ReferenceSchedule(c, opt, base, schedule)
    model_state = tree.map(lambda t: t.clone(), model_state)
    clip, micro_clip = c.optim.clip_grad, clip_mode == "micro_batch"
    loss_fn = setup.loss_fn()
    out, norms = [], []
    for k, batch in enumerate(batches):
        sched.before(k)
        if c.task == "moby_pretrain":
            _moby_momentum_update(tree.unflatten({**fixed, **leaves}), model_state, k, c.model.contrast_momentum)
        hyper = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        for micro in step_lib.split_batch(batch, c.grad_accum):
            loss, (model_state, _) = loss_fn(tree.unflatten({**fixed, **leaves}), model_state, micro, True)
            (loss / c.grad_accum if c.grad_accum > 1 else loss).backward()
            model_state = tree.map(torch.Tensor.detach, model_state)
            if micro_clip:
                norms.append(torch.nn.utils.clip_grad_norm_(list(leaves.values()), clip))
        if not micro_clip:
            norms.append(torch.nn.utils.clip_grad_norm_(list(leaves.values()), clip))
        sched.before_update(k)
        hyper = [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        grads = {n: leaves[n].grad.clone() for n in leaves}
        opt.step()
        opt.zero_grad()
        sched.after(k)
        out.append(({n: v.detach().clone() for n, v in leaves.items()},
                    tree.flatten(tree.map(torch.Tensor.clone, model_state)), hyper, grads))
    assert max(norms) > clip, "the clipping threshold never clipped: the test would not see clipping"
    return out


def ours(c, batches):
    setup = Setup(c, "/nonexistent")
    built = setup.build_train(TOTAL, STEPS_PER_EPOCH)
    sched = schedule_for(c, TOTAL, STEPS_PER_EPOCH)
    state, out = built.state, []
    for k, batch in enumerate(batches):
        step = torch.tensor(k)
        lrs = [float(v) for v in sched.group_lrs(step, [g.lr_scale for g in built.groups])]
        wds = [float(v) for v in sched.group_weight_decays(step, [g.weight_decay for g in built.groups])]
        state, _ = built.fns.train_step(state, batch)
        flat = tree.flatten(state["params"])
        out.append(({n: flat[n].clone() for n in built.trainable},
                    tree.flatten(tree.map(torch.Tensor.clone, state["model_state"])), list(zip(lrs, wds))))
    return out


def _zero_grad_mask(name, grads_over_steps, largest):
    """Elements whose gradient is zero in exact arithmetic: their reference gradient never
    exceeds rounding noise (1e-6 of the largest gradient element of the model) at any step.
    Besides timm's qkv key bias, a training-mode BatchNorm removes every batch-constant
    shift before it: MoBY's projector input biases and the encoder's final norm bias."""
    g = torch.stack([gs[name].abs() for gs in grads_over_steps]).amax(0)
    return g <= 1e-6 * largest


def check(c, schedule, clip_mode, rtol=2e-4, atol=2e-6):
    batches = [bench.synthetic_batch(c, Setup(c, "/nonexistent").task, BATCH, "cpu", seed=k) for k in range(STEPS)]
    ref = reference(c, batches, schedule, clip_mode)
    got = ours(c, batches)
    grads = [r[3] for r in ref]
    largest = max(float(g.abs().max()) for gs in grads for g in gs.values())
    for k, ((rp, rs, rh, rg), (op, os_, oh)) in enumerate(zip(ref, got)):
        np.testing.assert_allclose([h[0] for h in oh], [h[0] for h in rh], rtol=2e-6, atol=1e-12,
                                   err_msg=f"lr per group, step {k}")
        np.testing.assert_allclose([float(h[1]) for h in oh], [float(h[1]) for h in rh], rtol=2e-6,
                                   err_msg=f"weight decay per group, step {k}")
        lr_sum = sum(max(h[0] for h in r[2]) for r in ref[:k + 1])
        # Adam normalises each element's step to about lr, so an element with a tiny gradient
        # carries rounding noise up to a small fraction of lr: 1% of it is allowed
        tol = max(atol, 0.01 * max(h[0] for h in rh)) if c.optim.name == "adamw" else atol
        for n in rp:
            zero = _zero_grad_mask(n, grads, largest)
            torch.testing.assert_close(op[n][~zero], rp[n][~zero], rtol=rtol, atol=tol,
                                       msg=lambda m: f"{n} after step {k}: {m}")
            if zero.any():  # moved by rounding noise only, at most lr per Adam step
                assert (op[n][zero] - rp[n][zero]).abs().max() <= 2 * lr_sum + 1e-6, n
        for n in rs:
            if rs[n].is_floating_point():
                torch.testing.assert_close(os_[n], rs[n], rtol=rtol, atol=atol,
                                           msg=lambda m: f"model_state {n} after step {k}: {m}")
            else:
                assert torch.equal(os_[n], rs[n]), f"model_state {n} after step {k}"


# --------------------------------------------------------------------------- one test per recipe

# recipe: (experiment, the reference loop's scheduler, its clipping, optim overrides)
MICRO, ONCE = "micro_batch", "step"
RECIPES = {
    "mae_pretrain": ("mae_base.py", "cosine", ONCE, {}),
    "mae_finetune": ("mae_base_finetune.py", "cosine", ONCE, {}),
    "mae_linprobe": ("mae_base_linprobe.py", "cosine", ONCE, {}),
    "simmim_pretrain_swin": ("simmim_swin_base.py", "timm_cosine", MICRO, {"warmup_init_lr": 1e-4, "min_lr": 1e-5}),
    "simmim_pretrain_vit_multistep": ("simmim_vit_base.py", "timm_multistep", MICRO,
                                      {"warmup_init_lr": 1e-4, "milestones": (1.5,)}),
    "simmim_finetune_swin": ("simmim_swin_base_finetune.py", "timm_cosine", MICRO,
                             {"warmup_init_lr": 1e-4, "min_lr": 1e-5}),
    "simmim_finetune_vit": ("simmim_vit_base_finetune.py", "timm_cosine", MICRO,
                            {"warmup_init_lr": 1e-4, "min_lr": 1e-5}),
    "beit_pretrain": ("beit_base.py", "beit_cosine", ONCE, {"weight_decay_end": 0.2}),
    "beit_finetune": ("beit_base_finetune.py", "beit_cosine", ONCE, {}),
    "beit_linprobe": ("beit_base_linprobe.py", "epoch_cosine", ONCE, {}),
    "moby_pretrain": ("moby_swin_tiny.py", "timm_cosine", MICRO, {"warmup_init_lr": 1e-5, "min_lr": 1e-5}),
    "moby_linear": ("moby_swin_tiny_linear.py", "timm_cosine", MICRO, {"warmup_init_lr": 1e-3}),
    "vit_b32": ("vit_b32.py", "vit_cosine", ONCE, {"name": "sgd", "lr": 0.03, "weight_decay": 0.0}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # ViT-pytorch's order
def test_trajectory_equals_the_reference_loop(recipe):
    experiment, schedule, clip_mode, optim = RECIPES[recipe]
    check(_config(experiment, **optim), schedule, clip_mode)
