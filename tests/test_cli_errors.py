"""Mistakes on the command line of ``python -m mim.main``: each stops with one line that
names it (no traceback), with exit status 2, before any file is written; MIM_DEBUG=1 or
--verbose shows the traceback."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mim import cli

TINY = "experiments/vit_b32.py:tiny"


def main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mim.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **(env or {})))


def one_line(p):
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, p.stdout + p.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


def test_a_misspelt_field_is_one_line_and_keeps_the_suggestion(tmp_path):
    wd = tmp_path / "run"
    p = main(f"--config={TINY}", f"--workdir={wd}", "--config.optim.lrr=1")
    assert p.returncode == 2
    assert one_line(p) == ("mim.main: error: --config.optim.lrr: the config has no field 'lrr'; "
                           'did you mean "lr" instead of "lrr"?')
    assert not wd.exists()


def test_a_config_mistake_is_one_line(tmp_path):
    wd = tmp_path / "run"
    p = main(f"--config={TINY}", f"--workdir={wd}", "--config.precision=fp8")
    assert p.returncode == 2 and "config.precision: 'fp8' is not one of" in one_line(p)
    assert not wd.exists()


def test_unknown_variant_names_the_known_ones(tmp_path):
    p = main("--config=experiments/vit_b32.py:tiny,nosuch", f"--workdir={tmp_path / 'run'}")
    line = one_line(p)
    assert p.returncode == 2
    assert "unknown variant key 'nosuch'" in line and "known keys: batch_size, perf, steps, tiny" in line


def test_missing_config_file_is_named_once(tmp_path):
    p = main("--config=experiments/nope.py:tiny", f"--workdir={tmp_path / 'run'}")
    assert p.returncode == 2 and "no experiment file 'experiments/nope.py'" in one_line(p)


def test_a_workdir_that_is_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = main(f"--config={TINY}", f"--workdir={f}")
    assert p.returncode == 2 and f"--workdir={f} is a file" in one_line(p)
    assert f.read_text() == "x"


def test_the_developer_switch_shows_the_traceback(tmp_path):
    p = main(f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.precision=fp8",
             env={"MIM_DEBUG": "1"})
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in p.stderr and "config.precision: 'fp8'" in p.stderr


# The same rules in-process (no interpreter start-up per case).

def test_workdir_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(cli.UsageMistake, match="which is not a directory"):
        cli.check_workdir(str(f / "a" / "b"))
    cli.check_workdir(str(tmp_path / "new" / "deeper"))          # creatable: accepted
    assert not (tmp_path / "new").exists()                        # and nothing created
    if os.geteuid() != 0:                                         # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(cli.UsageMistake, match="cannot be written"):
                cli.check_workdir(str(ro / "run"))
        finally:
            ro.chmod(0o700)


def test_ml_collections_own_error_is_read():
    """The message is built from the error ml_collections raises for an unknown field
    (not a copy of its text): a change of its wording shows here."""
    import ml_collections
    c = ml_collections.ConfigDict({"optim": {"lr": 1.0}})
    for wrong, flag, want in [("lrr", "--config.optim.lrr", '; did you mean "lr" instead of "lrr"?'),
                              ("zzzzzz", "--config.optim.zzzzzz", "")]:
        with pytest.raises(AttributeError) as info:
            getattr(c.optim, wrong)
        got = cli.unknown_field(info.value, ["mim.main", f"{flag}=1"])
        assert got == f"{flag}: the config has no field {wrong!r}{want}"
    assert cli.unknown_field(AttributeError("something else"), []) is None


def test_developer_switch_and_exit_codes():
    from mim.config import ConfigError
    from mim.data.folder import DatasetError
    assert cli.debug(["mim.main", "--verbose"])
    assert cli.exit_code(ConfigError("x")) == cli.exit_code(DatasetError("x")) == 2
    assert cli.exit_code(RuntimeError("x")) == 1
    assert (cli.EXIT_FINISHED, cli.EXIT_STOPPED) == (0, 3)
    assert cli.one_line(RuntimeError("a\n  b")) == (
        "RuntimeError: a b (MIM_DEBUG=1 or --verbose shows the traceback)")


COMMANDS = ("mim.main", "mim.bench", "mim.sweep", "mim.embed", "mim.reconstruct", "mim.convert",
            "mim.plot", "mim.models", "mim.predict", "mim.weights")


def test_every_command_imports_beside_the_others_and_prints_its_help():
    """Several commands define flags of the same names (--config, --out, --checkpoint): each
    defines them only when it runs, so a program (or this suite) may import them all; each
    command's --help names its own flags (absl's --help exits with status 1)."""
    import importlib
    code = "; ".join(f"importlib.import_module({m!r})" for m in COMMANDS)
    p = subprocess.run([sys.executable, "-c", f"import importlib; {code}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for m in ("mim.embed", "mim.reconstruct", "mim.predict"):
        importlib.import_module(m)
        p = subprocess.run([sys.executable, "-m", m, "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert "--checkpoint:" in p.stdout and "Traceback" not in p.stderr, p.stderr[-3000:]


# The other commands answer a mistake as mim.main does (mim.cli.run_command / guard).

def command(module, *args, env=None):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """A tiny ViT in timm's layout and a tiny MAE pretraining model in MAE's, written by
    mim's exporters."""
    import torch

    from mim import convert
    from mim.models import mae, vit
    from mim.sweep import load_config
    d = tmp_path_factory.mktemp("official")
    vcfg, mcfg = load_config(TINY).model, load_config("experiments/mae_base.py:tiny").model
    convert.write("timm", vit.init(torch.Generator().manual_seed(0), vcfg), {}, vcfg, str(d / "vit.pth"))
    convert.write("mae", mae.init(torch.Generator().manual_seed(0), mcfg), {}, mcfg, str(d / "mae.pth"))
    return d


def test_convert_of_a_garbage_or_truncated_file_is_one_line(tmp_path, capsys, monkeypatch, official_files):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is no checkpoint" * 10)
    truncated = tmp_path / "truncated.pth"
    data = (official_files / "vit.pth").read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    p = command("mim.convert", "--from=timm", "--to=mim", f"--config={TINY}", str(garbage),
                str(tmp_path / "o.safetensors"))
    line = one_line(p)
    assert p.returncode == 2 and line.startswith(f"mim.convert: error: {garbage}: not a checkpoint file"), line
    # the same through the same guard in this process: the truncated file, and the traceback on request
    from mim import convert
    args = ["--from=timm", "--to=mim", f"--config={TINY}", str(truncated), str(tmp_path / "o.safetensors")]
    with pytest.raises(SystemExit) as e:
        cli.run_command("mim.convert", convert.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"mim.convert: error: {truncated}: not a checkpoint file")
    monkeypatch.setenv("MIM_DEBUG", "1")
    with pytest.raises(convert.ConvertError):
        cli.run_command("mim.convert", convert.main, args)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_wrong_format_conversion_says_what_the_file_looks_like(tmp_path, official_files):
    from mim import convert
    from mim.sweep import load_config
    with pytest.raises(convert.ConvertError) as e:
        convert.read("timm", str(official_files / "mae.pth"), load_config(TINY).model)
    message = str(e.value)
    assert "looks like an MAE pretraining model (--from=mae)" in message and len(message) < 600
    with pytest.raises(convert.ConvertError, match=r"looks like a timm / MAE-encoder ViT \(--from=timm"):
        convert.read("mae", str(official_files / "vit.pth"), load_config("experiments/mae_base.py:tiny").model)
    assert cli.exit_code(e.value) == 2


def test_sweep_with_an_unknown_sweep_is_one_line(tmp_path):
    p = command("mim.sweep", "--config=experiments/mae_base.py:tiny", "--sweep=nosuch",
                f"--workdir={tmp_path / 'sw'}", "--dry_run")
    assert p.returncode == 2
    assert one_line(p) == ("mim.sweep: error: experiments/mae_base.py has no sweep 'nosuch'; it declares: "
                           "decoder_depth, mask_ratio")


def test_embed_mistakes_are_one_line_and_unreadable_images_are_skipped(tmp_path, official_files):
    import numpy as np
    from PIL import Image

    from mim import embed
    p = command("mim.embed", f"--checkpoint={tmp_path / 'nosuch'}", f"--images={tmp_path}", "--out=f.txt")
    assert p.returncode == 2 and one_line(p).startswith("mim.embed: error: ")
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / "notes.jpg").write_text("a text file named .jpg")
    with pytest.warns(UserWarning, match="notes.jpg"):
        r = embed.embed(str(official_files / "vit.pth"), str(tmp_path / "images"), str(tmp_path / "f.npy"),
                        fmt="timm", config_spec=TINY)
    assert r["paths"] == [os.path.join("a", "0.png"), os.path.join("a", "1.png")]
    assert r["features"].shape[0] == 2 and r["labels"].tolist() == [0, 0]


def test_init_from_another_familys_run_says_so(tmp_path):
    import json

    import torch

    from mim.checkpoints import io as ckpt
    from mim.config import ConfigError
    from mim.sweep import load_config
    from mim.train.setup import Setup, fingerprint
    moby = load_config("experiments/moby_swin_tiny.py:tiny")
    s = Setup(moby, str(tmp_path / "moby"))
    params, state = s.task.init(moby, torch.Generator().manual_seed(0))
    ckpt.save(s.ckpt_root, 1, {"params": params, "model_state": state},
              {"fingerprint": fingerprint(moby), "config": json.loads(moby.to_json_best_effort())}, 1)
    c = load_config(TINY)
    c.unlock()
    c.init.checkpoint, c.init.format = str(tmp_path / "moby"), "timm"
    with pytest.raises(ConfigError) as e:
        Setup(c, str(tmp_path / "run")).init_params()
    message = str(e.value)
    assert "is a mim run of a 'moby' model; init.format=timm cannot start this 'vit' model" in message
    assert "tensor(" not in message and len(message) < 400


def test_a_second_run_into_a_locked_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import json
    import socket

    from mim.train import workdir_lock
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wd = tmp_path / "run"
        wd.mkdir()
        (wd / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        p = main(f"--config={TINY},steps=1", f"--workdir={wd}")
        line = one_line(p)
        assert p.returncode == 2 and f"in use by process {holder.pid} on host {socket.gethostname()}" in line
        assert not (wd / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and is taken over, then released
    path = workdir_lock.acquire(str(wd))
    assert json.loads(open(path).read())["pid"] == os.getpid()
    workdir_lock.release(path, os.getpid())
    assert not os.path.exists(path)
