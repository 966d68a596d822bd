"""The training loop and the evaluation-only mode, for every task."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Dict

import torch
import torch.distributed as dist

from mim import backend as backend_lib
from mim import config as config_lib
from mim import checkpoints, optim, tasks, tree
from mim.checkpoints import io as ckpt
from mim.checkpoints import weights
from mim.data import pipeline
from mim.train import frozen as frozen_lib
from mim.train import knn
from mim.train import metrics as metrics_lib
from mim.train import sharding as sharding_lib
from mim.train import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def fingerprint(config) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {"task": config.task, "model": json.loads(config.model.to_json())}


def reduce_mean(values: Dict[str, torch.Tensor], be) -> Dict[str, float]:
    names = sorted(values)
    if not names:
        return {}
    v = torch.stack([values[n].float() for n in names])
    if be.distributed:
        dist.all_reduce(v)
        v /= be.world_size
    return dict(zip(names, v.tolist()))


def schedule_for(config, total_steps: int, steps_per_epoch: int):
    lr = config_lib.learning_rate(config)
    o = config.optim
    warmup = o.warmup_steps or int(round(o.warmup_epochs * steps_per_epoch))
    if o.schedule == "cosine":
        return optim.warmup_cosine(lr, total_steps, warmup, o.min_lr, o.warmup_init_lr)
    return optim.warmup_constant(lr, warmup, o.warmup_init_lr)


@dataclasses.dataclass
class Built:
    """What a run trains with: the train state and its step (shared by the loop and
    :mod:`mim.bench`)."""
    state: dict
    fns: step_lib.StepFns
    groups: list
    trainable: list
    opt: object
    shard: object

    def params(self) -> dict:
        """The whole parameter tree (gathered from the shards under FSDP: every rank
        must call it then)."""
        if self.shard is None:
            return self.state["params"]
        return self.shard.full_params(self.state["params"], self.shard.backend.param_dtype)


class Setup:
    """Everything a run builds before its first step."""

    def __init__(self, config, workdir: str):
        world = int(os.environ.get("WORLD_SIZE", 1))
        config_lib.validate(config, world)
        self.config, self.workdir = config, workdir
        self.be = backend_lib.setup(config.device, config.precision, config.compile)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.task = tasks.get(config.task)
        self.ckpt_root = os.path.join(workdir, "checkpoints")
        self._frozen = None

    @property
    def frozen(self) -> dict:
        """The task's frozen networks on the device, loaded on first use."""
        if self._frozen is None:
            self._frozen = frozen_lib.load(self.task, self.config, self.be)
        return self._frozen[0]

    @property
    def frozen_record(self) -> dict:
        self.frozen  # noqa: B018 - loads them
        return self._frozen[1]

    def input_keys(self, train: bool = True):
        return tuple(tasks.image_keys(self.task, self.config, train))

    def loss_fn(self):
        c, task, frozen = self.config, self.task, self.frozen
        return lambda p, s, b, t: task.loss(p, s, b, c, t, frozen)

    def state_hooks(self, total_steps: int) -> dict:
        """The task's once-per-optimizer-step state updates, bound to the run."""
        c, task = self.config, self.task
        out = {}
        for when in ("before", "after"):
            fn = getattr(task, f"update_state_{when}_step", None)
            if fn is not None:
                out[f"{when}_step"] = (lambda f: lambda p, s, k: f(p, s, k, total_steps, c))(fn)
        return out

    def init_params(self):
        c = self.config
        params, model_state = self.task.init(c, torch.Generator().manual_seed(c.seed))
        if c.init.checkpoint:
            params = self.load_init(params)
        return params, model_state

    def build_train(self, total_steps: int, steps_per_epoch: int, backend=None) -> Built:
        """Parameters (from ``init`` or ``init.checkpoint``), parameter groups, optimizer,
        train state and step. ``backend`` overrides the run's (e.g. an eager copy)."""
        c, task = self.config, self.task
        be = backend or self.be
        params, model_state = self.init_params()
        rules = task.param_rules(c)
        flat = tree.flatten(params)
        trainable = optim.trainable_names(list(flat), list(rules.frozen) + list(c.optim.frozen))
        if not trainable:
            raise config_lib.ConfigError("config.optim.frozen: every parameter is frozen")
        groups = optim.make_groups(
            {n: flat[n].shape for n in trainable}, weight_decay=c.optim.weight_decay,
            no_decay_patterns=rules.no_decay, layer_decay=c.optim.layer_decay,
            layer_id=rules.layer_id, num_layers=rules.num_layers,
            lr_multipliers=[tuple(x) for x in c.optim.lr_multipliers])
        opt = optim.create(c.optim.name, c.optim)
        shard = sharding_lib.create(c.sharding, trainable, be)
        state = step_lib.create_state(params, model_state, opt, trainable, be, sharding=shard)
        fns = step_lib.build(self.loss_fn(), opt, groups,
                             schedule_for(c, total_steps, steps_per_epoch), be,
                             grad_accum=c.grad_accum, clip_grad=c.optim.clip_grad or None,
                             sharding=shard, cuda_graphs=c.cuda_graphs,
                             input_keys=self.input_keys(), **self.state_hooks(total_steps))
        return Built(state, fns, groups, trainable, opt, shard)

    def load_init(self, params):
        """Start from ``init.checkpoint``: a mim checkpoint, or an official one through
        ``mim.checkpoints.<init.format>.load_for_finetune(params, path, model_cfg)``."""
        c = self.config
        if c.init.format == "mim":
            return weights.merge_into(params, weights.mim_params(c.init.checkpoint),
                                      source=c.init.checkpoint)
        return checkpoints.get(c.init.format).load_for_finetune(params, c.init.checkpoint, c.model)


def evaluate(setup: Setup, params, model_state, loader=None) -> Dict[str, float]:
    c, be, task = setup.config, setup.be, setup.task
    if loader is None:
        loader, _ = pipeline.eval_loader(c, be, task)
    sums: Dict[str, torch.Tensor] = {}
    views = tasks.image_keys(task, c, train=False)
    keys = tuple(views)
    with torch.no_grad():
        for batch in loader:
            batch = pipeline.to_device(batch, be.device, c.data, train=False, views=views)
            batch = be.cast_inputs(batch, keys)
            with be.autocast():
                out = task.evaluate(params, model_state, batch, c, setup.frozen)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.double()
    names = sorted(sums)
    if be.distributed:
        # A rank whose share of a small split is empty has no sums: agree on the names.
        everyone = [None] * be.world_size
        dist.all_gather_object(everyone, names)
        names = sorted(set().union(*everyone))
    if not names:
        return _classification_summary({})
    v = torch.stack([sums[n] if n in sums else torch.zeros((), dtype=torch.float64, device=be.device)
                     for n in names])
    if be.distributed:
        dist.all_reduce(v)
    s = dict(zip(names, v.tolist()))
    return task.summarize(s) if hasattr(task, "summarize") else _classification_summary(s)


def _classification_summary(s):
    n = max(s.get("count", 0), 1)
    out = {"count": int(s.get("count", 0))}
    if "correct1" in s:
        out["acc1"] = 100.0 * s["correct1"] / n
        out["acc5"] = 100.0 * s["correct5"] / n
    if "loss_sum" in s:
        out["loss"] = s["loss_sum"] / n
    return out


def train(config, workdir: str) -> Dict[str, float]:
    setup = Setup(config, workdir)
    c, be, task = setup.config, setup.be, setup.task
    if be.is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(c.to_json_best_effort(indent=1, sort_keys=True))

    n_train = pipeline.num_train_images(c)
    steps_per_epoch = max(n_train // c.batch_size, 1)
    total = c.steps or max(int(round(c.epochs * steps_per_epoch)), 1)

    built = setup.build_train(total, steps_per_epoch)
    state, shard = built.state, built.shard
    log.info("rank %d: optimizer state %d bytes, trainable parameters %d bytes (sharding=%s, "
             "%d rank(s))", be.rank, *sharding_lib.persistent_bytes(state, built.trainable),
             c.sharding if shard is not None else "none", be.world_size)

    start = 0
    found = ckpt.latest(setup.ckpt_root)
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
        log.info("resumed from %s at step %d", path, start)
    if start >= total:
        log.info("already trained %d/%d steps", start, total)

    fns = built.fns
    loader, train_ds, _ = pipeline.train_loader(c, be, task, start, total)
    writer = metrics_lib.Writer(workdir, enabled=be.is_main)
    eval_every = c.eval_every or steps_per_epoch
    ckpt_every = c.checkpoint_every or steps_per_epoch
    hooks = task.hooks(setup, writer) if hasattr(task, "hooks") else None

    stop = {"signal": None}

    def on_term(signum, frame):
        stop["signal"] = signum

    old = signal.signal(signal.SIGTERM, on_term)

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
            ckpt.save(setup.ckpt_root, step_done, whole,
                      {"fingerprint": fingerprint(c), "epoch": step_done / steps_per_epoch,
                       "frozen_networks": setup.frozen_record,
                       "data_position": {"step": step_done, "steps_per_epoch": steps_per_epoch},
                       "seed": c.seed, "config": json.loads(c.to_json_best_effort())},
                      c.keep_checkpoints)
        if be.distributed:
            dist.barrier()

    sums: Dict[str, torch.Tensor] = {}
    count = 0
    streak = torch.zeros((), device=be.device)
    t_log = time.perf_counter()
    t_start = t_log
    data_time = 0.0
    images = 0
    last_metrics: Dict[str, float] = {}
    eval_metrics: Dict[str, float] = {}
    step_i = start
    t_data = time.perf_counter()
    local_batch = c.batch_size // be.world_size
    views = tasks.image_keys(task, c, train=True)
    for step_i, batch in enumerate(loader, start):
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
            avg["skipped_images"] *= count  # a count, not a mean
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
            eval_metrics = evaluate(setup, built.params(), state["model_state"])
            if be.is_main:
                writer.write(done, eval_metrics, prefix="eval")
                print("eval step %d: %s" % (done, _fmt(eval_metrics)), flush=True)
        if c.knn_every and (done % c.knn_every == 0 or done == total):
            knn_metrics = knn.evaluate(setup, built.params(), state["model_state"])
            if be.is_main:
                writer.write(done, knn_metrics, prefix="knn")
                print("k-NN step %d: %s" % (done, _fmt(knn_metrics)), flush=True)
            eval_metrics = dict(eval_metrics, **{f"knn_{k}": v for k, v in knn_metrics.items()})
        if done % ckpt_every == 0 or done == total:
            save(done)
        stopping = stop["signal"] is not None
        if be.distributed:
            # Every rank must stop at the same step (saving is collective): a signal
            # that reached any rank takes effect at the next log step, on all of them.
            if done % c.log_every == 0 or done == total:
                flag = torch.tensor(float(stopping), device=be.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = flag.item() > 0
            else:
                stopping = False
        if stopping:
            save(done)
            log.warning("stopped by signal %s after step %d; checkpoint written", stop["signal"], done)
            break
        t_data = time.perf_counter()

    signal.signal(signal.SIGTERM, old)
    elapsed = time.perf_counter() - t_start
    steps_run = max(step_i + 1 - start, 0) if total > start else 0
    summary = {"steps": total, "img_s_per_device": steps_run * local_batch / max(elapsed, 1e-9),
               "final_loss": last_metrics.get("loss", float("nan")), **{f"eval_{k}": v for k, v in eval_metrics.items()}}
    if be.is_main:
        writer.close()
        print("summary: " + _fmt(summary), flush=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def load_for_eval(setup: Setup):
    """``(params, model_state, source)`` on the device: ``init.checkpoint`` or the workdir's
    latest checkpoint."""
    c, be = setup.config, setup.be
    params, model_state = setup.task.init(c, torch.Generator().manual_seed(c.seed))
    if c.init.checkpoint:
        params = setup.load_init(params)
        source = c.init.checkpoint
    else:
        found = ckpt.latest(setup.ckpt_root)
        if found is None:
            raise FileNotFoundError(f"mode={c.mode} needs --config.init.checkpoint or a checkpoint in "
                                    f"{setup.ckpt_root}")
        source = found[0]
        saved = ckpt.load_tensors(source)
        params = weights.merge_into(params, {k[7:]: v for k, v in saved.items() if k.startswith("params.")},
                                    source=source)
        ms = {k[12:]: v for k, v in saved.items() if k.startswith("model_state.")}
        if ms:
            model_state = tree.unflatten(ms)
    return tree.to(params, be.device), tree.to(model_state, be.device), source


def evaluate_only(config, workdir: str) -> Dict[str, float]:
    """``--config.mode=eval``: evaluate ``init.checkpoint`` or the workdir's latest
    checkpoint on the eval split and print Acc@1 / Acc@5, as the references' eval scripts."""
    setup = Setup(config, workdir)
    params, model_state, source = load_for_eval(setup)
    result = evaluate(setup, params, model_state)
    if setup.be.is_main:
        print(f"* Acc@1 {result.get('acc1', float('nan')):.3f} Acc@5 {result.get('acc5', float('nan')):.3f} "
              f"loss {result.get('loss', float('nan')):.4f} ({result['count']} images, {source})", flush=True)
    return result


def knn_only(config, workdir: str) -> Dict[str, float]:
    """``--config.mode=knn``: weighted k-NN accuracy (:mod:`mim.train.knn`) of the encoder
    features of ``init.checkpoint`` or the workdir's latest checkpoint."""
    setup = Setup(config, workdir)
    params, model_state, source = load_for_eval(setup)
    result = knn.evaluate(setup, params, model_state)
    if setup.be.is_main:
        print(f"* k-NN (k={config.knn.k}, T={config.knn.temperature}) Acc@1 {result['acc1']:.3f}"
              + (f" Acc@5 {result['acc5']:.3f}" if "acc5" in result else "")
              + f" ({result['count']} images against {result['train_images']}, {source})", flush=True)
    return result


def _fmt(d):
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())
