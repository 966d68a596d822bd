"""``data.decode='device'``: workers read JPEG bytes and draw the crop and flip; the device
decodes (torchvision.io, here on the CPU) and replays timm's ops. Reference: timm's own
transform on the PIL-decoded image (``data.decode='worker'``), from the same seeds."""
import glob
import io
import os
import shutil

import pytest
import torch
from PIL import Image

from conftest import few_steps, shared_dataset
from mim import config as config_lib
from mim.backend import Backend
from mim.data import device_decode, pipeline

CPU = Backend("cpu", torch.device("cpu"), "fp32", False)


def _config(path, size=64, **data):
    c = config_lib.base()
    c.data.update(path=path, image_size=size, num_workers=0, device_normalize=True,
                  crop_scale=(0.2, 1.0), **data)
    c.batch_size = c.eval_batch_size = 8
    c.model.num_classes = 0
    c.optim.lr = 0.1
    return c


def _batches(c, decode, train=True):
    c.data.decode = decode
    if train:
        raw = next(iter(pipeline.train_loader(c, CPU, None, 2, 3)[0]))
    else:
        raw = next(iter(pipeline.eval_loader(c, CPU)[0]))
    return raw, pipeline.to_device(raw, "cpu", c.data, train=train)


def _grey_levels(a, b, c):
    """|a - b| of two normalised batches in 0..255 grey levels, per channel."""
    std = torch.tensor(c.data.std).view(1, 3, 1, 1) * 255
    return (a - b).abs() * std


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_matches_timm_on_pil(train):
    """Same crop and flip as timm's transform on PIL images; pixels within resampling
    rounding: a wrong box, a missed flip or swapped axes would differ by tens of levels."""
    data = shared_dataset("imagenet-sample")
    c = _config(data, size=96, hflip=0.5, crop_pct=0.875)
    raw_w, worker = _batches(c, "worker", train)
    raw_d, device = _batches(c, "device", train)
    assert isinstance(raw_d["image"], list) and all(x.dim() == 1 for x in raw_d["image"])
    assert raw_d["geometry"].shape == ((8, 5) if train else (8, 0))
    assert device["image"].shape == worker["image"].shape == (8, 3, 96, 96)
    assert device["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(device["label"], worker["label"]) and set(device) == set(worker)
    if train:
        assert 0 < raw_d["geometry"][:, 4].sum() < 8             # some flipped, some not
    diff = _grey_levels(device["image"], worker["image"], c)
    assert diff.mean() < 0.5 and diff.max() <= 24, (diff.mean(), diff.max())


def test_crop_draws_are_timms():
    """The worker draws the box on the file's header exactly as timm's op does on the
    decoded image; checked against a hand replay of the op with the same seed."""
    import random
    from timm.data import create_transform
    path = sorted(glob.glob(os.path.join(shared_dataset("imagenet-sample"), "train", "*", "*")))[0]
    t = create_transform(64, is_training=True, scale=(0.2, 1.0), color_jitter=None, use_prefetcher=True)
    deferred = device_decode.DeferredTransform(t)
    enc = device_decode.read(path)
    random.seed(7), torch.manual_seed(7)
    got = deferred(enc)["geometry"].tolist()
    random.seed(7), torch.manual_seed(7)
    rrc = t.transforms[0]
    want = list(rrc.get_params(Image.open(path).convert("RGB"), rrc.scale, rrc.ratio))
    want.append(int(torch.rand(1).item() < 0.5))
    assert got == want
    h, w = Image.open(path).size[::-1]
    assert 0 <= got[0] <= h - got[2] and 0 <= got[1] <= w - got[3]


def _odd_files(root):
    """A folder with one file of each kind the device path hands back to PIL."""
    src = sorted(glob.glob(os.path.join(shared_dataset("imagenet-sample"), "train", "*", "*")))[:6]
    d = os.path.join(root, "train", "a")
    os.makedirs(d)
    imgs = [Image.open(p).convert("RGB").resize((80, 64)) for p in src]
    imgs[0].save(os.path.join(d, "0_baseline.jpg"), quality=90)
    imgs[1].save(os.path.join(d, "1_png.jpg"), format="PNG")                  # PNG named .jpg
    imgs[2].convert("CMYK").save(os.path.join(d, "2_cmyk.jpg"), quality=90)
    imgs[3].save(os.path.join(d, "3_progressive.jpg"), quality=90, progressive=True)
    imgs[4].convert("L").save(os.path.join(d, "4_grey.jpg"), quality=90)
    buf = io.BytesIO()
    imgs[5].save(buf, format="JPEG", quality=90)
    with open(os.path.join(d, "5_trailing.jpg"), "wb") as f:
        f.write(buf.getvalue() + b"trailing bytes")
    return root


def test_files_the_device_cannot_take_are_decoded_by_pil(tmp_path):
    root = _odd_files(str(tmp_path))
    kinds = [type(device_decode.read(p)).__name__
             for p in sorted(glob.glob(os.path.join(root, "train", "a", "*")))]
    assert kinds == ["Encoded", "Image", "Image", "Image", "Encoded", "Image"]
    c = _config(root, size=48, hflip=0.5)
    c.batch_size = 6
    _, worker = _batches(c, "worker")
    raw, device = _batches(c, "device")
    encoded = [x.dim() == 1 for x in raw["image"]]
    assert sorted(encoded) == [False] * 4 + [True] * 2
    diff = _grey_levels(device["image"], worker["image"], c)
    for i, enc in enumerate(encoded):
        if enc:
            assert diff[i].mean() < 0.5
        else:
            assert diff[i].max() == 0                          # the same PIL + timm work


def test_corrupt_jpegs(tmp_path):
    """Truncated: skipped in the worker (PIL's error), as with decode='worker'. Damaged
    scan data that passes the header checks: replaced on the device, warned and counted."""
    src = sorted(glob.glob(os.path.join(shared_dataset("imagenet-sample"), "train", "*", "*")))[:2]
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    raw = open(src[0], "rb").read()
    (d / "0_truncated.jpg").write_bytes(raw[: len(raw) // 2])
    sos = raw.find(b"\xff\xda")
    damaged = raw[:sos + 20] + b"\xff\xd8" * 20 + raw[sos + 60:]
    (d / "1_two_soi.jpg").write_bytes(damaged)
    shutil.copy(src[1], d / "2_good.jpg")
    c = _config(str(tmp_path), size=32)
    c.batch_size = 3
    assert type(device_decode.read(str(d / "1_two_soi.jpg"))).__name__ == "Encoded"
    c.data.decode = "device"
    with pytest.warns(UserWarning) as rec:
        raw_batch, out = _batches(c, "device")
    messages = " ".join(str(w.message) for w in rec)
    assert "skipping unreadable image" in messages and "0_truncated.jpg" in messages
    assert "failed to decode on cpu" in messages
    # the truncated file was swapped for the next in the worker; the damaged one on the device
    assert int(raw_batch["skipped"]) >= 1
    n_damaged = sum(x.numel() == len(damaged) for x in raw_batch["image"])
    assert n_damaged >= 1
    assert int(out["skipped"]) == int(raw_batch["skipped"]) + n_damaged
    assert torch.isfinite(out["image"]).all()


@pytest.mark.parametrize("field,value", [
    ("device_normalize", False), ("auto_augment", "rand-m9-mstd0.5-inc1"), ("color_jitter", 0.4),
    ("mixup", 0.8), ("cutmix", 1.0), ("interpolation", "random"), ("decode", "gpu")])
def test_settings_the_device_cannot_replay_are_refused(bundled, field, value):
    c = _config(bundled, decode="device")
    c.model.num_classes = 10
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match="config.data.decode"):
        config_lib.validate(c)


def test_batches_of_the_other_mode_are_refused(bundled):
    c = _config(bundled, size=32)
    raw, _ = _batches(c, "device")
    c.data.decode = "worker"
    with pytest.raises(ValueError, match="data.decode is 'worker'"):
        pipeline.to_device(raw, "cpu", c.data)
    c.data.decode = "device"
    with pytest.raises(ValueError, match="geometry rows|geometry"):
        pipeline.to_device(raw, "cpu", c.data, train=False)   # eval ops, train draws


def test_devices_without_a_jpeg_decoder_are_named():
    from timm.data import create_transform
    # (torch names "npu" only once torch_npu is imported; any other accelerator is refused alike)
    with pytest.raises(ValueError, match="not on mps; set data.decode='worker'"):
        device_decode.DeviceDecoder(create_transform(32, use_prefetcher=True), torch.device("mps"))


def test_any_number_of_workers_gives_the_same_batches(bundled):
    c = _config(bundled, size=32, decode="device")
    one = pipeline.to_device(next(iter(pipeline.train_loader(c, CPU, None, 4, 5)[0])), "cpu", c.data)
    c.data.num_workers = 2
    two = pipeline.to_device(next(iter(pipeline.train_loader(c, CPU, None, 4, 5)[0])), "cpu", c.data)
    assert torch.equal(one["image"], two["image"]) and torch.equal(one["label"], two["label"])


def test_mae_tiny_trains_with_device_decode(small_data, tmp_path, one_thread):
    from mim.train import loop
    c = few_steps("mae_base", small_data, **{"data.device_normalize": True, "data.decode": "device",
                                             "recon.every": 3, "recon.num_images": 2})
    summary = loop.train(c, str(tmp_path))
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]
    assert (tmp_path / "reconstructions" / "step_00000003.png").exists()


def test_bench_times_the_device_decode(one_thread):
    from conftest import experiment
    from mim import bench
    c = experiment("mae_base", "tiny", **{"batch_size": 8, "data.num_workers": 1,
                                          "data.device_normalize": True, "data.decode": "device"})
    r = bench.bench_data(c, batches=2, images=16)
    assert r["decode"] == "device" and r["loader_images_per_s"] > 0
    assert "decoded, cropped and normalised on the device" in bench.format_data_report(r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_nvjpeg_matches_the_cpu_decode():
    c = _config(shared_dataset("imagenet-sample"), size=96, decode="device")
    raw = next(iter(pipeline.train_loader(c, CPU, None, 2, 3)[0]))
    cpu = pipeline.to_device(raw, "cpu", c.data)["image"]
    gpu = pipeline.to_device(raw, "cuda", c.data)["image"].cpu()
    diff = _grey_levels(gpu, cpu, c)
    assert diff.mean() < 1.0 and diff.max() <= 32


def test_the_bad_image_folder_of_the_worker_path(tmp_path):
    """The folder of odd and broken files the worker path is tested on (test_data): every
    file it accepts the device path accepts, a 1x1 JPEG included (timm may draw a crop
    box with a zero side on it: PIL makes that a black image, and so must the device).
    Reference: timm's transform on PIL images (data.decode='worker'), batch for batch."""
    from test_data import _write_odd_folder
    _write_odd_folder(str(tmp_path))
    c = _config(str(tmp_path), size=32, hflip=0.5)
    c.data.crop_scale, c.batch_size = (0.08, 1.0), 14          # timm's default scale
    empty_boxes = 0
    for step in range(10):
        c.data.decode = "worker"
        worker = pipeline.to_device(next(iter(pipeline.train_loader(c, CPU, None, step, step + 1)[0])),
                                    "cpu", c.data)
        c.data.decode = "device"
        raw = next(iter(pipeline.train_loader(c, CPU, None, step, step + 1)[0]))
        jpeg = torch.tensor([x.dim() == 1 for x in raw["image"]])   # PIL-decoded rows: no box
        empty_boxes += int(((raw["geometry"][:, 2:4] == 0).any(-1) & jpeg).sum())
        device = pipeline.to_device(raw, "cpu", c.data)
        assert int(device["skipped"]) == int(worker["skipped"])
        assert torch.equal(device["label"], worker["label"])
        diff = _grey_levels(device["image"], worker["image"], c)
        assert diff.mean(dim=(1, 2, 3)).max() < 1.0, diff.mean(dim=(1, 2, 3))
    assert empty_boxes > 0          # the case that used to stop the run was drawn
