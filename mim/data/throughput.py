"""Input-pipeline throughput of any ``data.format`` (``python -m mim.bench --mode=data``
delegates here for ``wds`` and ``hf``): images/s of one worker in this process (reading
the shard stream or the rows, decode, the train transform and the task's extras), then of
the loader with ``data.num_workers`` workers, each batch moved to the device as in
training. The figures have the keys of :func:`mim.bench.bench_data`'s, plus ``format``."""
from __future__ import annotations

import itertools
import os
import time

import torch

from mim import backend as backend_lib
from mim import tasks
from mim.data import pipeline


def _one_worker(c, task, images: int):
    """(images per second, images in the split, where) of the per-sample path alone."""
    if pipeline.streamed(c):
        st = pipeline._stream(c, c.data.train_split, pipeline.task_transform(c, task, True),
                              pipeline.seed_extras(c, task), 0, 1, train=True)
        items = st.items(0, 0)
        for e, it in itertools.islice(items, min(5, len(st.source))):
            st.sample(e, it)
        t0 = time.perf_counter()
        n = 0
        for e, it in itertools.islice(items, images):
            st.sample(e, it)
            n += 1
        return n / (time.perf_counter() - t0), len(st.source), st.source.root
    ds = pipeline.train_dataset(c, task)
    n = min(images, len(ds))
    for i in range(min(5, n)):
        ds[(i, i)]
    t0 = time.perf_counter()
    for i in range(n):
        ds[(i % len(ds), 1000 + i)]
    return n / (time.perf_counter() - t0), len(ds), ds.root


def measure(config, batches: int = 10, images: int = 200) -> dict:
    c = config.copy_and_resolve_references()
    task = tasks.get(c.task)
    one, size, root = _one_worker(c, task, images)
    workers = c.data.num_workers
    c.batch_size = min(c.batch_size, size)
    kind = backend_lib.detect_device(c.device)
    be = backend_lib.Backend(kind, torch.device(kind, 0) if kind != "cpu" else torch.device("cpu"),
                             "fp32", False)
    loader, _, _ = pipeline.train_loader(c, be, task, 0, batches + 1)
    it = iter(loader)
    pipeline.to_device(next(it), be.device, c.data)   # worker start-up and the first batch
    be.synchronize()
    t0 = time.perf_counter()
    count, device_s = 0, 0.0
    for batch in it:
        t1 = time.perf_counter()
        batch = pipeline.to_device(batch, be.device, c.data)
        device_s += time.perf_counter() - t1
        count += batch["image"].shape[0]
    be.synchronize()
    dt = time.perf_counter() - t0
    total = count / dt if dt > 0 else float("nan")
    return {"format": c.data.format, "path": root, "images_in_split": size,
            "image_size": c.data.image_size, "one_worker_images_per_s": one,
            "num_workers": workers, "batch_size": c.batch_size, "loader_images_per_s": total,
            "loader_images_per_s_per_worker": total / max(workers, 1), "device": str(be.device),
            "device_normalize": c.data.device_normalize, "decode": c.data.decode,
            "to_device_ms_per_batch": 1e3 * device_s / max(batches, 1), "cpu_count": os.cpu_count()}


def write_imagenet_size_set(src: str, dst: str, per_class: int = 400, size=(500, 375),
                            seed: int = 0) -> int:
    """A folder of ImageNet-size JPEGs for ``--mode=data`` figures: each image of ``src``
    (an image folder, e.g. the bundled set) resized to ``size`` (ImageNet's typical 500x375)
    with uniform noise of +-12 grey levels, saved at quality 90, so decoding costs about
    what it costs on ImageNet (files of ~55 KB; ImageNet's average ~110 KB). Returns the
    number of train images written."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    written = 0
    for split, n in (("train", per_class), ("val", max(per_class // 10, 1))):
        for cls in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(dst, split, cls), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(src, split, cls)))[:n]:
                im = Image.open(os.path.join(src, split, cls, name)).convert("RGB")
                a = np.asarray(im.resize(size, Image.BICUBIC)).astype(np.int16)
                a = a + rng.integers(-12, 13, a.shape)
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(
                    os.path.join(dst, split, cls, name), quality=90)
                written += split == "train"
    return written


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m mim.data.throughput",
                                description="write an ImageNet-size JPEG folder for --mode=data")
    p.add_argument("--images", required=True, help="source image folder (root/<split>/<class>/*)")
    p.add_argument("--out", required=True)
    p.add_argument("--per_class", type=int, default=400)
    a = p.parse_args()
    print(f"wrote {write_imagenet_size_set(a.images, a.out, a.per_class)} train images to {a.out}")
