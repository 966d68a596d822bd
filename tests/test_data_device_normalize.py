"""``data.device_normalize``: uint8 channels-last batches from the workers, converted,
normalised and randomly erased on the device. References: the float pipeline (timm's
standard transform with ToTensor + Normalize, timm's Mixup) and timm's RandomErasing."""
import random

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from conftest import few_steps
from mim import config as config_lib
from mim import visualize
from mim.backend import Backend
from mim.data import pipeline, sampler

CPU = Backend("cpu", torch.device("cpu"), "fp32", False)


def _config(path, **data):
    c = config_lib.base()
    c.data.path = path
    c.data.image_size = 32
    c.data.crop_pct = 1.0
    c.data.num_workers = 0
    c.batch_size = 8
    c.eval_batch_size = 8
    c.model.num_classes = 10
    c.optim.lr = 0.1
    for k, v in data.items():
        c.data[k] = v
    return c


def _first(c, be=CPU, start=3):
    return next(iter(pipeline.train_loader(c, be, None, start, start + 1)[0]))


def _both(c, loader):
    """The first batch of ``loader(config)`` with device_normalize off and on; the second
    moved through pipeline.to_device."""
    c.data.device_normalize = False
    off = next(iter(loader(c)))
    c.data.device_normalize = True
    raw = next(iter(loader(c)))
    return off, raw, pipeline.to_device(raw, "cpu", c.data)


def test_uint8_channels_last_batches_normalise_to_the_float_pipeline(bundled):
    c = _config(bundled, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1")
    for loader in (lambda c: pipeline.train_loader(c, CPU, None, 3, 5)[0],
                   lambda c: pipeline.eval_loader(c, CPU)[0]):
        off, raw, on = _both(c, loader)
        x = raw["image"]
        assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        assert off["image"].dtype == torch.float32
        assert on["image"].dtype == torch.float32 and on["image"].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(on["image"], off["image"], rtol=0, atol=1e-5)
        assert torch.equal(on["label"], off["label"])
        assert set(on) == set(off)
    # the reconstruction pictures' fixed images too
    c.data.device_normalize = False
    ref = visualize.fixed_images(c, 4)
    c.data.device_normalize = True
    torch.testing.assert_close(visualize.fixed_images(c, 4), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mix", [dict(cutmix=1.0), dict(mixup=0.8), dict(mixup=0.8, cutmix=1.0)],
                         ids=["cutmix", "mixup", "both"])
def test_fast_collate_mixup_matches_timm_mixup(bundled, mix):
    """FastCollateMixup draws the same lam and box as Mixup from the batch's seed: the same
    soft labels; cutmix pastes the same pixels; mixup differs by the uint8 rounding of the
    blended pixels only (half a grey level)."""
    c = _config(bundled, label_smoothing=0.1, **mix)
    rounding = 0.5 / 255 / min(c.data.std) + 1e-5
    mixed = 0
    for start in range(4):
        c.data.device_normalize = False
        off = _first(c, start=start)
        c.data.device_normalize = True
        raw = _first(c, start=start)
        assert raw["image"].dtype == torch.uint8
        assert raw["image"].is_contiguous(memory_format=torch.channels_last)
        on = pipeline.to_device(raw, "cpu", c.data)
        assert torch.equal(on["soft_label"], off["soft_label"])
        torch.testing.assert_close(on["soft_label"].sum(-1), torch.ones(8))
        err = (on["image"] - off["image"]).abs().max().item()
        assert err <= (1e-5 if "mixup" not in mix else rounding)
        mixed += int(on["soft_label"].max() < 0.95)
    assert mixed >= 3          # mixing happened in (nearly) every batch


def test_device_erasing_is_timms_random_erasing_seeded_per_image(bundled):
    """Each image is erased as timm's RandomErasing erases it with Python's random and
    torch's generator seeded by the image's erase_seed; the running generators are left
    as they were."""
    c = _config(bundled, re_prob=0.0, re_mode="pixel", re_count=2)
    clean = pipeline.to_device(_first(c), "cpu", c.data)["image"]
    c.data.update(re_prob=0.5, device_normalize=True)
    raw = _first(c)
    seeds = raw["erase_seed"].tolist()
    assert len(set(seeds)) == 8
    random.seed(123)
    torch.manual_seed(456)
    py, gen = random.getstate(), torch.get_rng_state()
    on = pipeline.to_device(raw, "cpu", c.data)["image"]
    assert "erase_seed" not in pipeline.to_device(raw, "cpu", c.data)
    assert random.getstate() == py and torch.equal(torch.get_rng_state(), gen)

    reference = RandomErasing(0.5, mode="pixel", max_count=2, device="cpu")
    erased = 0
    for i, s in enumerate(seeds):
        want = clean[i].clone()
        random.seed(s)
        torch.manual_seed(s)
        reference(want)
        torch.testing.assert_close(on[i], want, rtol=0, atol=1e-5)
        erased += int(not torch.allclose(want, clean[i], atol=1e-5))
    assert 0 < erased < 8


def test_device_erasing_depends_on_seed_and_index_only(bundled):
    """The same images come out whatever the number of ranks and workers; another run seed
    erases differently."""
    c = _config(bundled, re_prob=0.5, device_normalize=True)
    one = pipeline.to_device(_first(c), "cpu", c.data)["image"]
    ranks = [pipeline.to_device(_first(c, Backend("cpu", torch.device("cpu"), "fp32", False, r, 2)),
                                "cpu", c.data)["image"] for r in range(2)]
    assert torch.equal(torch.cat(ranks), one)
    c.data.num_workers = 2
    assert torch.equal(pipeline.to_device(_first(c), "cpu", c.data)["image"], one)
    c.data.num_workers = 0
    c.seed = 1
    assert not torch.equal(pipeline.to_device(_first(c), "cpu", c.data)["image"], one)
    # eval batches are never erased
    ev = next(iter(pipeline.eval_loader(c, CPU)[0]))
    assert "erase_seed" not in ev


def test_device_erasing_erases_the_expected_fraction():
    """re_prob of the images get one box of uniform(0.02, 1/3) of the area (timm's
    defaults): mean area fraction 0.177. Mode const writes zeros in normalised space,
    which no uint8 grey level maps to."""
    n, size = 600, 64
    d = _config("unused", re_prob=0.25, re_mode="const", device_normalize=True).data
    batch = {"image": torch.full((n, 3, size, size), 100, dtype=torch.uint8),
             "erase_seed": torch.tensor([sampler.sample_seed(0, 0, i) for i in range(n)])}
    x = pipeline.to_device(batch, "cpu", d)["image"]
    zero = (x == 0).all(dim=1)                              # (n, H, W)
    area = zero.flatten(1).float().mean(1)
    hit = area > 0
    p = hit.float().mean().item()
    assert abs(p - 0.25) < 3 * (0.25 * 0.75 / n) ** 0.5
    mean_area = area[hit].mean().item()
    assert abs(mean_area - (0.02 + 1 / 3) / 2) < 0.025
    # each erased region is one rectangle
    for i in torch.nonzero(hit).flatten()[:20].tolist():
        rows, cols = zero[i].any(1), zero[i].any(0)
        assert zero[i].sum() == rows.sum() * cols.sum()


def test_to_device_rejects_a_batch_of_the_other_kind(bundled):
    c = _config(bundled)
    with pytest.raises(TypeError, match="device_normalize is False"):
        pipeline.to_device({"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, "cpu", c.data)
    c.data.device_normalize = True
    with pytest.raises(TypeError, match="uint8"):
        pipeline.to_device({"image": torch.zeros(2, 3, 4, 4)}, "cpu", c.data)
    with pytest.raises(ValueError, match="re_prob is 0"):
        pipeline.to_device({"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                            "erase_seed": torch.arange(2)}, "cpu", c.data)


@pytest.mark.parametrize("field,value", [("re_mode", "noise"), ("re_prob", 1.5), ("re_count", 0)])
def test_bad_erasing_settings_name_the_field(bundled, field, value):
    """Checked for both paths, before any work: on the device they would fail mid-run."""
    c = _config(bundled, device_normalize=True)
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.data.{field}"):
        config_lib.validate(c)


@pytest.mark.parametrize("name,extra", [
    ("vit_b32", {"data.re_prob": 0.25, "data.mixup": 0.8, "data.cutmix": 1.0}),
    ("mae_base", {"recon.every": 3, "recon.num_images": 2}),
])
def test_tiny_experiment_trains_with_device_normalize(name, extra, small_data, tmp_path, one_thread):
    from mim.train import loop
    c = few_steps(name, small_data, **{"data.device_normalize": True, **extra})
    summary = loop.train(c, str(tmp_path))
    assert summary["steps"] == 3
    assert summary["final_loss"] == summary["final_loss"]
    if name == "vit_b32":
        assert summary["eval_count"] == 20 and 0 <= summary["eval_acc1"] <= 100
    else:
        assert (tmp_path / "reconstructions" / "step_00000003.png").exists()


def test_bench_measures_the_uint8_path(one_thread):
    from conftest import experiment
    from mim import bench
    c = experiment("vit_b32", "tiny", **{"batch_size": 8, "data.num_workers": 1,
                                         "data.device_normalize": True, "data.re_prob": 0.25})
    r = bench.bench_data(c, batches=2, images=16)
    assert r["device_normalize"] and r["loader_images_per_s"] > 0 and r["to_device_ms_per_batch"] > 0
    assert "normalised on the device" in bench.format_data_report(r)
    c = experiment("mae_base", "tiny", **{"batch_size": 4, "data.num_workers": 0,
                                          "data.device_normalize": True})
    out = bench.bench_train(c, steps=1, warmup=1, peers=(), data="real")
    assert out["results"]["mim"]["images_per_s"] > 0
