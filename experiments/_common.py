"""Settings every experiment file shares: where the bundled demo images are, what a
``:tiny`` run on them and a ``:perf`` run look like. Not an experiment itself."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "third_party", "cifar10-mini")


def tiny_data(c, num_workers: int = 1):
    """The bundled 32-px CIFAR-10 subset, fp32 and eager: a CPU-sized run."""
    c.data.path = BUNDLED
    c.data.image_size = 32
    c.data.crop_pct = 1.0          # the images are already 32 px: no resize + centre crop
    c.data.num_workers = num_workers  # on 2 cores: one decodes JPEGs, one trains
    c.precision = "fp32"
    c.compile = "off"
    c.eval_batch_size = 500


def perf(c, steps: int = 50):
    """A short run that prints throughput: no evaluation or checkpoint before the end."""
    c.steps = steps
    c.log_every = 10
    c.eval_every = 1_000_000
    c.checkpoint_every = 1_000_000


def variant_error(name, arg):
    return ValueError(f"unknown variant {arg!r} of {name} (tiny, perf)")
