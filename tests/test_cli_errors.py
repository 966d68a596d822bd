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
            "mim.plot", "mim.models")


def test_every_command_imports_beside_the_others_and_prints_its_help():
    """Several commands define flags of the same names (--config, --out, --checkpoint): each
    defines them only when it runs, so a program (or this suite) may import them all; each
    command's --help names its own flags (absl's --help exits with status 1)."""
    import importlib
    code = "; ".join(f"importlib.import_module({m!r})" for m in COMMANDS)
    p = subprocess.run([sys.executable, "-c", f"import importlib; {code}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for m in ("mim.embed", "mim.reconstruct"):
        importlib.import_module(m)
        p = subprocess.run([sys.executable, "-m", m, "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert "--checkpoint:" in p.stdout and "Traceback" not in p.stderr, p.stderr[-3000:]
