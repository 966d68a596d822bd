"""Runs that tell the truth: every JSON file mim writes is strict JSON (no NaN token);
metrics.jsonl keeps one row per step across a resume; SIGTERM and Ctrl-C stop at a
checkpoint with a summary of the steps done and exit status 3; a finished run started
again changes nothing; evaluation counts unreadable files instead of scoring others
twice; eval mode takes a mim run's folder; initialisation says what it loaded."""
import glob
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, experiment, few_steps
from mim.train import metrics


def strict_load(text):
    """JSON as a strict reader (jq, JavaScript) reads it: NaN / Infinity are errors."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    with pytest.raises(ValueError):
        strict_load(json.dumps({"loss": float("nan")}))          # what json.dump does by default
    obj = {"final_loss": float("nan"), "x": [1.0, float("inf"), -float("inf")], "n": 3, "s": "a"}
    assert strict_load(metrics.dumps(obj)) == {"final_loss": None, "x": [1.0, None, None], "n": 3, "s": "a"}
    metrics.write_json(str(tmp_path / "s.json"), obj)
    assert strict_load((tmp_path / "s.json").read_text())["final_loss"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]   # no temporary file left


def test_metrics_rows_are_strict_json(tmp_path):
    w = metrics.Writer(str(tmp_path))
    w.write(1, {"loss": float("nan"), "lr": 0.1})
    w.close()
    row = strict_load((tmp_path / "metrics.jsonl").read_text())
    assert row["train/loss"] is None and row["train/lr"] == 0.1


def test_a_resumed_writer_keeps_one_row_per_step(tmp_path):
    """A run killed after step 7 with its last checkpoint at step 4 (the last line cut by
    the kill) resumes at 4: the rows of steps 5-7 are dropped, and the resumed run's rows
    follow, so every step has exactly one train row."""
    w = metrics.Writer(str(tmp_path))
    for s in range(1, 8):
        w.write(s, {"loss": 1.0 / s})
        if s == 4:
            w.write(s, {"acc1": 10.0}, prefix="eval")
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')                      # cut short by the kill
    w = metrics.Writer(str(tmp_path), resume_step=4)
    for s in range(5, 9):
        w.write(s, {"loss": 2.0 / s})
    w.close()
    rows = [strict_load(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r["step"] for r in rows if "train/loss" in r]
    assert train == list(range(1, 9))
    assert [r["step"] for r in rows if "eval/acc1" in r] == [4]
    assert all(math.isclose(r["train/loss"], (1.0 if r["step"] <= 4 else 2.0) / r["step"])
               for r in rows if "train/loss" in r)


# ----------------------------------------------------------------------------------------
# Through python -m mim.main, as a person or a scheduler runs it (real signals).



TINY = os.path.join(ROOT, "experiments", "vit_b32.py") + ":tiny"


def command(workdir, data, *extra):
    return [sys.executable, "-m", "mim.main", f"--config={TINY}", f"--workdir={workdir}",
            f"--config.data.path={data}", "--config.batch_size=8", "--config.eval_batch_size=20",
            "--config.log_every=1", "--config.eval_every=1000", *extra]


ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def start(cmd, **kw):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, **kw)


def wait_for_step(proc, n, timeout=300):
    """Read the run's console until ``step n/`` (returns the lines read)."""
    seen, t0 = [], time.time()
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {n}/"):
            return seen
        assert time.time() - t0 < timeout, "".join(seen)
    raise AssertionError("run ended before step %d:\n%s\n%s" % (n, "".join(seen), proc.stderr.read()))


def all_json_is_strict(workdir):
    for path in glob.glob(os.path.join(workdir, "**", "*.json*"), recursive=True):
        with open(path) as f:
            text = f.read()
        for line in (text.splitlines() if path.endswith(".jsonl") else [text]):
            strict_load(line)


def test_stop_resume_and_rerun_tell_the_truth(tmp_path, small_data):
    """SIGTERM after step 4 of 30: exit status 3 and a summary of the steps done, marked
    stopped. The same command resumes to the end (one metrics row per step), exits 0; and
    once more it says the run is complete and changes no file."""
    wd = tmp_path / "run"
    cmd = command(wd, small_data, "--config.steps=30", "--config.checkpoint_every=10")
    proc = start(cmd)
    wait_for_step(proc, 4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    summary = strict_load((wd / "summary.json").read_text())
    ckpts = sorted(os.listdir(wd / "checkpoints"))
    assert summary["status"] == "stopped" and summary["total_steps"] == 30
    assert 4 <= summary["steps"] < 30 and ckpts[-1] == f"step_{summary['steps']:08d}"
    assert "Resume with the same command" in out and "Traceback" not in err

    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    # the banner (small_data: 12 train and 2 val images per class) and each checkpoint
    workers = experiment("vit_b32").data.num_workers
    for line in (f"run: device cpu (compute threads 1, data workers {workers}), precision fp32, 1 process(es)",
                 "run: train split: 120 images in 10 classes; eval split: 20 images in 10 classes",
                 "run: batch 8 global, 8 per device",
                 f"run: steps 30 planned (2.00 epochs of 15 steps), resuming at step {summary['steps']}",
                 f"run: writing to {wd}"):
        assert line in p.stdout, p.stdout[:2000]
    assert "checkpoint of step 20 written" in p.stderr and "checkpoint of step 30 written" in p.stderr
    summary = strict_load((wd / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 30
    rows = [strict_load(line) for line in open(wd / "metrics.jsonl")]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 31))
    assert isinstance(summary["skipped_images"], int) and "eval_acc1" in summary
    all_json_is_strict(wd)

    before = {f: os.stat(f).st_mtime_ns for f in glob.glob(str(wd / "**"), recursive=True)}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert again.returncode == 0 and "run complete" in again.stdout
    assert f"eval_acc1 {summary['eval_acc1']:.4g}" in again.stdout      # its summary, shown
    assert {f: os.stat(f).st_mtime_ns for f in glob.glob(str(wd / "**"), recursive=True)} == before


def test_ctrl_c_checkpoints_and_a_second_one_exits_at_once(tmp_path, small_data):
    """Ctrl-C reaches the whole process group (the data-loader worker too): the first
    stops at a checkpoint (status 3, how to resume, no traceback); two in a row end the
    run at once with status 130."""
    wd = tmp_path / "once"
    proc = start(command(wd, small_data, "--config.steps=100000", "--config.checkpoint_every=100000",
                         "--config.data.num_workers=1"), start_new_session=True)
    wait_for_step(proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Resume with the same command" in out
    summary = strict_load((wd / "summary.json").read_text())
    assert summary["status"] == "stopped" and os.listdir(wd / "checkpoints") == [f"step_{summary['steps']:08d}"]

    # The second Ctrl-C once the first was taken (two before Python's handler runs count as
    # one): stderr joins stdout so the test sees the handler's line.
    wd = tmp_path / "twice"
    proc = subprocess.Popen(command(wd, small_data, "--config.steps=100000", "--config.checkpoint_every=100000",
                                    "--config.data.num_workers=1"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    wait_for_step(proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "SIGINT received: stopping after this step" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    out = "".join(seen) + out
    assert proc.returncode == 130 and time.time() - t0 < 30, out[-3000:]
    assert "exiting now, without a checkpoint" in out and "Traceback" not in out


# ----------------------------------------------------------------------------------------
# In-process: evaluation, initialisation and class counts.





@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory, one_thread):
    """A 3-step vit_b32:tiny run: (workdir, summary)."""
    from mim.train import loop
    wd = str(tmp_path_factory.mktemp("vit_run"))
    return wd, loop.train(few_steps("vit_b32", small_data), wd)


@pytest.mark.parametrize("where", ["workdir", "step folder"])
def test_eval_mode_takes_a_mim_run_whatever_init_format_says(trained, small_data, tmp_path, where):
    """init.format stays the experiment's ("timm"); a workdir or step folder is read as a
    mim checkpoint, and the result is the run's own final evaluation of that checkpoint,
    also written to eval_results.json."""
    from mim.train import loop
    wd, summary = trained
    path = wd if where == "workdir" else os.path.join(wd, "checkpoints", "step_00000003")
    c = few_steps("vit_b32", small_data, **{"mode": "eval", "init.checkpoint": path})
    assert c.init.format == "timm"
    result = loop.evaluate_only(c, str(tmp_path / "eval"))
    assert result["acc1"] == summary["eval_acc1"] and result["count"] == summary["eval_count"]
    saved = strict_load((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["acc1"] == result["acc1"] and saved["source"] == os.path.abspath(path)


def test_fine_tuning_says_what_it_loaded_and_what_is_new(trained, small_data, tmp_path, caplog):
    """A 12-class head on the 10-class run: everything but the head is loaded (reference:
    the names whose shapes differ between the two models)."""
    from mim.train import loop
    wd, _ = trained
    c = few_steps("vit_b32", small_data, **{"init.checkpoint": wd, "model.num_classes": 12})
    setup = loop.Setup(c, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="mim.train.setup"):
        setup.init_params()
    line = next(r.getMessage() for r in caplog.records if "init.checkpoint" in r.getMessage())
    assert "loaded 54 of 56 parameter tensors; newly initialised: head.weight, head.bias" in line, line


def test_fewer_classes_than_the_model_warns_and_drops_top5(small_data, tmp_path, caplog):
    """3 of the 10 classes with model.num_classes=10: a warning naming both numbers; no
    top-5 (every image of a 3-class split is in its top 5... of 3 classes)."""
    from mim.train import loop
    data = tmp_path / "three"
    for split in ("train", "val"):
        for cls in sorted(os.listdir(os.path.join(small_data, split)))[:3]:
            shutil.copytree(os.path.join(small_data, split, cls), data / split / cls)
    c = few_steps("vit_b32", str(data), **{"steps": 1, "batch_size": 8, "eval_every": 1})
    with caplog.at_level(logging.WARNING, logger="mim.train.loop"):
        summary = loop.train(c, str(tmp_path / "run"))
    assert any("has 3 classes but config.model.num_classes=10" in r.getMessage() for r in caplog.records)
    assert "eval_acc1" in summary and "eval_acc5" not in summary


def test_evaluation_reports_skipped_files_and_config_waits_for_data(small_data, tmp_path):
    """The loop's evaluation counts each readable image once and reports the unreadable
    ones (reference: the folder's file counts); a missing dataset leaves no config.json."""
    from mim.train import loop
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    cls = sorted(os.listdir(data / "val"))[0]
    for name in ("bad1.jpg", "bad2.png"):
        (data / "val" / cls / name).write_bytes(b"not an image")
    readable = sum(len(files) for _, _, files in os.walk(os.path.join(small_data, "val")))
    c = few_steps("vit_b32", str(data), **{"mode": "eval", "init.checkpoint": ""})
    setup = loop.Setup(c, str(tmp_path / "w"))
    params, state = setup.task.init(c, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        result = loop.evaluate(setup, params, state)
    assert result["count"] == readable and result["skipped_images"] == 2

    c = few_steps("vit_b32", str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="dataset split not found"):
        loop.train(c, str(tmp_path / "nodata"))
    assert not (tmp_path / "nodata").exists()


def test_the_eval_line_shows_what_the_task_measured():
    """``mode=eval`` prints Acc@1 / Acc@5 / loss as the references' eval scripts; a
    pretraining task's evaluation (BEiT: loss and masked-token accuracy) shows its own
    numbers instead of 'Acc@1 nan'."""
    from mim.train.evaluation import eval_line
    assert eval_line({"acc1": 81.5, "acc5": 95.25, "loss": 0.75, "count": 50}) == \
        "Acc@1 81.500 Acc@5 95.250 loss 0.7500"
    line = eval_line({"loss": 6.5, "mlm_acc": 0.125, "count": 20, "skipped_images": 0})
    assert line == "loss 6.5000 mlm_acc 0.125" and "nan" not in line
