"""Device, precision and compile selection."""
import subprocess
import sys

import pytest
import torch

from mim import backend


def test_cpu_fallback_and_policies():
    be = backend.setup("auto", "fp32", "auto")
    if not torch.cuda.is_available():
        assert be.device_type == "cpu" and not be.compile
    o1 = backend.setup("cpu", "amp_bf16", "off")
    assert o1.param_dtype == torch.float32 and o1.compute_dtype == torch.bfloat16 and not o1.master_weights
    o2 = backend.setup("cpu", "fp16", "off")
    assert o2.param_dtype == torch.float16 and o2.master_weights and o2.loss_scaling
    assert backend.setup("cpu", "amp_fp16", "on").compile


@pytest.mark.parametrize("kw, msg", [(dict(device="tpu"), "config.device='tpu'"),
                                      (dict(precision="fp8"), "config.precision='fp8'"),
                                      (dict(compile="maybe"), "config.compile='maybe'")])
def test_bad_choices_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        backend.setup(**kw)


def test_npu_is_imported_only_when_asked():
    code = ("import sys, mim.backend as b; b.setup('auto'); "
            "assert 'torch_npu' not in sys.modules or b.detect_device() == 'npu'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    try:
        import torch_npu  # noqa: F401
        pytest.skip("torch_npu is installed here")
    except ImportError:
        with pytest.raises(RuntimeError, match="torch_npu is not installed"):
            backend.detect_device("npu")


def test_step_seeds_are_distinct():
    seeds = {backend.seed_step(s, t, r) for s in range(3) for t in range(50) for r in range(8)}
    assert len(seeds) == 3 * 50 * 8
    assert all(0 <= x < 2 ** 63 for x in seeds)
