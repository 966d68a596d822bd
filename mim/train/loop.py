"""The training loop, for every task. Its parts: :mod:`mim.train.setup` (what a run
builds), :mod:`mim.train.evaluation` (the eval split, ``mode=eval`` / ``mode=knn``),
:mod:`mim.train.lifecycle` (banner, signals, summary)."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict

import torch
import torch.distributed as dist

from mim import backend as backend_lib
from mim import plot, tasks
from mim.checkpoints import io as ckpt
from mim.data import pipeline
from mim.train import frozen as frozen_lib
from mim.train import knn, lifecycle
from mim.train import metrics as metrics_lib
from mim.train import workdir_lock
from mim.train import sharding as sharding_lib
from mim.train.evaluation import evaluate, evaluate_all, evaluate_only, knn_only, write_report  # noqa: F401 - the modes' entry points
from mim.train.setup import Setup, fingerprint

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


CLASSES = "classes.json"       # the train split's class names in label order (mim.predict)


def reduce_mean(values: Dict[str, torch.Tensor], be) -> Dict[str, float]:
    names = sorted(values)
    if not names:
        return {}
    v = torch.stack([values[n].float() for n in names])
    if be.distributed:
        dist.all_reduce(v)
        v /= be.world_size
    return dict(zip(names, v.tolist()))


def _eval_split(config, task):
    """(images, classes) of the eval split, found before any step (a missing split is an
    error now, not at the first evaluation); None when the task does not evaluate."""
    if not hasattr(task, "evaluate"):
        return None
    n, classes = pipeline.split_info(config, config.data.eval_split)
    return n, len(classes)


def train(config, workdir: str) -> Dict[str, float]:
    try:
        return _train(config, workdir)
    finally:
        workdir_lock.release(os.path.join(workdir, workdir_lock.LOCK), os.getpid())


def _train(config, workdir: str) -> Dict[str, float]:
    setup = Setup(config, workdir)
    c, be, task = setup.config, setup.be, setup.task

    n_train = pipeline.num_train_images(c)
    steps_per_epoch = max(n_train // c.batch_size, 1)
    total = c.steps or max(int(round(c.epochs * steps_per_epoch)), 1)

    found = ckpt.latest(setup.ckpt_root)
    # Every rank reads the same workdir (resuming needs a shared one), so all take this branch.
    done_before = lifecycle.finished_summary(workdir, total, found[1]["step"]) if found else None
    if done_before is not None:
        # Starting a finished run again changes nothing: it says so and shows its result.
        if be.is_main:
            print(f"run complete: {workdir} already finished its {total} steps; nothing to do "
                  f"(a larger --config.steps continues it)\nsummary: {lifecycle.fmt(done_before)}",
                  flush=True)
        return done_before
    if be.is_main and os.path.isdir(workdir):
        workdir_lock.acquire(workdir)        # refused now if another run uses it (taken again below)

    built = setup.build_train(total, steps_per_epoch)
    state, shard = built.state, built.shard
    log.info("rank %d: optimizer state %d bytes, trainable parameters %d bytes (sharding=%s, "
             "%d rank(s))", be.rank, *sharding_lib.persistent_bytes(state, built.trainable),
             c.sharding if shard is not None else "none", be.world_size)

    start = 0
    if found is not None:
        path, meta = found
        if meta.get("fingerprint") != fingerprint(c):
            raise ckpt.CheckpointError(
                f"{path} was written by another experiment (task/model differ); "
                f"use a new --workdir")
        frozen_lib.check_resume(meta.get("frozen_networks"), setup.frozen_record, path)
        # Checkpoints hold the whole state: any number of ranks, sharded or not, resumes.
        (shard.restore_into if shard is not None else ckpt.restore_into)(state, path)
        start = meta["step"]
        pipeline.check_resume(c, be.world_size, meta.get("data_position"))
        log.info("resumed from %s at step %d", path, start)
    if start >= total:
        log.info("already trained %d/%d steps", start, total)

    fns = built.fns
    loader, train_ds, _ = pipeline.train_loader(c, be, task, start, total)
    eval_split = _eval_split(c, task)
    num_classes = c.model.get("num_classes", 0)
    if num_classes and len(train_ds.classes) < num_classes:
        log.warning("%s has %d classes but config.model.num_classes=%d: the other %d outputs are "
                    "never a target", train_ds.root, len(train_ds.classes), num_classes,
                    num_classes - len(train_ds.classes))
    if be.is_main:
        # The data is there: now the run's directory gets its files.
        os.makedirs(workdir, exist_ok=True)
        workdir_lock.acquire(workdir)                # one run per workdir
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=1, sort_keys=True))
        metrics_lib.write_json(os.path.join(workdir, CLASSES), list(train_ds.classes))  # mim.predict
        print(lifecycle.banner(
            device=str(be.device) + (f" (compute threads {torch.get_num_threads()}, data workers "
                                     f"{c.data.num_workers})" if be.device.type == "cpu" else ""),
            precision=c.precision, world=be.world_size, train_images=n_train,
            train_classes=len(train_ds.classes), eval_split=eval_split, batch=c.batch_size,
            grad_accum=c.grad_accum, total=total, steps_per_epoch=steps_per_epoch, start=start,
            workdir=workdir), flush=True)
    writer = metrics_lib.Writer(workdir, enabled=be.is_main, resume_step=start)
    eval_every = c.eval_every or steps_per_epoch
    ckpt_every = c.checkpoint_every or steps_per_epoch
    hooks = task.hooks(setup, writer) if hasattr(task, "hooks") else None
    last_checkpoint = {"path": found[0] if found else None}

    def save(step_done: int):
        # Never checkpoint a state whose last loss was not finite: the last good
        # checkpoint must survive a divergence (one host sync per checkpoint).
        bad = streak.clone()
        if be.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            log.warning("not checkpointing step %d: the loss was not finite", step_done)
            return
        # Sharded slices are gathered by every rank; only rank 0 writes.
        whole = shard.full_state(state) if shard is not None else state
        if be.is_main:
            last_checkpoint["path"] = ckpt.save(
                setup.ckpt_root, step_done, whole,
                {"fingerprint": fingerprint(c), "epoch": step_done / steps_per_epoch,
                 "frozen_networks": setup.frozen_record,
                 "data_position": pipeline.data_position(c, be.world_size, step_done, steps_per_epoch),
                 "seed": c.seed, "config": json.loads(c.to_json_best_effort())},
                c.keep_checkpoints)
            log.info("checkpoint of step %d written: %s", step_done, last_checkpoint["path"])
        if be.distributed:
            dist.barrier()

    sums: Dict[str, torch.Tensor] = {}
    count = 0
    streak = torch.zeros((), device=be.device)
    t_log = time.perf_counter()
    t_start = t_log
    data_time = 0.0
    images = 0
    skipped_total = 0
    last_metrics: Dict[str, float] = {}
    eval_metrics: Dict[str, float] = {}
    done = start
    local_batch = c.batch_size // be.world_size
    views = tasks.image_keys(task, c, train=True)
    with lifecycle.Stopper() as stopper:
        t_data = time.perf_counter()
        for step_i, batch in enumerate(loader if stopper.signal is None else (), start):
            data_time += time.perf_counter() - t_data
            batch = pipeline.to_device(batch, be.device, c.data, views=views)
            skipped = batch.pop("skipped")
            torch.manual_seed(backend_lib.seed_step(c.seed, step_i, be.rank))
            state, m = fns.train_step(state, batch)
            finite = torch.isfinite(m["loss"])
            streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
            m = dict(m, skipped_images=skipped.float())
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            count += 1
            images += local_batch
            done = step_i + 1
            if hooks is not None and hooks.due(done):
                hooks.after_step(done, built.params(), batch, m)
            if done % c.log_every == 0 or done == total:
                avg = reduce_mean({k: v / count for k, v in sums.items()}, be)
                # a count over the window and the ranks, not a mean
                avg["skipped_images"] = int(round(avg["skipped_images"] * count * be.world_size))
                skipped_total += avg["skipped_images"]
                if streak.item() >= c.max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"the loss was not finite for {int(streak.item())} consecutive steps at step "
                        f"{done}; the last good checkpoint in {setup.ckpt_root} is kept")
                be.synchronize()
                now = time.perf_counter()
                img_s = images / (now - t_log)
                avg["img_s_per_device"] = img_s
                avg["data_wait_s"] = data_time / count
                eta = (now - t_start) / max(done - start, 1) * (total - done)
                if be.is_main:
                    writer.write(done, avg)
                    print(metrics_lib.progress_line(done, total, avg, img_s * be.world_size,
                                                    data_time / count, eta), flush=True)
                last_metrics = avg
                sums, count, images, data_time = {}, 0, 0, 0.0
                t_log = time.perf_counter()
            if hasattr(task, "evaluate") and (done % eval_every == 0 or done == total):
                eval_metrics = evaluate_all(setup, built.params(), state["model_state"])
                ema_params = built.ema_params()
                if ema_params is not None:  # the average beside the raw weights: eval/ema_*
                    ema_metrics = evaluate(setup, ema_params, state["model_state"])
                    eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
                if be.is_main:
                    writer.write(done, eval_metrics, prefix="eval")
                    print("eval step %d: %s" % (done, lifecycle.fmt(eval_metrics)), flush=True)
            if c.knn_every and (done % c.knn_every == 0 or done == total):
                knn_metrics = knn.evaluate(setup, built.params(), state["model_state"])
                if be.is_main:
                    writer.write(done, knn_metrics, prefix="knn")
                    print("k-NN step %d: %s" % (done, lifecycle.fmt(knn_metrics)), flush=True)
                eval_metrics = dict(eval_metrics, **{f"knn_{k}": v for k, v in knn_metrics.items()})
            if done % ckpt_every == 0 or done == total:
                save(done)
            stopping = stopper.signal is not None
            if be.distributed:
                # Every rank must stop at the same step (saving is collective): a signal
                # that reached any rank takes effect at the next log step, on all of them.
                if done % c.log_every == 0 or done == total:
                    flag = torch.tensor(float(stopping), device=be.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = flag.item() > 0
                else:
                    stopping = False
            if stopping and done < total:
                if done % ckpt_every:
                    save(done)
                log.warning("rank %d: stopped by signal %s after step %d", be.rank,
                            stopper.name or "on another rank", done)
                break
            t_data = time.perf_counter()
        stopped = done < total
        signal_name = stopper.name or "a signal on another rank"
        # Still under the Stopper: a second Ctrl-C while the summary and curves are written
        # exits at once, as during the steps.
        elapsed = time.perf_counter() - t_start
        steps_run = done - start
        summary = {"status": lifecycle.STOPPED if stopped else lifecycle.FINISHED, "steps": done,
                   "total_steps": total,
                   "img_s_per_device": steps_run * local_batch / max(elapsed, 1e-9),
                   "final_loss": last_metrics.get("loss", float("nan")),
                   "skipped_images": skipped_total,
                   **{f"eval_{k}": v for k, v in eval_metrics.items()}}
        if be.is_main:
            writer.close()
            summary.update(write_report(task, c, workdir, eval_metrics))   # a probe grid's heads
            print("summary: " + lifecycle.fmt({k: v for k, v in summary.items() if not k.startswith("probe_")}),
                  flush=True)
            lifecycle.write_summary(workdir, summary)
            plot.write_curves(workdir)
            if stopped:
                print(f"stopped by {signal_name} after step {done} of {total}; checkpoint "
                      f"{last_checkpoint['path']}. Resume with the same command:\n  "
                      f"{lifecycle.resume_command()}", flush=True)
    return summary
