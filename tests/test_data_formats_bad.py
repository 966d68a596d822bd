"""data.format='wds' with shards over HTTP and pipes, bad shards (truncated, missing, a
sample without a label, an unreadable image: warned, counted, training goes on), patterns
that match nothing and unreachable hosts (an error before any work), the shard writer's
resume, and the config's data.format fields."""
import functools
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading

import pytest
import torch

from conftest import few_steps
from mim import config as config_lib
from mim.data import folder, pipeline, shards, streams, wds
from mim.train import loop


@pytest.fixture(scope="module")
def good(small_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("wds_good"))
    shards.write(small_data, out, 31_000)
    return out


@pytest.fixture
def served(good):
    """The shard folder on an HTTP server at 127.0.0.1 (a free port), stopped after."""
    handler = functools.partial(_Quiet, directory=good)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _cfg(path, **over):
    return few_steps("vit_b32", path, **{"data.format": "wds", **over})


def _keys(c, split="train"):
    """(label, image bytes digest) of every sample of one epoch, S=1, no shuffle."""
    src = pipeline.source(c, split)
    st = streams.Stream(src, lambda raw: torch.tensor(0), None, lambda raw: raw, 0, 0, 1, 1,
                        shuffle=False, buffer=1)
    out = []
    for _, it in st.epoch_items(0, 0):
        out.append((it[4], hashlib.sha1(it[3]).hexdigest()))
    return sorted(out)


def test_http_urls_and_pipes_read_the_same_samples(good, served):
    local = _keys(_cfg(good))
    assert len(local) == 120
    assert _keys(_cfg(served)) == local                                  # folder URL + info.json
    pattern = served + "train-{000000..000010}.tar"
    assert _keys(_cfg(pattern)) == local                                 # brace pattern URL
    piped = f"pipe:cat {good}/train-{{000000..000010}}.tar"
    c = _cfg(piped)
    assert _keys(c) == local                                             # counted in one pass
    assert pipeline.split_info(c, "train")[1] == [str(i) for i in range(10)]
    with pytest.warns(UserWarning, match=r"train-000011\.tar is missing"):
        src = pipeline.source(_cfg(served + "train-{000000..000011}.tar"), "train")
    assert len(src) == 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("path, message", [
    ("{tmp}/nothing-{{0000..0003}}.tar", "no shard found"),
    ("http://127.0.0.1:{port}/", "unreachable URL"),
    ("http://127.0.0.1:{port}/train-{{0..3}}.tar", "unreachable URL"),
])
def test_nothing_to_read_is_a_one_line_error_before_any_work(tmp_path, path, message):
    c = _cfg(path.format(tmp=tmp_path, port=_free_port()))
    work = tmp_path / "run"
    with pytest.raises(folder.DatasetError, match=message) as e:
        loop.train(c, str(work))
    assert "\n" not in str(e.value)
    assert not os.path.exists(work / "config.json")


def _rewrite(path, change):
    """A shard rewritten member by member: ``change(name, data)`` gives new bytes or None
    (member dropped)."""
    members = []
    with tarfile.open(path) as t:
        for m in t.getmembers():
            members.append((m.name, t.extractfile(m).read()))
    with tarfile.open(path, "w") as t:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return [n for n, _ in members]


@pytest.fixture
def bad(good, tmp_path):
    """Shard 3 truncated, shard 5 missing, in shard 1 one sample without its .cls and one
    whose image is garbage; returns (folder, samples that cannot be used)."""
    import shutil
    out = str(tmp_path / "bad")
    shutil.copytree(good, out)
    names = _rewrite(os.path.join(out, "train-000001.tar"), lambda n, d: d)
    keys = sorted({n.split(".")[0] for n in names})
    no_label, garbage = keys[1], keys[2]
    _rewrite(os.path.join(out, "train-000001.tar"),
             lambda n, d: None if n == f"{no_label}.cls" else
             (b"not an image" if n.startswith(garbage + ".") and not n.endswith(".cls") else d))
    t3 = os.path.join(out, "train-000003.tar")
    size3 = sum(1 for n in tarfile.open(t3).getnames() if n.endswith(".cls"))
    with open(t3, "r+b") as f:
        f.truncate(os.path.getsize(t3) // 2)
    readable = 0
    try:
        for _ in wds.read_shard(t3):
            readable += 1
    except Exception:  # noqa: BLE001 - the truncated tar's error
        pass
    t5 = os.path.join(out, "train-000005.tar")
    size5 = sum(1 for n in tarfile.open(t5).getnames() if n.endswith(".cls"))
    os.remove(t5)
    return out, (size3 - readable) + size5 + 2, (no_label, garbage)


def test_bad_shards_are_warned_counted_and_training_goes_on(bad, tmp_path, one_thread):
    path, unusable, (no_label, garbage) = bad
    c = _cfg(path, **{"data.num_workers": 0})
    with pytest.warns(UserWarning) as caught:
        src = pipeline.source(c, "train")
        st = streams.Stream(src, lambda x: torch.tensor(0), None, folder.decode_bytes, 0, 0, 1, 1,
                            shuffle=True, buffer=16)
        got = [st.sample(e, it) for e, it in st.epoch_items(0, 0)]
    text = "\n".join(str(w.message) for w in caught)
    assert "train-000005.tar is missing" in text
    assert "train-000003.tar" in text
    assert f"train-000001.tar key {no_label}: no label" in text
    assert f"train-000001.tar key {garbage}" in text and "unreadable" in text
    assert len(got) == 120 and sum(x is None for x in got) == unusable
    # a whole run: every batch full, the skipped samples counted (one epoch and 8 images)
    c.steps, c.eval_every, c.checkpoint_every = 4, 4, 4
    with pytest.warns(UserWarning):
        s = loop.train(c, str(tmp_path / "run"))
    assert s["steps"] == 4 and unusable <= s["skipped_images"] <= unusable + 8
    assert s["eval_count"] == 20, s


def test_shard_writer_resumes_and_refuses_other_arguments(small_data, good, tmp_path):
    out = str(tmp_path / "w")
    shards.write(small_data, out, 31_000)
    digest = {n: hashlib.sha1(open(os.path.join(out, n), "rb").read()).hexdigest()
              for n in os.listdir(out)}
    assert digest == {n: hashlib.sha1(open(os.path.join(good, n), "rb").read()).hexdigest()
                      for n in os.listdir(good)}
    os.remove(os.path.join(out, "train-000004.tar"))
    open(os.path.join(out, "train-000004.tar.tmp"), "wb").write(b"half a shard")
    before = os.path.getmtime(os.path.join(out, "train-000002.tar"))
    shards.write(small_data, out, 31_000)
    assert os.path.getmtime(os.path.join(out, "train-000002.tar")) == before   # kept
    assert hashlib.sha1(open(os.path.join(out, "train-000004.tar"), "rb").read()).hexdigest() \
        == digest["train-000004.tar"]
    with pytest.raises(folder.DatasetError, match="other arguments"):
        shards.write(small_data, out, 62_000)
    assert shards.parse_size("1GB") == 10 ** 9 and shards.parse_size("2MiB") == 2 * 2 ** 20


@pytest.mark.parametrize("field, value, message", [
    ("format", "zip", "data.format"),
    ("eval_path", "/x/val-{0..3}.tar", "data.eval_path: is for data.format='wds'"),
    ("shuffle_buffer", 64, "data.shuffle_buffer: is for streamed data"),
    ("hf_streaming", True, "data.hf_streaming: is for data.format='hf'"),
    ("hf_image_column", "img", "data.hf_image_column: is for data.format='hf'"),
])
def test_data_format_fields_are_refused_where_they_do_nothing(field, value, message):
    c = config_lib.base()
    c.data.path, c.optim.lr = "/data", 0.1
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)
