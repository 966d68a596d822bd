import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "third_party", "cifar10-mini")
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def bundled():
    return BUNDLED


def shared_dataset(name):
    path = os.path.join(SHARED, name)
    if not os.path.isdir(path):
        pytest.skip(f"{path} not present")
    return path
