"""data.format: tar shards (wds) and Hugging Face datasets (hf) read through the folder
reader's per-sample path; split over ranks and workers, shuffled per epoch, resumable.
Shards and datasets are written from the bundled images into temporary folders."""
import json
import os
import shutil

import pytest
import torch

from conftest import experiment, few_steps
from mim import tasks
from mim.backend import Backend
from mim.data import folder, pipeline, shards, streams
from mim.data.sampler import sample_seed
from mim.train import loop

CPU = Backend("cpu", torch.device("cpu"), "fp32", False)


@pytest.fixture(scope="module")
def wds_dir(small_data, tmp_path_factory):
    """120 train images in 11 shards (not a multiple of 4 streams), 20 val in 2."""
    out = str(tmp_path_factory.mktemp("wds"))
    shards.write(small_data, out, 31_000)
    return out


@pytest.fixture(scope="module")
def hf_dir(small_data, tmp_path_factory):
    """The folder's files as rows, in the folder reader's order, the files' own bytes."""
    datasets = pytest.importorskip("datasets")
    out = str(tmp_path_factory.mktemp("hf"))
    classes = folder.ImageFolder(small_data, "train", lambda x: x).classes
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=classes)})
    parts = {}
    for split in ("train", "val"):
        ds = folder.ImageFolder(small_data, split, lambda x: x)
        rows = {"image": [{"bytes": open(p, "rb").read(), "path": None} for p, _ in ds.samples],
                "label": [l for _, l in ds.samples]}
        parts[split] = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict(parts).save_to_disk(out)
    return out


def _cfg(name, path, **over):
    return few_steps(name, path, **over)


def _ids(small_data, split="train"):
    """File bytes -> the folder reader's index: which sample a stream delivered."""
    ds = folder.ImageFolder(small_data, split, lambda x: x)
    return {open(p, "rb").read(): i for i, (p, _) in enumerate(ds.samples)}


def _stream(c, rank, world, ids, train=True):
    src = pipeline.source(c, c.data.train_split if train else c.data.eval_split)
    return streams.Stream(src, lambda raw: torch.tensor(ids[raw]), None, lambda raw: raw,
                          c.seed, rank, world, c.data.num_workers, shuffle=train,
                          buffer=pipeline.shuffle_buffer(c))


def _collect(samples):
    return [int(s["image"]) for s in samples]


def test_ranks_and_workers_read_every_sample_once_per_epoch(wds_dir, small_data):
    """2 ranks x 2 workers over 11 shards: each epoch, every sample once; epochs differ;
    evaluation streams cover the split once, in order within a shard."""
    c = _cfg("vit_b32", wds_dir, **{"data.format": "wds", "data.num_workers": 2,
                                    "data.shuffle_buffer": 16})
    ids = _ids(small_data)
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            st = _stream(c, rank, 2, ids)
            for slot in range(2):
                seen += [int(st.sample(e, it)["image"]) for e, it in
                         st.epoch_items(rank * 2 + slot, epoch)]
        assert sorted(seen) == list(range(120))
        orders.append(seen)
    assert orders[0] != orders[1]
    seen = []
    vids = _ids(small_data, "val")
    for rank in range(2):
        st = _stream(c, rank, 2, vids, train=False)
        ev = streams.EvalStream(st, 3, _collect)
        for w in range(2):
            with _as_worker(w, 2):
                batches = list(ev)
            assert all(len(b) <= 3 for b in batches)
            seen += sum(batches, [])
    assert sorted(seen) == list(range(20))


class _as_worker:
    """Run a stream's ``__iter__`` as data-loader worker ``w`` of ``n``, in this process."""

    def __init__(self, w, n):
        self.w, self.n = w, n

    def __enter__(self):
        self.old = streams._worker
        streams._worker = lambda: (self.w, self.n)

    def __exit__(self, *a):
        streams._worker = self.old


def _train_batches(c, rank, ids, start, total, local=8):
    st = _stream(c, rank, 2, ids)
    ts = streams.TrainStream(st, local, start, total, _collect)
    per_worker = []
    for w in range(2):
        with _as_worker(w, 2):
            per_worker.append(list(ts))
    # the data loader takes the workers' batches in turn
    out = []
    for i in range(total - start):
        out.append(per_worker[i % 2][i // 2])
    return out


def test_training_batches_resume_at_any_step(wds_dir, small_data):
    """Steps 0..19 (several epochs per stream) uninterrupted, or resumed at an odd step
    mid-epoch: the same batches; each slot's stream is read without gap or repeat."""
    c = _cfg("vit_b32", wds_dir, **{"data.format": "wds", "data.num_workers": 2,
                                    "data.shuffle_buffer": 16})
    ids = _ids(small_data)
    for rank in (0, 1):
        straight = _train_batches(c, rank, ids, 0, 20)
        assert all(len(b) == 8 for b in straight)
        assert _train_batches(c, rank, ids, 7, 20) == straight[7:]
    pos = pipeline.data_position(c, 2, 7, 3)
    assert pos["step"] == 7 and len(pos["streams"]) == 4
    assert {"epoch", "sample", "shard", "offset"} <= set(pos["streams"][0])
    c2 = _cfg("vit_b32", wds_dir, **{"data.format": "wds", "data.num_workers": 1})
    with pytest.raises(folder.DatasetError, match="workers"):
        pipeline.check_resume(c2, 2, pos)


@pytest.mark.parametrize("fmt", ["wds", "hf", "wds-device"])
def test_a_sample_is_the_folder_readers_sample(fmt, wds_dir, hf_dir, small_data):
    """MAE's train transform and mask (or, with data.decode='device', the JPEG's own bytes
    and the drawn crop and flip), sample i of epoch e: the same tensors from a shard or a
    dataset row as from the file."""
    if fmt == "wds-device":
        c = experiment("vit_b32", "tiny", **{"data.path": small_data, "data.num_workers": 0,
                                             "data.decode": "device", "data.device_normalize": True})
        fmt = "wds"
    else:
        c = experiment("mae_base", "tiny", **{"data.path": small_data, "data.num_workers": 0})
    task = tasks.get(c.task)
    ref = pipeline.train_dataset(c, task)
    if fmt == "hf":
        c.data.update(format="hf", path=hf_dir)
        ds = pipeline.train_dataset(c, task)
        got = {i: ds[(i, sample_seed(c.seed, 1, i))] for i in (0, 57, 119)}
    else:
        c.data.update(format="wds", path=wds_dir)
        st = pipeline._stream(c, "train", pipeline.task_transform(c, task, True),
                              pipeline.seed_extras(c, task), 0, 1, train=True)
        got = {}
        for e, it in st.epoch_items(0, 1):
            i = st.start_of[it[0]] + it[1]
            if i in (0, 57, 119):
                got[i] = st.sample(e, it)
    assert sorted(got) == [0, 57, 119]
    for i, x in got.items():
        y = ref[(i, sample_seed(c.seed, 1, i))]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)
    if c.data.decode == "device":
        # the loader's batch of JPEG bytes, decoded and replayed on the device
        c.batch_size = 8
        batch = next(iter(pipeline.train_loader(c, CPU, task, 0, 1)[0]))
        assert all(x.dtype == torch.uint8 and x.dim() == 1 for x in batch["image"])
        out = pipeline.to_device(batch, "cpu", c.data)
        assert out["image"].shape == (8, 3, 32, 32) and out["image"].dtype == torch.float32
        assert pipeline.data_position(c, 1, 2, 3)["streams"][0]["shard"].endswith(".tar")


def _summary(c, workdir):
    s = loop.train(c, str(workdir))
    return {k: v for k, v in s.items() if k != "img_s_per_device"}


def test_hf_run_equals_folder_run(hf_dir, small_data, tmp_path, one_thread):
    """The same rows in the same order: the same run, loss and evaluation bitwise."""
    c = _cfg("vit_b32", small_data, **{"deterministic": True})
    a = _summary(c, tmp_path / "folder")
    c.data.update(format="hf", path=hf_dir)
    b = _summary(c, tmp_path / "hf")
    assert a == b


def test_wds_run_trains_evaluates_and_resumes_mid_epoch(wds_dir, tmp_path, one_thread):
    """:tiny on shards, 2 workers: trains, evaluates every val image once, and a run
    stopped after step 4 of 8 (mid-epoch: 3 steps per epoch) resumes to the uninterrupted
    run's summary and checkpoint."""
    over = {"data.format": "wds", "data.num_workers": 2, "data.shuffle_buffer": 16,
            "deterministic": True, "steps": 8, "checkpoint_every": 4, "eval_every": 8}
    c = _cfg("vit_b32", wds_dir, **over)
    a = _summary(c, tmp_path / "straight")
    assert a["steps"] == 8 and a["skipped_images"] == 0
    meta = json.load(open(_last_meta(tmp_path / "straight")))
    assert meta["data_position"]["streams"][0]["shard"].endswith(".tar")
    # as if killed after the checkpoint of step 4: the later checkpoint and summary gone
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", run)
    ck = run / "checkpoints"
    for name in sorted(os.listdir(ck))[1:]:
        shutil.rmtree(ck / name)
    os.remove(run / "summary.json")
    assert sorted(os.listdir(ck)) == ["step_00000004"]
    b = _summary(c, run)
    assert a == b
    import safetensors.torch
    x = safetensors.torch.load_file(_last_meta(tmp_path / "straight").replace("meta.json", "state.safetensors"))
    y = safetensors.torch.load_file(_last_meta(run).replace("meta.json", "state.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)


def _last_meta(workdir):
    d = os.path.join(workdir, "checkpoints")
    return os.path.join(d, sorted(os.listdir(d))[-1], "meta.json")


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_hf_streaming_reads_every_row_once(kind, hf_dir, small_data, tmp_path):
    """Streamed from a saved dataset (row ranges as shards) or from Parquet files through
    ``load_dataset`` (one shard per file): 2 ranks x 2 workers read every row once."""
    path, val = hf_dir, "val"
    if kind == "parquet":
        import datasets
        dd = datasets.load_from_disk(hf_dir)
        path, val = str(tmp_path / "pq"), "validation"
        for k in range(5):
            dd["train"].shard(5, k, contiguous=True).to_parquet(f"{path}/train-0000{k}-of-00005.parquet")
        dd["val"].to_parquet(f"{path}/validation-00000-of-00001.parquet")
    c = _cfg("vit_b32", path, **{"data.format": "hf", "data.hf_streaming": True,
                                 "data.num_workers": 2, "data.eval_split": val})
    ids = _ids(small_data)
    seen = []
    for rank in range(2):
        st = _stream(c, rank, 2, ids)
        for slot in range(2):
            seen += [int(st.sample(e, it)["image"]) for e, it in st.epoch_items(rank * 2 + slot, 0)]
    assert sorted(seen) == list(range(120))
    assert pipeline.split_info(c, val)[0] == 20
    # through the data loader's worker processes: each reads its own shards, whole
    batches = list(pipeline.train_loader(c, CPU, tasks.get(c.task), 0, 2)[0])
    assert [(b["label"].shape[0], int(b["skipped"])) for b in batches] == [(32, 0), (32, 0)]


@pytest.mark.parametrize("fmt", ["wds", "hf"])
def test_bench_data_mode_measures_each_format(fmt, wds_dir, hf_dir, one_thread):
    from mim import bench
    c = _cfg("vit_b32", wds_dir if fmt == "wds" else hf_dir,
             **{"data.format": fmt, "data.num_workers": 1, "batch_size": 8})
    r = bench.bench_data(c, batches=2, images=8)
    assert r["format"] == fmt and r["images_in_split"] == 120
    assert r["one_worker_images_per_s"] > 0 and r["loader_images_per_s"] > 0


def test_imagenet_size_set_for_data_figures(tmp_path):
    """The set BENCHMARKS.md's data-format figures read: 500x375 JPEGs, per_class per class."""
    from PIL import Image
    from mim.data import throughput
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party",
                       "cifar10-mini")
    n = throughput.write_imagenet_size_set(src, str(tmp_path / "set"), per_class=2)
    classes = sorted(os.listdir(tmp_path / "set" / "train"))
    assert n == 2 * len(classes) == 20
    first = os.listdir(tmp_path / "set" / "train" / classes[0])[0]
    assert Image.open(tmp_path / "set" / "train" / classes[0] / first).size == (500, 375)
