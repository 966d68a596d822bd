"""The fields every experiment shares, and validation before any work starts.

An experiment file's ``get_config(arg)`` starts from :func:`base` and sets what its
recipe needs. Configs are locked: assigning an unknown field is an error, so a typo
in an experiment file or on the command line never passes silently.
"""
from __future__ import annotations

import ml_collections

from mim import backend, optim, schedules

MODES = ("train", "eval", "knn")
def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.mode = "train"              # "train"; "eval": evaluate init.checkpoint / the workdir's last; "knn": k-NN of its features
    c.seed = 0
    c.device = "auto"             # auto | cpu | cuda | npu
    c.precision = "fp32"          # fp32 | amp_bf16 | amp_fp16 | bf16 | fp16 (see mim.backend)
    c.compile = "auto"            # auto (CUDA only) | on | off
    c.cuda_graphs = False         # record the train step as a CUDA graph, replay it (mim.train.graphs)
    c.batch_size = 256            # global batch, over all ranks and accumulation steps
    c.grad_accum = 1
    c.eval_batch_size = 256       # global
    c.epochs = 1.0                # training length in epochs, or ...
    c.steps = 0                   # ... in steps when > 0 (wins over epochs)
    c.log_every = 50
    c.eval_every = 0              # steps; 0: at the end of each epoch
    c.checkpoint_every = 0        # steps; 0: at the end of each epoch
    c.keep_checkpoints = 3
    c.deterministic = False       # torch.use_deterministic_algorithms
    c.max_nonfinite_steps = 10    # stop after this many consecutive non-finite losses
    c.sharding = "none"           # none | fsdp: parameters, gradients, optimizer state sharded (mim.train.sharding)
    c.knn_every = 0               # steps between k-NN evaluations of the encoder's features; 0: off

    c.knn = ml_collections.ConfigDict()
    c.knn.k = 20                  # neighbours (Wu et al. 2018; DINO's and solo-learn's k-NN)
    c.knn.temperature = 0.07      # votes weighted by exp(cosine similarity / temperature)

    c.ema = ml_collections.ConfigDict()   # model EMA of the trainable weights (mim.train.ema)
    c.ema.decay = 0.0             # 0: off; e.g. 0.9999 (BEiT --model_ema_decay, timm --model-ema-decay)
    c.ema.warmup = False          # timm ModelEmaV3 use_warmup: decay 1 - (1 + t)^-2/3, up to ema.decay

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""        # a file to start from (format set by init.format)
    c.init.format = "timm"        # mim | timm | mae | swin (official layouts)

    c.model = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    d = c.data
    d.format = "folder"           # folder | wds (tar shards) | hf (Hugging Face datasets); docs/data.md
    d.path = ""                   # folder: root/<split>/<class>/*; wds: shard folder or pattern; hf: path or name
    d.eval_path = ""              # wds: the eval split's shard pattern when data.path is a pattern
    d.shuffle_buffer = 0          # wds, hf_streaming: samples in the shuffle buffer; 0: 1000
    d.hf_image_column = "image"   # hf: the image column (Image feature or file bytes)
    d.hf_label_column = "label"   # hf: the class-index column
    d.hf_streaming = False        # hf: read the dataset's shards as a stream (mim.data.streams)
    d.train_split = "train"
    d.eval_split = "val"
    d.num_workers = 2
    d.prefetch = 2
    d.device_normalize = False    # uint8 channels-last batches; normalise + random erasing on the device
    d.decode = "worker"           # worker (PIL) | device: JPEGs decoded, cropped, flipped on the device
    d.image_size = 224
    d.crop_scale = (0.08, 1.0)
    d.crop_ratio = (3 / 4, 4 / 3)
    d.hflip = 0.5
    d.color_jitter = 0.0
    d.blur_sigma = (0.1, 2.0)     # two-view SSL (MoBY) Gaussian blur's sigma range, px (BYOL's, at 224 px)
    d.auto_augment = ""           # e.g. "rand-m9-mstd0.5-inc1" (RandAugment, timm syntax)
    d.interpolation = "bicubic"
    d.re_prob = 0.0               # random erasing (Zhong et al. 2020)
    d.re_mode = "pixel"
    d.re_count = 1
    d.crop_pct = 0.875            # eval: resize to image_size / crop_pct, centre crop
    d.mean = (0.485, 0.456, 0.406)
    d.std = (0.229, 0.224, 0.225)
    d.mixup = 0.0
    d.cutmix = 0.0
    d.mixup_prob = 1.0
    d.mixup_switch_prob = 0.5
    d.label_smoothing = 0.0

    c.optim = ml_collections.ConfigDict()
    o = c.optim
    o.name = "adamw"              # adamw | sgd | lars
    o.lr = 0.0                    # absolute learning rate, or ...
    o.base_lr = 0.0               # ... lr = base_lr * batch_size / 256 (MAE, BEiT, SimMIM)
    o.min_lr = 0.0
    o.schedule = "cosine"         # the reference's lr schedule, as it steps it (mim.schedules):
                                  # cosine (MAE) | beit_cosine | timm_cosine (Swin, SimMIM, MoBY) |
                                  # timm_multistep (SimMIM 800 ep) | vit_cosine (ViT-pytorch) |
                                  # epoch_cosine (BEiT linear probe) | constant
    o.warmup_epochs = 0.0
    o.warmup_steps = 0            # wins over warmup_epochs when > 0
    o.warmup_init_lr = 0.0        # lr at step 0 of the linear warm-up (SimMIM's WARMUP_LR)
    o.milestones = ()             # timm_multistep: epochs where the lr is multiplied by gamma
    o.gamma = 0.1                 # timm_multistep: TRAIN.LR_SCHEDULER.GAMMA
    o.weight_decay = 0.0
    # BEiT --weight_decay_end: a cosine from weight_decay to this, per step, for the decaying
    # groups (None: constant weight_decay)
    o.weight_decay_end = ml_collections.FieldReference(None, field_type=float)
    o.exempt_1d = True            # 1-D tensors (biases, norms) get no weight decay; False: they do
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.momentum = 0.9
    o.nesterov = False
    o.clip_grad = 0.0             # max global grad norm; 0: off
    # step: clip the accumulated gradient once before the update (MAE, BEiT, ViT-pytorch);
    # micro_batch: clip the running sum after every micro-batch's backward (Swin, SimMIM, MoBY)
    o.clip_mode = "step"
    o.layer_decay = 1.0
    o.frozen = ()                 # regexes of parameter names not trained
    o.lr_multipliers = ()         # ((regex, factor), ...)
    return c


class ConfigError(ValueError):
    pass


def _check(cond: bool, field: str, msg: str):
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def _one_of(c, field, choices):
    value = c
    for part in field.split("."):
        value = value[part]
    _check(value in choices, field, f"{value!r} is not one of {tuple(choices)}")


def validate(c, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` naming the first wrong field."""
    from mim import tasks
    _one_of(c, "task", tasks.TASKS)
    _one_of(c, "mode", MODES)
    _one_of(c, "device", backend.DEVICES)
    _one_of(c, "precision", backend.PRECISIONS)
    _one_of(c, "compile", backend.COMPILE)
    _one_of(c, "optim.name", optim.OPTIMIZERS)
    _one_of(c, "optim.schedule", schedules.SCHEDULES)
    _one_of(c, "optim.clip_mode", ("step", "micro_batch"))
    from mim.checkpoints import FORMATS
    _one_of(c, "init.format", ("mim",) + tuple(FORMATS))
    _one_of(c, "sharding", ("none", "fsdp"))
    if c.cuda_graphs:
        _check(c.device in ("auto", "cuda"), "cuda_graphs", f"needs a CUDA device, not device={c.device}")
        _check(c.precision not in ("fp16", "amp_fp16"), "cuda_graphs",
               f"precision={c.precision} skips overflowing steps on the host; use bf16 or amp_bf16")
        _check(c.sharding == "none", "cuda_graphs", "sharding=fsdp gathers DTensors eagerly; use none")
    for f in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints",
              "max_nonfinite_steps"):
        _check(isinstance(c[f], int) and c[f] > 0, f, f"must be a positive integer, got {c[f]!r}")
    _check(isinstance(c.knn.k, int) and c.knn.k > 0, "knn.k", f"must be a positive integer, got {c.knn.k!r}")
    _check(0.0 <= c.ema.decay < 1.0, "ema.decay", f"must be in [0, 1) (0: off), got {c.ema.decay}")
    _check(c.ema.decay > 0 or not c.ema.warmup, "ema.warmup", "needs ema.decay > 0")
    _check(c.knn.temperature > 0, "knn.temperature", f"must be positive, got {c.knn.temperature}")
    for f in ("steps", "eval_every", "checkpoint_every", "knn_every", "optim.warmup_steps",
              "data.num_workers"):
        v = c
        for p in f.split("."):
            v = v[p]
        _check(isinstance(v, int) and v >= 0, f, f"must be a non-negative integer, got {v!r}")
    _check(c.steps > 0 or c.epochs > 0, "epochs", "set epochs > 0 or steps > 0")
    per_rank = c.batch_size // max(world_size, 1)
    _check(c.batch_size % (world_size * c.grad_accum) == 0, "batch_size",
           f"{c.batch_size} does not split into {world_size} rank(s) x {c.grad_accum} "
           f"accumulation step(s)")
    _check(per_rank >= c.grad_accum, "grad_accum", "more accumulation steps than images per rank")
    _check(bool(c.data.path), "data.path", "no dataset given; set --config.data.path=/path/to/root "
           "with root/train/<class>/*.jpg and root/val/<class>/*.jpg")
    _validate_format(c.data)
    o = c.optim
    _check((o.lr > 0) != (o.base_lr > 0), "optim.lr",
           f"set exactly one of optim.lr (absolute) and optim.base_lr (scaled by batch/256); "
           f"got lr={o.lr}, base_lr={o.base_lr}")
    _check(0 < o.layer_decay <= 1, "optim.layer_decay", f"must be in (0, 1], got {o.layer_decay}")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "betas must be in [0, 1)")
    _check(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    _check(0 <= o.warmup_init_lr <= learning_rate(c), "optim.warmup_init_lr",
           f"must be in [0, lr={learning_rate(c)}], got {o.warmup_init_lr}")
    _check(o.weight_decay_end is None or o.weight_decay_end >= 0, "optim.weight_decay_end",
           f"must be >= 0 (or None: constant weight decay), got {o.weight_decay_end}")
    _check(bool(o.milestones) == (o.schedule == "timm_multistep"), "optim.milestones",
           "timm_multistep needs milestones (epochs); no other schedule reads them"
           if o.schedule == "timm_multistep" else
           f"only schedule='timm_multistep' reads milestones (schedule={o.schedule!r})")
    _check(all(m > 0 for m in o.milestones), "optim.milestones", f"must be positive epochs, got {tuple(o.milestones)}")
    _check(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    _check(o.schedule == "timm_multistep" or o.gamma == 0.1, "optim.gamma",
           f"only schedule='timm_multistep' reads gamma (schedule={o.schedule!r})")
    if o.schedule in ("vit_cosine", "timm_multistep"):
        _check(o.min_lr == 0, "optim.min_lr", f"schedule={o.schedule!r} has no final lr (it ends at "
               f"{'0' if o.schedule == 'vit_cosine' else 'the last milestone'}); set min_lr=0")
    if o.schedule == "epoch_cosine":
        _check(not (o.warmup_steps or o.warmup_epochs or o.warmup_init_lr), "optim.warmup_epochs",
               "schedule='epoch_cosine' (CosineAnnealingLR per epoch) has no warm-up; set "
               "warmup_steps, warmup_epochs and warmup_init_lr to 0")
    d = c.data
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           f"must be (min, max) in (0, 1], got {tuple(d.crop_scale)}")
    _check(0 < d.crop_pct <= 1, "data.crop_pct", f"must be in (0, 1], got {d.crop_pct}")
    _check(d.image_size > 0, "data.image_size", "must be positive")
    _check(0 <= d.label_smoothing < 1, "data.label_smoothing", "must be in [0, 1)")
    _check(0 <= d.re_prob <= 1, "data.re_prob", f"must be in [0, 1], got {d.re_prob}")
    _one_of(c, "data.re_mode", ("const", "rand", "pixel"))
    _check(isinstance(d.re_count, int) and d.re_count >= 1, "data.re_count",
           f"must be a positive integer, got {d.re_count!r}")
    _one_of(c, "data.decode", ("worker", "device"))
    if d.decode == "device":
        _check(d.device_normalize, "data.decode", "'device' needs data.device_normalize=True (the "
               "decoded uint8 batch is normalised on the device)")
        for name, off in (("color_jitter", not d.color_jitter), ("auto_augment", not d.auto_augment),
                          ("mixup", d.mixup <= 0), ("cutmix", d.cutmix <= 0)):
            _check(off, "data.decode", f"'device' replays crops, flips and resizes only; data.{name} "
                   f"needs the decoded image in the worker (set it off, or data.decode='worker')")
        _check(d.interpolation != "random", "data.decode", "'device' needs one data.interpolation")
    if (d.mixup > 0 or d.cutmix > 0):
        _check((c.batch_size // world_size) % 2 == 0, "batch_size", "mixup/cutmix need an even batch per rank")
    m = c.model
    if "img_size" in m:
        _check(m.img_size == d.image_size, "model.img_size",
               f"{m.img_size} differs from data.image_size={d.image_size}")
    if "patch_size" in m and "img_size" in m:
        _check(m.img_size % m.patch_size == 0, "model.patch_size",
               f"{m.patch_size} does not divide model.img_size={m.img_size}")
    if "embed_dim" in m and "num_heads" in m and isinstance(m.num_heads, int):
        _check(m.embed_dim % m.num_heads == 0, "model.num_heads",
               f"{m.num_heads} does not divide model.embed_dim={m.embed_dim}")
    task = tasks.get(c.task)
    if hasattr(task, "validate"):  # the task's own fields (config.probe, ...)
        task.validate(c)


def _validate_format(d) -> None:
    """The data.format fields: each is refused where it would do nothing."""
    _one_of({"data": d}, "data.format", ("folder", "wds", "hf"))
    streamed = d.format == "wds" or (d.format == "hf" and d.hf_streaming)
    _check(not d.eval_path or d.format == "wds", "data.eval_path",
           f"is for data.format='wds' (shard patterns), not {d.format!r}")
    _check(isinstance(d.shuffle_buffer, int) and d.shuffle_buffer >= 0, "data.shuffle_buffer",
           f"must be a non-negative integer, got {d.shuffle_buffer!r}")
    _check(not d.shuffle_buffer or streamed, "data.shuffle_buffer",
           f"is for streamed data (wds, hf with hf_streaming); data.format={d.format!r} "
           f"shuffles each epoch fully")
    if d.format == "hf":
        for f in ("hf_image_column", "hf_label_column"):
            _check(isinstance(d[f], str) and bool(d[f]), f"data.{f}", "must name a column")
    else:
        for f, default in (("hf_image_column", "image"), ("hf_label_column", "label"),
                           ("hf_streaming", False)):
            _check(d[f] == default, f"data.{f}", f"is for data.format='hf', not {d.format!r}")


def import_sibling(experiment_file: str, name: str):
    """Import ``name`` from the folder of ``experiment_file``: shared recipe settings
    (``experiments/_mae_common.py``) without making ``experiments/`` a package."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(experiment_file)), name)
    spec = importlib.util.spec_from_file_location(f"mim_experiments_{name[:-3].lstrip('_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def learning_rate(c) -> float:
    return c.optim.lr if c.optim.lr > 0 else c.optim.base_lr * c.batch_size / 256
