"""Settings every experiment file shares: where the bundled demo images are, what a
``:tiny`` run on them and a ``:perf`` run look like, and how the variant string after
the file name is read. Not an experiment itself."""
import os
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "third_party", "cifar10-mini")
BUNDLED_TRAIN_IMAGES = 4000   # its train split: 10 classes x 400 (epochs of a :tiny schedule)

# Keys every experiment file accepts in its variant string (see parse_arg).
COMMON_KEYS = dict(
    tiny=False,    # the CPU-sized run on the bundled images
    perf=False,    # a short run that prints throughput
    steps=0,       # run length in optimizer steps (0: the recipe's own)
    batch_size=0,  # global batch (0: the recipe's own); a base_lr still scales with it
)


def parse_arg(arg, name: str, **spec):
    """Read a variant string as big_vision's ``parse_arg`` does:
    ``experiments/mae_base.py:tiny,steps=100`` -> ``tiny=True, steps=100``.

    ``spec`` gives the file's own keys and their defaults (e.g. ``size="base"``) beside
    :data:`COMMON_KEYS`. A bare key sets a boolean; ``key=value`` is read with the type
    of the key's default. An unknown key, a bare non-boolean key or a value of the wrong
    type is a ``ValueError`` that names the file and the known keys."""
    known = {**COMMON_KEYS, **spec}
    values = dict(known)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, eq, raw = item.partition("=")
        key = key.strip()
        if key not in known:
            raise ValueError(f"unknown variant key {key!r} in {arg!r} of {name}; known keys: "
                             f"{', '.join(sorted(known))}")
        default = known[key]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"variant key {key!r} of {name} needs a value: {key}=... "
                                 f"(default {default!r})")
            values[key] = True
        else:
            values[key] = _parse_value(raw.strip(), default, key, name)
    return types.SimpleNamespace(**values)


def _parse_value(raw: str, default, key: str, name: str):
    try:
        if isinstance(default, bool):
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return lowered in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(f"variant key {key!r} of {name}: {raw!r} is not a "
                         f"{type(default).__name__}") from None
    return raw


def check_choice(value, choices, key: str, name: str):
    if value not in choices:
        raise ValueError(f"variant key {key}={value!r} of {name}: must be one of "
                         f"{', '.join(map(str, choices))}")


def tiny_data(c, num_workers: int = 1):
    """The bundled 32-px CIFAR-10 subset, fp32 and eager: a CPU-sized run."""
    c.data.path = BUNDLED
    c.data.image_size = 32
    c.data.crop_pct = 1.0          # the images are already 32 px: no resize + centre crop
    c.data.num_workers = num_workers  # on 2 cores: one decodes JPEGs, one trains
    c.precision = "fp32"
    c.compile = "off"
    c.eval_batch_size = 500


def tiny_schedule(c, *, batch_size: int, steps: int, every: int = 0, log_every: int = 50,
                  warmup_steps=None, **optim):
    """A :tiny run measured in steps, not epochs: ``batch_size``, ``steps``, a warmup of
    ``warmup_steps`` steps (None keeps the recipe's), ``optim`` fields (``base_lr=``, ...),
    and evaluation and checkpoints every ``every`` steps (0: at the end only)."""
    c.batch_size = batch_size
    c.epochs = 0.0
    c.steps = steps
    c.optim.update(optim)
    if warmup_steps is not None:
        c.optim.warmup_epochs = 0.0
        c.optim.warmup_steps = warmup_steps
    c.log_every = log_every
    c.eval_every = c.checkpoint_every = every or steps


def perf(c, steps: int = 50):
    """A short run that prints throughput: no evaluation or checkpoint before the end."""
    c.steps = steps
    c.log_every = 10
    c.eval_every = 1_000_000
    c.checkpoint_every = 1_000_000


def finish(c, v):
    """The common keys that apply after a recipe's variants: ``steps=N`` sets the run
    length (the loop evaluates and saves at the last step anyway); a reconstruction
    cadence longer than the run is cut to it, so a shortened pretraining still draws
    its pictures once, at its end. ``batch_size=B`` sets the global batch."""
    for key in ("steps", "batch_size"):
        if getattr(v, key) < 0:
            raise ValueError(f"variant key {key}={getattr(v, key)}: must be >= 0")
    if v.batch_size:
        c.batch_size = v.batch_size
    if v.steps:
        c.steps = v.steps
        if "recon" in c and c.recon.every > v.steps:
            c.recon.every = v.steps
    return c


def variant_error(name, arg):
    return ValueError(f"unknown variant {arg!r} of {name} (tiny, perf)")
