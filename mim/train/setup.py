"""What a run builds before its first step (:class:`Setup`: backend, task, frozen
networks, initial parameters, train state and step), shared by training, evaluation and
:mod:`mim.bench`."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from mim import backend as backend_lib
from mim import checkpoints, optim, schedules, tasks, tree
from mim import config as config_lib
from mim.checkpoints import io as ckpt
from mim.checkpoints import registry, weights
from mim.train import frozen as frozen_lib
from mim.train import sharding as sharding_lib
from mim.train import step as step_lib

log = logging.getLogger(__name__)


def fingerprint(config) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {"task": config.task, "model": json.loads(config.model.to_json())}


def schedule_for(config, total_steps: int, steps_per_epoch: int) -> schedules.Schedule:
    """The run's :class:`mim.schedules.Schedule`, counted as its reference counts: optimizer
    steps (MAE, BEiT, ViT-pytorch), micro-batches (Swin-family timm schedulers: ``A``
    micro-batches per optimizer step) or epochs (BEiT's linear probe)."""
    lr = config_lib.learning_rate(config)
    o, accum = config.optim, config.grad_accum
    name = o.schedule
    if name == "cosine":  # MAE's fractional epochs: the warm-up length is not rounded
        warmup = float(o.warmup_steps) if o.warmup_steps else o.warmup_epochs * steps_per_epoch
        out = schedules.mae_cosine(lr, total_steps, warmup, o.min_lr, o.warmup_init_lr)
    elif name in ("timm_cosine", "timm_multistep"):
        # build_scheduler: int(EPOCHS * n_iter_per_epoch), int(WARMUP_EPOCHS * ...) with
        # n_iter_per_epoch = len(data_loader), in micro-batches
        micro_per_epoch = steps_per_epoch * accum
        warmup = o.warmup_steps * accum if o.warmup_steps else int(o.warmup_epochs * micro_per_epoch)
        if name == "timm_cosine":
            out = schedules.timm_cosine(lr, total_steps * accum, warmup, o.min_lr,
                                        o.warmup_init_lr, accum)
        else:
            milestones = [int(m * micro_per_epoch) for m in o.milestones]
            out = schedules.timm_multistep(lr, milestones, o.gamma, warmup, o.warmup_init_lr, accum)
    else:
        warmup = o.warmup_steps or int(round(o.warmup_epochs * steps_per_epoch))
        if name == "beit_cosine":
            out = schedules.beit_cosine(lr, total_steps, warmup, o.min_lr, o.warmup_init_lr)
        elif name == "vit_cosine":
            out = schedules.vit_cosine(lr, total_steps, warmup, o.warmup_init_lr)
        elif name == "epoch_cosine":
            epochs = max(int(round(total_steps / max(steps_per_epoch, 1))), 1)
            out = schedules.epoch_cosine(lr, epochs, steps_per_epoch, o.min_lr)
        else:
            out = schedules.warmup_constant(lr, warmup, o.warmup_init_lr)
    if o.weight_decay_end is not None:
        out = schedules.with_weight_decay(out, o.weight_decay, o.weight_decay_end, total_steps)
    return out


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

    def ema_params(self):
        """The whole parameter tree with the trainable weights replaced by their average
        (``config.ema``), or None without one."""
        if "ema" not in self.state:
            return None
        return ema_tree(self.params(), self.state["ema"])


def ema_tree(params: dict, ema: dict) -> dict:
    """``params`` with the averaged names replaced by the (fp32) average, in the dtype of
    the parameters they stand for."""
    flat = tree.flatten(params)
    return tree.unflatten({**flat, **{n: v.to(flat[n].dtype) for n, v in ema.items()}})


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
            self._frozen = frozen_lib.load(self.task, self.config, self.be, self.workdir)
        return self._frozen[0]

    @property
    def frozen_record(self) -> dict:
        self.frozen  # noqa: B018 - loads them
        return self._frozen[1]

    def input_keys(self, train: bool = True):
        return tuple(tasks.image_keys(self.task, self.config, train))

    def loss_fn(self, config_of=None):
        """The task's loss, bound to the run. ``config_of()``, if given, is the config the
        loss reads at each call (a vectorized run's view of each member's own scalars,
        :mod:`mim.train.members`)."""
        c, task, frozen = self.config, self.task, self.frozen
        if config_of is None:
            return lambda p, s, b, t: task.loss(p, s, b, c, t, frozen)
        return lambda p, s, b, t: task.loss(p, s, b, config_of(), t, frozen)

    def state_hooks(self, total_steps: int, config_of=None) -> dict:
        """The task's once-per-optimizer-step state updates, bound to the run
        (``config_of``: as for :meth:`loss_fn`)."""
        c, task = self.config, self.task
        config_of = config_of or (lambda: c)
        out = {}
        for when in ("before", "after"):
            fn = getattr(task, f"update_state_{when}_step", None)
            if fn is not None:
                out[f"{when}_step"] = (lambda f: lambda p, s, k: f(p, s, k, total_steps, config_of()))(fn)
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
            lr_multipliers=[tuple(x) for x in c.optim.lr_multipliers] + list(rules.lr_multipliers),
            exempt_1d=c.optim.exempt_1d, weight_decay_rules=rules.weight_decays)
        opt = optim.create(c.optim.name, c.optim)
        shard = sharding_lib.create(c.sharding, trainable, be)
        state = step_lib.create_state(params, model_state, opt, trainable, be, sharding=shard,
                                      ema=c.ema.decay > 0)
        fns = step_lib.build(self.loss_fn(), opt, groups,
                             schedule_for(c, total_steps, steps_per_epoch), be,
                             grad_accum=c.grad_accum, clip_grad=c.optim.clip_grad or None,
                             clip_mode=c.optim.clip_mode,
                             sharding=shard, cuda_graphs=c.cuda_graphs,
                             input_keys=self.input_keys(), ema_decay=c.ema.decay,
                             ema_warmup=c.ema.warmup, **self.state_hooks(total_steps))
        return Built(state, fns, groups, trainable, opt, shard)

    def load_init(self, params):
        """Start from ``init.checkpoint``: a mim checkpoint, or an official one through
        ``mim.checkpoints.<init.format>.load_for_finetune(params, path, model_cfg)``.

        A mim workdir or step folder of a run of this same model is read as a mim checkpoint
        whatever ``init.format`` says (its ``params.*`` only, not the optimizer state);
        one of another model (a pretraining run) goes to the format's loader. Logs which
        parameters were loaded and which keep their fresh initialisation."""
        c = self.config
        path = registry.resolve(c.init.checkpoint)      # an official checkpoint's name too
        step_dir = mim_step_dir(path)
        same_model = step_dir is not None and _saved_model(step_dir) == json.loads(c.model.to_json())
        if c.init.format == "mim" or same_model:
            if step_dir is None:
                raise FileNotFoundError(f"init.checkpoint={path}: not a mim checkpoint (a step_* "
                                        f"folder with {ckpt.META}, or a workdir with checkpoints/)")
            out = weights.merge_into(params, weights.read_source(step_dir), source=step_dir)
            how = "mim checkpoint"
        else:
            loader = checkpoints.get(c.init.format)
            # a mim folder's train state also holds the optimizer's: hand over its params only
            source = weights.read_source(step_dir) if step_dir is not None and c.init.format == "timm" else path
            try:
                out = loader.load_for_finetune(params, source, c.model)
            except (ValueError, KeyError) as e:
                if step_dir is None:
                    raise
                saved = (_saved_model(step_dir) or {}).get("name")
                # the loader's own message can hold a whole state dict: say what happened instead
                why = "its keys do not match" if isinstance(e, KeyError) or "tensor(" in str(e) \
                    else " ".join(str(e).split())[:160]
                raise config_lib.ConfigError(
                    f"init.checkpoint={c.init.checkpoint} is a mim run of a {saved!r} model; "
                    f"init.format={c.init.format} cannot start this {c.model.get('name')!r} model "
                    f"from it ({why})") from e
            how = f"init.format={c.init.format}"
        fresh, got = tree.flatten(params), tree.flatten(out)
        new = [k for k in fresh if got[k] is fresh[k] or torch.equal(got[k], fresh[k])]
        log.info("init.checkpoint %s (%s): loaded %d of %d parameter tensors; newly initialised: %s",
                 step_dir or path, how, len(fresh) - len(new), len(fresh),
                 ", ".join(new) if new else "none")
        return out


def mim_step_dir(path: str):
    """The checkpoint folder a mim step folder or workdir names (a workdir: its newest
    checkpoint that verifies), else None."""
    if not path or not os.path.isdir(path):
        return None
    if os.path.exists(os.path.join(path, ckpt.META)):
        return path
    found = ckpt.latest(os.path.join(path, "checkpoints"))
    return found[0] if found else None


def _saved_model(step_dir: str):
    with open(os.path.join(step_dir, ckpt.META)) as f:
        return json.load(f).get("fingerprint", {}).get("model")
