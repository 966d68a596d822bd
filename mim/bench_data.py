"""``mim.bench --mode=data``: decode + augmentation throughput of the input pipeline."""
from __future__ import annotations

import os


def bench_data(config, *, data_dir: str = "", batches: int = 10, images: int = 200) -> dict:
    """Decode + augment throughput: one worker in this process, then the loader with
    ``config.data.num_workers`` workers (``batches`` batches after the first), each batch
    moved to ``config.device`` by :func:`mim.data.pipeline.to_device` as in training
    (:func:`mim.data.throughput.measure`, every ``data.format``). With
    ``data.decode='device'`` a worker only reads files and draws crops, and the decode is
    timed in ``to_device``. A folder without a train split is read as one split."""
    from mim.data import throughput
    c = config.copy_and_resolve_references()
    if data_dir:
        c.data.path = data_dir
    if not c.data.path:
        raise ValueError("--mode=data needs images: set --data_dir or --config.data.path")
    if c.data.get("format", "folder") == "folder" and not os.path.isdir(
            os.path.join(c.data.path, c.data.train_split)):
        c.data.train_split = ""              # a folder of class folders
    return throughput.measure(c, batches=batches, images=images)


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
