"""Input pipeline: sharding, determinism, resume position, eval coverage, odd files."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_dataset
from mim import config as config_lib
from mim.backend import Backend
from mim.data import folder, pipeline, sampler, transforms


def test_ranks_partition_each_global_batch_independently_of_world_size():
    n, G = 103, 12
    one = sampler.TrainBatchSampler(n, G, 0, 1, seed=7, start_step=0, total_steps=20)
    for world in (2, 3, 4):
        shards = [sampler.TrainBatchSampler(n, G, r, world, 7, 0, 20) for r in range(world)]
        for step in range(20):
            parts = [s.batch(step) for s in shards]
            flat = [x for p in parts for x in p]
            assert flat == one.batch(step)          # same images, same per-sample seeds
            assert len({i for i, _ in flat}) == G   # disjoint across ranks


def test_epochs_are_permutations_and_differ():
    s = sampler.TrainBatchSampler(40, 8, 0, 1, seed=0, start_step=0, total_steps=10)
    e0 = [i for b in range(5) for i, _ in s.batch(b)]
    e1 = [i for b in range(5, 10) for i, _ in s.batch(b)]
    assert sorted(e0) == list(range(40)) and sorted(e1) == list(range(40))
    assert e0 != e1
    again = sampler.TrainBatchSampler(40, 8, 0, 1, seed=0, start_step=0, total_steps=10)
    assert [again.batch(b) for b in range(10)] == [s.batch(b) for b in range(10)]
    other = sampler.TrainBatchSampler(40, 8, 0, 1, seed=1, start_step=0, total_steps=10)
    assert other.batch(0) != s.batch(0)


def test_resumed_sampler_continues_where_it_stopped():
    full = list(sampler.TrainBatchSampler(50, 10, 0, 1, 3, 0, 17))
    resumed = list(sampler.TrainBatchSampler(50, 10, 0, 1, 3, 6, 17))
    assert resumed == full[6:]


def test_impossible_splits_are_clear_errors():
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        sampler.TrainBatchSampler(100, 10, 0, 3, 0, 0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sampler.TrainBatchSampler(5, 10, 0, 1, 0, 0, 1)


def test_eval_sees_every_image_once():
    for n, world, bs in [(10, 3, 2), (7, 4, 3), (5, 1, 10)]:
        seen = []
        for r in range(world):
            for b in sampler.EvalBatchSampler(n, bs, r, world):
                assert len(b) <= bs
                seen += [i for i, *_ in b]
        assert sorted(seen) == list(range(n))


def _config(path, **kw):
    c = config_lib.base()
    c.data.path = path
    c.data.image_size = 32
    c.data.num_workers = 0
    c.batch_size = 8
    c.model.num_classes = 10
    c.optim.lr = 0.1
    for k, v in kw.items():
        c.data[k] = v
    return c


def test_augmentation_is_a_function_of_seed_not_of_workers(bundled):
    be = Backend("cpu", torch.device("cpu"), "fp32", False)
    c = _config(bundled, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    first = next(iter(pipeline.train_loader(c, be, None, 3, 5)[0]))
    c.data.num_workers = 2
    second = next(iter(pipeline.train_loader(c, be, None, 3, 5)[0]))
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["label"], second["label"])
    c.seed = 1
    third = next(iter(pipeline.train_loader(c, be, None, 3, 5)[0]))
    assert not torch.equal(first["image"], third["image"])


def test_mixup_cutmix_gives_soft_targets(bundled):
    be = Backend("cpu", torch.device("cpu"), "fp32", False)
    c = _config(bundled, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    batch = next(iter(pipeline.train_loader(c, be, None, 0, 1)[0]))
    assert batch["soft_label"].shape == (8, 10)
    torch.testing.assert_close(batch["soft_label"].sum(-1), torch.ones(8))
    assert batch["soft_label"].max() < 1.0


def test_eval_transform_resizes_and_center_crops_any_size():
    """imagenet-sample has 136..910 px images, a grayscale JPEG and upper-case .JPEG."""
    root = shared_dataset("imagenet-sample")
    c = _config(root, image_size=64, crop_pct=0.875)
    ds = folder.ImageFolder(root, "train", transforms.eval_transform(c.data))
    assert len(ds) == 96 and len(ds.classes) == 8
    gray = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("n02096051_Airedale.JPEG")][0]
    x = ds[(gray, 0)]["image"]
    assert x.shape == (3, 64, 64)
    # the hand computation: resize shorter side to 64/0.875 = 73 (bicubic), centre crop 64
    img = Image.open(ds.samples[gray][0]).convert("RGB")
    w, h = img.size
    s = int(64 / 0.875)
    nw, nh = (s, int(s * h / w)) if w < h else (int(s * w / h), s)
    ref = np.asarray(img.resize((nw, nh), Image.BICUBIC), dtype=np.float32) / 255
    top, left = int(round((nh - 64) / 2.0)), int(round((nw - 64) / 2.0))
    ref = (ref[top:top + 64, left:left + 64] - np.array(c.data.mean)) / np.array(c.data.std)
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 0.05


def _write_odd_folder(root):
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "third_party", "cifar10-mini", "train", "cat")
    cls = os.path.join(root, "train", "a")
    os.makedirs(cls)
    os.makedirs(os.path.join(root, "train", "b"))
    files = sorted(os.listdir(src))[:4]
    for f in files:
        shutil.copy(os.path.join(src, f), cls)
    open(os.path.join(cls, "zero.jpg"), "wb").close()
    with open(os.path.join(cls, "text.jpg"), "w") as f:
        f.write("not an image")
    data = open(os.path.join(src, files[0]), "rb").read()
    with open(os.path.join(cls, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 3])
    b = os.path.join(root, "train", "b")
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(os.path.join(b, "cmyk.jpg"))
    Image.new("RGBA", (20, 50), (255, 0, 0, 128)).save(os.path.join(b, "rgba.png"))
    Image.new("L", (33, 33), 128).save(os.path.join(b, "gray.png"))
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(os.path.join(b, "sixteen.png"))
    Image.new("P", (30, 30)).save(os.path.join(b, "palette.gif"))
    for k in range(3):              # timm's crop can draw a box with a zero side on these
        Image.new("RGB", (1, 1), (200, 30 * k, 10)).save(os.path.join(b, f"one_pixel{k}.jpg"))


def readable(path):
    """Whether PIL decodes ``path``: the independent count of what a run can use."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many kinds
        return False


def test_odd_and_broken_files_are_converted_or_skipped(tmp_path):
    _write_odd_folder(str(tmp_path))
    c = _config(str(tmp_path))
    ds = folder.ImageFolder(str(tmp_path), "train", transforms.eval_transform(c.data))
    skipped = 0
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        for i in range(len(ds)):
            out = ds[(i, 0)]
            assert out["image"].shape == (3, 32, 32)
            assert torch.isfinite(out["image"]).all()
            skipped += int(out["skipped"])
    assert skipped >= 3
    # 16-bit grey 40000/65535 -> about 155 in 8 bits, not clipped to 255
    assert abs(np.asarray(folder.load_rgb(str(tmp_path / "train/b/sixteen.png")))[0, 0, 0] - 155) <= 1


def test_missing_or_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(folder.DatasetError, match="dataset split not found"):
        folder.ImageFolder(str(tmp_path / "nope"), "train", None)
    os.makedirs(tmp_path / "train")
    with pytest.raises(folder.DatasetError, match="no class folders"):
        folder.ImageFolder(str(tmp_path), "train", None)
    os.makedirs(tmp_path / "train" / "cls")
    with pytest.raises(folder.DatasetError, match="no images"):
        folder.ImageFolder(str(tmp_path), "train", None)


def test_class_count_mismatch_is_a_clear_error(bundled):
    be = Backend("cpu", torch.device("cpu"), "fp32", False)
    c = _config(bundled)
    c.model.num_classes = 5
    with pytest.raises(folder.DatasetError, match="10 classes but config.model.num_classes=5"):
        pipeline.train_loader(c, be, None, 0, 1)


@pytest.mark.parametrize("decode,batch", [("worker", 4), ("device", 4), ("worker", 1), ("device", 1)])
def test_evaluation_skips_unreadable_files_and_counts_them(tmp_path, decode, batch):
    """Each readable file is scored once and each unreadable one is counted, not replaced
    by its neighbour (which would then be scored twice). Reference: PIL opening each file.
    A batch of unreadable files only is ``{"skipped": n}``."""
    _write_odd_folder(str(tmp_path))
    c = _config(str(tmp_path), eval_split="train", device_normalize=True, decode=decode)
    c.eval_batch_size = batch
    be = Backend("cpu", torch.device("cpu"), "fp32", False)
    loader, ds = pipeline.eval_loader(c, be)
    good = [lab for p, lab in ds.samples if readable(p)]
    assert 0 < len(good) < len(ds)
    scored, skipped, labels = 0, 0, []
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        for raw in loader:
            if "image" not in raw:
                assert set(raw) == {"skipped"}
                skipped += int(raw["skipped"])
                continue
            out = pipeline.to_device(raw, "cpu", c.data, train=False)
            skipped += int(out["skipped"])
            assert out["image"].shape[0] == out["label"].shape[0]
            scored += out["image"].shape[0]
            labels += out["label"].tolist()
    assert scored == len(good) and skipped == len(ds) - len(good)
    assert sorted(labels) == sorted(good)

