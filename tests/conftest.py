import importlib.util
import os
import shutil

# Idle OpenMP threads sleep instead of spinning (as mim.main sets for its runs): the suite
# runs in two processes on two cores (README: pytest -n 2), and spinning threads of one
# would take the cores the other needs. Set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "third_party", "cifar10-mini")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Files with a test marked ``slow`` run first (stable order otherwise): under
    ``-n 2`` (setup.cfg: ``--dist loadfile --no-loadscope-reorder``, without which xdist
    sends the files with the most tests first) the longest files start at once on the
    two workers instead of one of them finishing alone."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture
def bundled():
    return BUNDLED


def shared_dataset(name):
    path = os.path.join(SHARED, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not present")
    return path


def experiment(name, arg="tiny", **overrides):
    """``experiments/<name>.py``'s ``get_config(arg)`` with dotted-name overrides."""
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"exp_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def no_drop_path(c):
    """Every ``drop_path_rate`` of a config set to 0 (steps whose randomness differs)."""
    for key, value in c.items():
        if key == "drop_path_rate":
            c[key] = 0.0
        elif hasattr(value, "items"):
            no_drop_path(value)


def few_steps(name, data, **overrides):
    """A :tiny variant cut to 3 steps of 32 images, for tests of the plumbing."""
    return experiment(name, "tiny", **{
        "data.path": data, "steps": 3, "batch_size": 32, "eval_batch_size": 20,
        "log_every": 1, "eval_every": 3, "checkpoint_every": 3, "data.num_workers": 0,
        **overrides})


@pytest.fixture(scope="module")
def one_thread():
    """One compute thread next to the data worker on 2 cores: OpenMP threads spinning on
    an oversubscribed machine make every small op many times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """12 train and 2 val images per class of the bundled set, so a few steps and a full
    evaluation take seconds."""
    dst = tmp_path_factory.mktemp("cifar_small")
    for split, n in (("train", 12), ("val", 2)):
        for cls in sorted(os.listdir(os.path.join(BUNDLED, split))):
            os.makedirs(dst / split / cls)
            for f in sorted(os.listdir(os.path.join(BUNDLED, split, cls)))[:n]:
                shutil.copy(os.path.join(BUNDLED, split, cls, f), dst / split / cls / f)
    return str(dst)
