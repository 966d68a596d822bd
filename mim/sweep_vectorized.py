"""``mim.sweep --vectorize``: the points (and seed members) of a sweep that differ only in
scalar fields trained as ONE run with a leading member axis (:mod:`mim.train.members`).

Each member's workdir gets what its separate run (:func:`mim.train.loop.train`) writes:
``config.json``, ``classes.json``, ``metrics.jsonl`` and TensorBoard events, checkpoints
(its own state only, with the same metadata), evaluations, ``summary.json`` and
``curves.png``; so ``results.csv``, ``--then`` stages and a later run without
``--vectorize`` read it as any other point. Starting the same command again resumes every
member from the newest step all of them checkpointed.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from mim import backend as backend_lib
from mim import plot, tasks
from mim.checkpoints import io as ckpt
from mim.data import pipeline
from mim.train import frozen as frozen_lib
from mim.train import knn, lifecycle, loop
from mim.train import members as members_lib
from mim.train import metrics as metrics_lib
from mim.train import workdir_lock
from mim.train.evaluation import evaluate, evaluate_all, write_report
from mim.train.setup import ema_tree, fingerprint

log = logging.getLogger(__name__)


def common_checkpoint(roots: Sequence[str]) -> Optional[int]:
    """The newest step every member has a verified checkpoint of (None: start afresh)."""
    steps = None
    for root in roots:
        mine = set()
        for step, path in ckpt.list_steps(root):
            try:
                ckpt.verify(path)
                mine.add(step)
            except ckpt.CheckpointError as e:
                log.error("ignoring corrupt checkpoint: %s", e)
        steps = mine if steps is None else steps & mine
    return max(steps) if steps else None


def _member_metrics(m: Dict[str, torch.Tensor], k: int, config) -> Dict[str, torch.Tensor]:
    """Member ``k``'s metrics, with the keys its separate run logs."""
    out = {n: v[k] for n, v in m.items()}
    if config.optim.weight_decay_end is None:
        out.pop("weight_decay", None)  # logged by the step only where some member schedules it
    return out


def run_sweep(runs: Sequence, workdir: str, shard=(0, 1)) -> None:
    """``mim.sweep --vectorize``: this launcher's unfinished pretraining runs (``runs`` as
    :func:`mim.sweep.plan` lists them; every seed of every point) as one vectorized run.
    The sweep then finds them finished and runs their ``--then`` stages as usual. Runs
    that differ in a field members cannot are refused (:func:`mim.train.members.check`)."""
    from mim import sweep
    index, count = shard
    todo = [(label, os.path.join(workdir, rel), c) for j, (label, rel, c, _, _) in enumerate(runs)
            if j % count == index and c is not None
            and not sweep.is_finished(os.path.join(workdir, rel))]
    if len(todo) < 2:
        return      # nothing to vectorize: the sweep runs it as usual
    for _, run_dir, c in todo:
        sweep.check_same_config(c, run_dir)
    members_lib.check([c for _, _, c in todo], int(os.environ.get("WORLD_SIZE", 1)))
    print(f"[{index}/{count}] {len(todo)} runs vectorized: {', '.join(l for l, _, _ in todo)}",
          flush=True)
    train([c for _, _, c in todo], [d for _, d, _ in todo])
    if not all(sweep.is_finished(d) for _, d, _ in todo):
        raise sweep.Stopped("the vectorized runs stopped before their last step; start the sweep "
                            "again to resume")


def train(configs: Sequence, workdirs: Sequence[str]) -> List[dict]:
    """Train the members together; returns each member's summary."""
    try:
        return _train(list(configs), list(workdirs))
    finally:
        for w in workdirs:
            workdir_lock.release(os.path.join(w, workdir_lock.LOCK), os.getpid())


def _train(configs: list, workdirs: list) -> List[dict]:
    c0, K = configs[0], len(configs)
    world = int(os.environ.get("WORLD_SIZE", 1))
    members_lib.check(configs, world)
    n_train = pipeline.num_train_images(c0)
    steps_per_epoch = max(n_train // c0.batch_size, 1)
    total = c0.steps or max(int(round(c0.epochs * steps_per_epoch)), 1)
    roots = [os.path.join(w, "checkpoints") for w in workdirs]
    start = common_checkpoint(roots) or 0
    if start >= total:      # every member finished: as loop.train, nothing to do
        return [lifecycle.finished_summary(w, total, start) for w in workdirs]
    for w in workdirs:
        if os.path.isdir(w):
            workdir_lock.acquire(w)
    mem = members_lib.build(configs, workdirs, total, steps_per_epoch, world)
    setups, be, task = mem.setups, mem.setups[0].be, mem.setups[0].task
    if start:
        for k, (s, root) in enumerate(zip(setups, roots)):
            path = os.path.join(root, f"step_{start:08d}")
            meta = ckpt.verify(path)
            if meta.get("fingerprint") != fingerprint(s.config):
                raise ckpt.CheckpointError(f"{path} was written by another experiment (task/model "
                                           f"differ); use a new --workdir")
            frozen_lib.check_resume(meta.get("frozen_networks"), s.frozen_record, path)
            ckpt.restore_into(members_lib.member(mem.state, k), path)
            pipeline.check_resume(s.config, 1, meta.get("data_position"))
        log.info("resumed %d members at step %d", K, start)

    loaders = []
    for k, c in enumerate(configs):
        loader, train_ds, _ = pipeline.train_loader(c, be, task, start, total)
        loaders.append(loader)
        os.makedirs(workdirs[k], exist_ok=True)
        workdir_lock.acquire(workdirs[k])
        with open(os.path.join(workdirs[k], "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=1, sort_keys=True))
        metrics_lib.write_json(os.path.join(workdirs[k], loop.CLASSES), list(train_ds.classes))
    print(lifecycle.banner(
        device=f"{be.device} ({K} members vectorized: {', '.join(mem.differing) or 'identical'} "
               f"differ)", precision=c0.precision, world=1, train_images=n_train,
        train_classes=len(train_ds.classes), eval_split=loop._eval_split(c0, task),
        batch=c0.batch_size, grad_accum=c0.grad_accum, total=total,
        steps_per_epoch=steps_per_epoch, start=start, workdir=os.path.dirname(workdirs[0])),
        flush=True)
    writers = [metrics_lib.Writer(w, resume_step=start) for w in workdirs]
    hooks = [task.hooks(s, wr) if hasattr(task, "hooks") else None for s, wr in zip(setups, writers)]
    eval_every = c0.eval_every or steps_per_epoch
    ckpt_every = c0.checkpoint_every or steps_per_epoch
    views = tasks.image_keys(task, c0, train=True)
    local_batch = c0.batch_size

    def state_of(k):
        return members_lib.member(mem.state, k)

    def save(step_done: int):
        bad = streak.tolist()
        for k, (s, c) in enumerate(zip(setups, configs)):
            if bad[k] > 0:
                log.warning("%s: not checkpointing step %d: the loss was not finite", workdirs[k], step_done)
                continue
            ckpt.save(s.ckpt_root, step_done, members_lib.member(mem.state, k, copy=True),
                      {"fingerprint": fingerprint(c), "epoch": step_done / steps_per_epoch,
                       "frozen_networks": s.frozen_record,
                       "data_position": pipeline.data_position(c, 1, step_done, steps_per_epoch),
                       "seed": c.seed, "config": json.loads(c.to_json_best_effort())},
                      c.keep_checkpoints)
        log.info("checkpoints of step %d written (%d members)", step_done, K)

    sums: Dict[str, torch.Tensor] = {}
    count, images, data_time, skipped_total = 0, 0, 0.0, [0] * K
    streak = torch.zeros(K, device=be.device)
    last = [{} for _ in range(K)]
    evals = [{} for _ in range(K)]
    t_log = t_start = time.perf_counter()
    done = start
    with lifecycle.Stopper() as stopper:
        t_data = time.perf_counter()
        for step_i, member_batches in enumerate(zip(*loaders) if stopper.signal is None else (), start):
            data_time += time.perf_counter() - t_data
            member_batches = [pipeline.to_device(b, be.device, c.data, views=views)
                              for b, c in zip(member_batches, configs)]
            skipped = torch.stack([b.pop("skipped").float() for b in member_batches])
            batch = members_lib.stack_batches(member_batches)
            torch.manual_seed(backend_lib.seed_step(c0.seed, step_i, 0))
            mem.state, m = mem.train_step(mem.state, batch)
            finite = torch.isfinite(m["loss"])
            streak = torch.where(finite, torch.zeros_like(streak), streak + 1)
            m = dict(m, skipped_images=skipped)
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            count += 1
            images += local_batch
            done = step_i + 1
            for k, h in enumerate(hooks):
                if h is not None and h.due(done):
                    h.after_step(done, state_of(k)["params"], member_batches[k],
                                 _member_metrics(m, k, configs[k]))
            if done % c0.log_every == 0 or done == total:
                if streak.max().item() >= c0.max_nonfinite_steps:
                    k = int(streak.argmax())
                    raise loop.NonFiniteLoss(
                        f"{workdirs[k]}: the loss was not finite for {int(streak[k])} consecutive "
                        f"steps at step {done}; the last good checkpoints are kept")
                now = time.perf_counter()
                img_s = images / (now - t_log)
                for k in range(K):
                    avg = {n: v.item() / count for n, v in _member_metrics(sums, k, configs[k]).items()}
                    avg["skipped_images"] = int(round(avg["skipped_images"] * count))
                    skipped_total[k] += avg["skipped_images"]
                    avg["img_s_per_device"] = img_s      # each member's images, on the shared device
                    avg["data_wait_s"] = data_time / count
                    writers[k].write(done, avg)
                    last[k] = avg
                eta = (now - t_start) / max(done - start, 1) * (total - done)
                print(f"[{K} members] " + metrics_lib.progress_line(
                    done, total, {n: v.mean().item() / count for n, v in sums.items()
                                  if n not in ("skipped_images",)}, img_s * K, data_time / count, eta),
                      flush=True)
                sums, count, images, data_time = {}, 0, 0, 0.0
                t_log = time.perf_counter()
            if hasattr(task, "evaluate") and (done % eval_every == 0 or done == total):
                for k, s in enumerate(setups):
                    st = state_of(k)
                    evals[k] = evaluate_all(s, st["params"], st["model_state"])
                    if "ema" in st:
                        e = evaluate(s, ema_tree(st["params"], st["ema"]), st["model_state"])
                        evals[k].update({f"ema_{n}": v for n, v in e.items()})
                    writers[k].write(done, evals[k], prefix="eval")
                    print("eval step %d, %s: %s" % (done, os.path.basename(workdirs[k]),
                                                    lifecycle.fmt(evals[k])), flush=True)
            if c0.knn_every and (done % c0.knn_every == 0 or done == total):
                for k, s in enumerate(setups):
                    st = state_of(k)
                    got = knn.evaluate(s, st["params"], st["model_state"])
                    writers[k].write(done, got, prefix="knn")
                    evals[k] = dict(evals[k], **{f"knn_{n}": v for n, v in got.items()})
            if done % ckpt_every == 0 or done == total:
                save(done)
            if stopper.signal is not None and done < total:
                if done % ckpt_every:
                    save(done)
                log.warning("stopped by signal %s after step %d", stopper.name, done)
                break
            t_data = time.perf_counter()
        stopped = done < total
        elapsed = time.perf_counter() - t_start
        summaries = []
        for k, (c, w) in enumerate(zip(configs, workdirs)):
            summary = {"status": lifecycle.STOPPED if stopped else lifecycle.FINISHED, "steps": done,
                       "total_steps": total,
                       "img_s_per_device": (done - start) * local_batch / max(elapsed, 1e-9),
                       "final_loss": last[k].get("loss", float("nan")),
                       "skipped_images": skipped_total[k], "vectorized_members": K,
                       **{f"eval_{n}": v for n, v in evals[k].items()}}
            writers[k].close()
            summary.update(write_report(task, c, w, evals[k]))
            lifecycle.write_summary(w, summary)
            plot.write_curves(w)
            summaries.append(summary)
        if stopped:
            print(f"stopped by {stopper.name} after step {done} of {total}; the same command "
                  f"resumes:\n  {lifecycle.resume_command()}", flush=True)
    return summaries
