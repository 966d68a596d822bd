"""Every schedule of mim.schedules against the reference's own scheduler (timm's
CosineLRScheduler / MultiStepLRScheduler, torch's LambdaLR / CosineAnnealingLR) or the
reference's formula re-stated here, driven exactly as each reference loop drives it, for
every optimizer step of a schedule with warm-up, per parameter group."""
import bisect
import math

import numpy as np
import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.multistep_lr import MultiStepLRScheduler

from mim import config as config_lib
from mim import schedules
from mim.train.setup import schedule_for

SCALES = (1.0, 0.65, 0.65 ** 2)   # layer-decay groups


def _torch_groups(base_lr, scales=SCALES):
    """Groups as SimMIM's ``get_finetune_param_groups`` makes them: each group's initial
    lr is ``base * scale`` (no ``lr_scale`` key: the 2021 timm the Swin-family code was
    written against never read one)."""
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": base_lr * s}
                            for s in scales], lr=base_lr)


def _ours(sched, k, scales=SCALES):
    return [v.item() for v in sched.group_lrs(torch.tensor(k), scales)]


def _swin_loop(opt, scheduler, epochs, micro_per_epoch, accum):
    """The lr each optimizer step trains at, in main_simmim.py's ``train_one_epoch`` order:
    ``optimizer.step()`` on the last micro-batch of each accumulation, then
    ``lr_scheduler.step_update(epoch * num_steps + idx)``."""
    seen = []
    for epoch in range(epochs):
        for idx in range(micro_per_epoch):
            if accum == 1 or (idx + 1) % accum == 0:
                seen.append([g["lr"] for g in opt.param_groups])
                scheduler.step_update(epoch * micro_per_epoch + idx)
    return seen


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_timm_cosine_is_timms_scheduler_stepped_after_each_step(accum):
    base, lr_min, warm_init = 1e-3, 1e-5, 1e-6
    epochs, steps_per_epoch, warmup_epochs = 4, 5, 1.4
    micro = steps_per_epoch * accum
    opt = _torch_groups(base)
    ref = CosineLRScheduler(opt, t_initial=int(epochs * micro), lr_min=lr_min, warmup_lr_init=warm_init,
                            warmup_t=int(warmup_epochs * micro), cycle_limit=1, t_in_epochs=False)
    want = _swin_loop(opt, ref, epochs, micro, accum)
    sched = schedules.timm_cosine(base, epochs * micro, int(warmup_epochs * micro), lr_min, warm_init, accum)
    for k, lrs in enumerate(want):
        np.testing.assert_allclose(_ours(sched, k), lrs, rtol=2e-6, atol=1e-12, err_msg=f"step {k}")
    # the first two optimizer steps both train at warmup_lr_init without accumulation
    if accum == 1:
        assert want[0] == want[1] == [warm_init] * len(SCALES)


def test_timm_multistep_is_simmims_scheduler():
    """SimMIM's MultiStepLRScheduler (warm-up, then gamma ** bisect_right(milestones, t)) is
    timm's with ``warmup_prefix=False`` and each milestone one later (timm compares t + 1)."""
    base, warm_init, accum, steps_per_epoch, epochs = 4e-4, 2e-6, 2, 3, 8
    micro = steps_per_epoch * accum
    milestones = [int(e * micro) for e in (5, 7)]
    opt = _torch_groups(base)
    ref = MultiStepLRScheduler(opt, decay_t=[m + 1 for m in milestones], decay_rate=0.1,
                               warmup_t=2 * micro, warmup_lr_init=warm_init, warmup_prefix=False,
                               t_in_epochs=False)
    want = _swin_loop(opt, ref, epochs, micro, accum)
    sched = schedules.timm_multistep(base, milestones, 0.1, 2 * micro, warm_init, accum)
    for k, lrs in enumerate(want):
        t = max(k * accum - 1, 0)   # SimMIM's own formula at the last step_update
        formula = [warm_init + t * (base * s - warm_init) / (2 * micro) if t < 2 * micro
                   else base * s * 0.1 ** bisect.bisect_right(milestones, t) for s in SCALES]
        np.testing.assert_allclose(lrs, formula, rtol=1e-12)
        np.testing.assert_allclose(_ours(sched, k), lrs, rtol=2e-6, err_msg=f"step {k}")


def _beit_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                           start_warmup_value=0, warmup_steps=-1):
    """BEiT utils.cosine_scheduler, re-stated."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_steps > 0:
        warmup_iters = warmup_steps
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = np.array([final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / len(iters)))
                         for i in iters])
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


@pytest.mark.parametrize("warmup_epochs,warmup_steps", [(2, -1), (1, 3), (0, -1)])
def test_beit_cosine_and_weight_decay_schedule(warmup_epochs, warmup_steps):
    epochs, niter = 5, 4
    lrs = _beit_cosine_scheduler(1.5e-3, 1e-5, epochs, niter, warmup_epochs, warmup_steps=warmup_steps)
    wds = _beit_cosine_scheduler(0.05, 0.2, epochs, niter)
    warm = warmup_steps if warmup_steps > 0 else warmup_epochs * niter
    sched = schedules.with_weight_decay(schedules.beit_cosine(1.5e-3, epochs * niter, warm, 1e-5), 0.05, 0.2,
                                        epochs * niter)
    for it in range(epochs * niter):
        # run_*.py: param_group["lr"] = lr_schedule_values[it] * param_group["lr_scale"];
        # "weight_decay" = wd_schedule_values[it] where the group decays
        np.testing.assert_allclose(_ours(sched, it), [lrs[it] * s for s in SCALES], rtol=2e-6, atol=1e-12)
        got_wd = [float(w) for w in sched.group_weight_decays(torch.tensor(it), [0.05, 0.0])]
        np.testing.assert_allclose(got_wd, [wds[it], 0.0], rtol=2e-6)
    if warm > 1:  # the last warm-up step is already the full lr
        assert abs(_ours(sched, warm - 1)[0] - 1.5e-3) < 1e-9


@pytest.mark.parametrize("accum", [1, 2])
def test_mae_cosine_is_adjust_learning_rate(accum):
    """MAE engine_*.py: ``adjust_learning_rate(optimizer, data_iter_step / len(data_loader)
    + epoch, args)`` on the first micro-batch of each accumulation; fractional warm-up."""
    lr, min_lr, epochs, warmup_epochs, steps_per_epoch = 2e-3, 1e-6, 4, 1.5, 5
    micro = steps_per_epoch * accum

    def adjust(epoch):
        if epoch < warmup_epochs:
            return lr * epoch / warmup_epochs
        return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))

    sched = schedules.mae_cosine(lr, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, min_lr)
    k = 0
    for epoch in range(epochs):
        for it in range(0, micro, accum):
            want = adjust(it / micro + epoch)
            np.testing.assert_allclose(_ours(sched, k), [want * s for s in SCALES], rtol=2e-6, atol=1e-12)
            k += 1


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_vit_cosine_is_lambdalr_stepped_before_the_optimizer():
    """ViT-pytorch train.py: ``scheduler.step()`` then ``optimizer.step()``."""
    warmup, total, base = 3, 12, 0.03

    def lr_lambda(step):  # utils/scheduler.py WarmupCosineSchedule, cycles 0.5
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1. + math.cos(math.pi * 0.5 * 2.0 * progress)))

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base, momentum=0.9)
    ref = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    sched = schedules.vit_cosine(base, total, warmup)
    for k in range(total):
        ref.step()   # before the optimizer, as the reference (torch warns about the order)
        want = opt.param_groups[0]["lr"]
        opt.step()
        assert abs(_ours(sched, k, (1.0,))[0] - want) <= 2e-6 * want + 1e-12, k


def test_epoch_cosine_is_cosine_annealing_stepped_per_epoch():
    epochs, steps_per_epoch, base, eta_min = 6, 4, 4e-3, 1e-4
    opt = _torch_groups(base)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=eta_min)
    sched = schedules.epoch_cosine(base, epochs, steps_per_epoch, eta_min)
    k = 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            np.testing.assert_allclose(_ours(sched, k), [g["lr"] for g in opt.param_groups], rtol=2e-6)
            opt.step()
            k += 1
        ref.step()


def _experiment(name, arg="tiny"):
    return config_lib.import_sibling(__file__, f"../experiments/{name}").get_config(arg)


@pytest.mark.parametrize("experiment,schedule", [
    ("mae_base.py", "cosine"), ("mae_base_finetune.py", "cosine"), ("mae_base_linprobe.py", "cosine"),
    ("beit_base.py", "beit_cosine"), ("beit_base_finetune.py", "beit_cosine"),
    ("beit_base_linprobe.py", "epoch_cosine"), ("simmim_swin_base.py", "timm_cosine"),
    ("simmim_vit_base.py", "timm_multistep"), ("simmim_swin_base_finetune.py", "timm_cosine"),
    ("moby_swin_tiny.py", "timm_cosine"), ("moby_swin_tiny_linear.py", "timm_cosine"),
    ("vit_b32.py", "vit_cosine")])
def test_each_experiment_defaults_to_its_references_schedule(experiment, schedule):
    for arg in (None, "tiny"):
        c = _experiment(experiment, arg)
        assert c.optim.schedule == schedule
        swin_family = schedule.startswith("timm_")
        assert c.optim.clip_mode == ("micro_batch" if swin_family else "step")
    assert _experiment("simmim_swin_base.py", "epochs=800").optim.schedule == "timm_multistep"


def test_schedule_for_counts_micro_batches_for_the_swin_family():
    """The run's schedule from a config: SimMIM fine-tuning with accumulation 2 equals timm's
    CosineLRScheduler built as build_scheduler builds it from len(data_loader)."""
    c = _experiment("simmim_swin_base_finetune.py", None)
    c.grad_accum, c.batch_size = 2, 64
    steps_per_epoch, total = 7, 7 * 100
    sched = schedule_for(c, total, steps_per_epoch)
    lr = config_lib.learning_rate(c)
    micro = steps_per_epoch * 2
    opt = _torch_groups(lr, (1.0,))
    ref = CosineLRScheduler(opt, t_initial=int(100 * micro), lr_min=c.optim.min_lr, warmup_lr_init=c.optim.warmup_init_lr,
                            warmup_t=int(20 * micro), cycle_limit=1, t_in_epochs=False)
    want = _swin_loop(opt, ref, 100, micro, 2)
    for k in range(0, total, 37):
        np.testing.assert_allclose(_ours(sched, k, (1.0,)), want[k], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("experiment,fields,message", [
    ("simmim_vit_base.py", {"optim.milestones": ()}, "timm_multistep needs milestones"),
    ("vit_b32.py", {"optim.min_lr": 1e-5}, "has no final lr"),
    ("beit_base_linprobe.py", {"optim.warmup_steps": 5}, "has no warm-up"),
])
def test_schedule_specific_fields_are_checked(experiment, fields, message):
    c = _experiment(experiment)
    c.update_from_flattened_dict(fields)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)
