"""Official checkpoints by name (mim.checkpoints.registry, python -m mim.weights): a local
HTTP server on 127.0.0.1 (a random free port, stopped by the test) serves small
checkpoints written in the official layouts by mim's own exporters; downloads go into a
temporary MIM_CACHE."""
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT
from mim import convert, tree
from mim.checkpoints import registry
from mim.sweep import load_config

TINY_VIT = "experiments/vit_b32.py:tiny"


class Server:
    """Serves ``files`` ({name: bytes}) with HTTP Range; ``cut[name] = n`` sends the full
    Content-Length but only the first n bytes, then closes (an interrupted download)."""

    def __init__(self, files):
        self.files, self.cut, self.requests = dict(files), {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                outer.requests.append((name, self.headers.get("Range")))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data, start = outer.files[name], 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                cut = outer.cut.pop(name, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A tiny ViT exported in timm's layout (safetensors), and its parameters."""
    cfg = load_config(TINY_VIT).model
    params = convert.read("mim", _mim_tree(tmp_path_factory, cfg), None)[0]
    path = str(tmp_path_factory.mktemp("timm") / "vit.safetensors")
    convert.write("timm", params, {}, cfg, path)
    with open(path, "rb") as f:
        return f.read(), tree.flatten(params)


def _mim_tree(tmp_path_factory, cfg):
    from mim.models import vit
    params = vit.init(torch.Generator().manual_seed(3), cfg)
    path = str(tmp_path_factory.mktemp("tree") / "t.safetensors")
    convert.save_mim(params, {}, cfg, path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIM_WEIGHTS_MIRROR", raising=False)
    return tmp_path / "cache"


def _release(server_url, name="tiny_vit", fmt="timm", **kw):
    return registry.Release(name, (f"{server_url}/{name}.safetensors",), fmt, TINY_VIT, "test", **kw)


def _register(monkeypatch, release):
    monkeypatch.setitem(registry.BY_NAME, release.name, release)


def test_every_entry_has_an_official_url_a_known_format_and_an_existing_experiment():
    from mim.checkpoints import FORMATS
    known = set(FORMATS) | set(convert.FORMATS) | {"dalle"}
    names = [r.name for r in registry.RELEASES]
    assert len(names) == len(set(names))
    for r in registry.RELEASES:
        assert r.format in known, r
        assert r.urls and all(u.startswith("https://") for u in r.urls), r
        if r.experiment:
            assert os.path.isfile(os.path.join(ROOT, r.experiment.split(":")[0])), r
    # the releases the issue lists are there, each family with its publisher's host
    hosts = {"mae_pretrain_vit_base": "dl.fbaipublicfiles.com", "beit_base_patch16_224_pt22k_ft22k": "github.com",
             "moby_swin_t_300ep_linear": "github.com", "dalle_encoder": "cdn.openai.com",
             "vit_base_patch32_224.augreg_in21k": "huggingface.co",
             "simmim_pretrain__swin_base__img192_window6__100ep": "drive.google.com"}
    for name, host in hosts.items():
        assert host in registry.get(name).urls[0]


def test_first_download_then_cache_hit_without_a_request(cache, monkeypatch, timm_file):
    data, _ = timm_file
    with Server({"tiny_vit.safetensors": data}) as s:
        r = _release(s.url)
        _register(monkeypatch, r)
        path = registry.resolve("tiny_vit")
        assert open(path, "rb").read() == data and path.startswith(str(cache))
        assert len(s.requests) == 1
        # the SHA-256 is recorded at the first download, and the second use asks nothing
        assert registry.check(r, path) == hashlib.sha256(data).hexdigest()
        assert registry.resolve("tiny_vit") == path
        assert len(s.requests) == 1
        assert not [p for p in os.listdir(os.path.dirname(path)) if p.endswith(".part")]


def test_a_name_starts_a_run_from_the_downloaded_weights(cache, monkeypatch, tmp_path, timm_file):
    from mim.train.setup import Setup
    data, flat = timm_file
    with Server({"tiny_vit.safetensors": data}) as s:
        _register(monkeypatch, _release(s.url))
        c = load_config(TINY_VIT)
        c.unlock()
        c.init.checkpoint, c.init.format = "tiny_vit", "timm"
        got = tree.flatten(Setup(c, str(tmp_path / "run")).init_params()[0])
    loaded = [k for k in flat if not k.startswith("head.")]
    assert loaded and all(torch.equal(got[k], flat[k]) for k in loaded)


def test_a_corrupt_file_is_refused_and_never_used(cache, monkeypatch, timm_file):
    data, _ = timm_file
    bad = bytearray(data)
    bad[-10] ^= 0xFF
    with Server({"tiny_vit.safetensors": bytes(bad)}) as s:
        r = _release(s.url, sha256=hashlib.sha256(data).hexdigest())
        _register(monkeypatch, r)
        with pytest.raises(registry.WeightsError) as e:
            registry.resolve("tiny_vit")
    line = str(e.value)
    assert "\n" not in line and "SHA-256" in line and r.urls[0] in line and registry.cache_path(r) in line
    assert not os.path.exists(registry.cache_path(r))


def test_a_file_changed_after_its_first_download_is_refused(cache, monkeypatch, timm_file):
    data, _ = timm_file
    with Server({"tiny_vit.safetensors": data}) as s:
        r = _release(s.url)
        _register(monkeypatch, r)
        path = registry.resolve("tiny_vit")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(registry.WeightsError, match="SHA-256"):
        registry.resolve("tiny_vit")


def test_an_interrupted_download_is_resumed_with_a_range_request(cache, monkeypatch, timm_file):
    data, _ = timm_file
    half = len(data) // 2
    with Server({"tiny_vit.safetensors": data}) as s:
        r = _release(s.url)
        _register(monkeypatch, r)
        s.cut["tiny_vit.safetensors"] = half
        with pytest.raises(registry.WeightsError, match="again to resume"):
            registry.resolve("tiny_vit")
        assert not os.path.exists(registry.cache_path(r))          # nothing half-written is used
        assert os.path.getsize(registry.cache_path(r) + ".part") == half
        path = registry.resolve("tiny_vit")
        assert s.requests[-1] == ("tiny_vit.safetensors", f"bytes={half}-")
    assert open(path, "rb").read() == data


def _weights_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "mim.weights", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **env))


def test_no_server_is_one_line_naming_the_url_and_the_cache_path(tmp_path):
    with socket.socket() as sock:             # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    name = "vit_base_patch32_224.augreg_in21k"
    p = _weights_cli("download", name, env={"MIM_CACHE": str(tmp_path), "MIM_WEIGHTS_MIRROR": f"http://127.0.0.1:{port}"})
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1, p.stdout + p.stderr
    assert f"http://127.0.0.1:{port}/{name}.safetensors" in lines[0]
    assert str(tmp_path / name / f"{name}.safetensors") in lines[0] and "Traceback" not in lines[0]
    assert not list((tmp_path / name).glob("*.safetensors"))


def test_cli_list_download_verify(cache, monkeypatch, capsys, timm_file):
    from mim import cli, weights
    data, _ = timm_file
    name = "vit_base_patch32_224.augreg_in21k"

    def run(*args):
        code = cli.run_command("mim.weights", weights.main, list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run("list")
    assert code == 0 and all(r.name in out for r in registry.RELEASES)
    with Server({f"{name}.safetensors": data}) as s:
        monkeypatch.setenv("MIM_WEIGHTS_MIRROR", s.url)
        code, out, err = run("download", name)
    assert code == 0 and hashlib.sha256(data).hexdigest() in out, err
    assert run("verify", name)[0] == 0
    with open(cache / name / f"{name}.safetensors", "ab") as f:
        f.write(b"x")
    code, _, err = run("verify", name)
    assert code == 1 and "is not the published file" in err and len(err.splitlines()) == 1
    code, _, err = run("download", "nosuch")
    assert code == 2 and "no official checkpoint named 'nosuch'" in err


def test_convert_reads_a_name_and_the_dalle_encoder_needs_the_trust_flag(cache, monkeypatch, capsys,
                                                                         tmp_path, timm_file):
    from mim import cli
    data, flat = timm_file
    out = str(tmp_path / "tree.safetensors")
    with Server({"tiny_vit.safetensors": data}) as s:
        _register(monkeypatch, _release(s.url))
        args = ["--from=timm", "--to=mim", f"--config={TINY_VIT}", "tiny_vit", out]
        assert cli.run_command("mim.convert", convert.main, args) == 0, capsys.readouterr().err
    params = tree.flatten(convert.load_mim(out)[0])
    assert all(torch.equal(params[k], v) for k, v in flat.items())
    # OpenAI's encoder is a pickle: a name alone never unpickles it
    with pytest.raises(registry.WeightsError, match="--trust-pickle") as e:
        registry.resolve("dalle_encoder")
    assert "\n" not in str(e.value) and "https://cdn.openai.com/dall-e/encoder.pkl" in str(e.value)
    with pytest.raises(registry.UnknownName, match="python -m mim.weights list"):
        registry.resolve("no_such_checkpoint")


def test_a_torch_file_is_converted_once_to_safetensors_with_its_arguments(cache, monkeypatch, tmp_path,
                                                                         timm_file):
    """An official .pth (a {"model", "args"} training checkpoint, as MAE's) becomes a
    safetensors file in the cache at first use, holding the same tensors and the training
    arguments; later uses read that file and ask the server nothing."""
    import argparse
    import io
    from mim.checkpoints import weights
    _, flat = timm_file
    buf = io.BytesIO()
    torch.save({"model": flat, "args": argparse.Namespace(model="vit_tiny", norm_pix_loss=True),
                "epoch": 3}, buf)
    with Server({"ckpt.pth": buf.getvalue()}) as s:
        r = registry.Release("tiny_pth", (f"{s.url}/ckpt.pth",), "mae", TINY_VIT, "test")
        _register(monkeypatch, r)
        path = registry.resolve("tiny_pth")
        assert path.endswith(".mim.safetensors") and path.startswith(str(cache))
        got, args = weights.read_with_args(path)
        assert set(got) == set(flat) and all(torch.equal(got[k], flat[k]) for k in flat)
        assert args == {"model": "vit_tiny", "norm_pix_loss": True}
        stamp = os.stat(path).st_mtime_ns
        assert registry.resolve("tiny_pth") == path and os.stat(path).st_mtime_ns == stamp
        assert len(s.requests) == 1
