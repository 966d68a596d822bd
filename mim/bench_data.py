"""``mim.bench --mode=data``: decode + augmentation throughput of the input pipeline."""
from __future__ import annotations

import os
import time

import torch

from mim import backend as backend_lib
from mim import tasks

def bench_data(config, *, data_dir: str = "", batches: int = 10, images: int = 200) -> dict:
    """Decode + augment throughput: one worker in this process, then the loader with
    ``config.data.num_workers`` workers (``batches`` batches after the first), each batch
    moved to ``config.device`` by :func:`mim.data.pipeline.to_device` as in training.
    With ``data.decode='device'`` a worker only reads files and draws crops, and the decode
    is timed in ``to_device``."""
    from mim.data import pipeline
    c = config.copy_and_resolve_references()
    if data_dir:
        c.data.path = data_dir
    if not c.data.path:
        raise ValueError("--mode=data needs images: set --data_dir or --config.data.path")
    if c.data.get("format", "folder") != "folder":
        from mim.data import throughput         # tar shards, Hugging Face datasets
        return throughput.measure(c, batches=batches, images=images)
    split = c.data.train_split
    if not os.path.isdir(os.path.join(c.data.path, split)):
        split = ""                           # a folder of class folders
        c.data.train_split = split
    task = tasks.get(c.task)
    ds = pipeline.train_dataset(c, task)
    n = min(images, len(ds))
    for i in range(min(5, n)):
        ds[(i, i)]
    t0 = time.perf_counter()
    for i in range(n):
        ds[(i % len(ds), 1000 + i)]
    one = n / (time.perf_counter() - t0)

    workers = c.data.num_workers
    c.batch_size = min(c.batch_size, len(ds))
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
    return {"path": ds.root, "images_in_split": len(ds), "image_size": c.data.image_size,
            "one_worker_images_per_s": one, "num_workers": workers, "batch_size": c.batch_size,
            "loader_images_per_s": total, "loader_images_per_s_per_worker": total / max(workers, 1),
            "device": str(be.device), "device_normalize": c.data.device_normalize,
            "decode": c.data.decode,
            "to_device_ms_per_batch": 1e3 * device_s / max(batches, 1), "cpu_count": os.cpu_count()}


def format_data_report(r: dict) -> str:
    return "\n".join([
        f"images: {r['path']} ({r['images_in_split']} in split), train transform at {r['image_size']} px",
        f"one worker (in process{', read + crop draw only' if r.get('decode') == 'device' else ''}): "
        f"{r['one_worker_images_per_s']:.1f} images/s",
        f"loader, {r['num_workers']} worker(s), batch {r['batch_size']}, to {r['device']}: "
        f"{r['loader_images_per_s']:.1f} images/s ({r['loader_images_per_s_per_worker']:.1f} per "
        f"worker; {r['cpu_count']} CPU cores)",
        f"to_device ({_to_device_kind(r)}): {r['to_device_ms_per_batch']:.2f} ms per batch"])


def _to_device_kind(r: dict) -> str:
    if r.get("decode") == "device":
        return "JPEGs decoded, cropped and normalised on the device"
    return "uint8, normalised on the device" if r["device_normalize"] else "float"
