"""python -m mim.predict: a trained :tiny classifier labels image files with the class
names its run recorded, with the accuracy that mode=eval gives on the same folder."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLED, ROOT
from mim import inference
from mim.sweep import load_config

PER_CLASS = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step vit_b32.py:tiny run, and a data root whose val split is a 120-image subset of
    the bundled one plus a text file named .jpg."""
    base = tmp_path_factory.mktemp("predict")
    wd = base / "run"
    p = subprocess.run([sys.executable, "-m", "mim.main", "--config=experiments/vit_b32.py:tiny,steps=6",
                        f"--workdir={wd}", "--config.eval_every=0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = base / "data"
    os.symlink(os.path.join(BUNDLED, "train"), data / "train" if data.exists() else _mk(data) / "train")
    for cls in sorted(os.listdir(os.path.join(BUNDLED, "val"))):
        os.makedirs(data / "val" / cls)
        for f in sorted(os.listdir(os.path.join(BUNDLED, "val", cls)))[:PER_CLASS]:
            shutil.copy(os.path.join(BUNDLED, "val", cls, f), data / "val" / cls / f)
    (data / "val" / "cat" / "zz_notes.jpg").write_text("not an image")
    return str(wd), str(data)


def _mk(path):
    os.makedirs(path)
    return path


def test_predict_gives_the_accuracy_of_mode_eval_on_the_same_folder(run):
    from mim.train import evaluation
    wd, data = run
    with pytest.warns(UserWarning, match="zz_notes.jpg"):
        r = inference.predict(wd, os.path.join(data, "val"), topk=3)
    c = load_config("experiments/vit_b32.py:tiny")
    c.unlock()
    c.mode, c.data.path = "eval", data
    ev = evaluation.evaluate_only(c, wd)
    assert ev["count"] == len(r["rows"]) == r["labelled"] == 10 * PER_CLASS
    assert ev["skipped_images"] == len(r["skipped"]) == 1
    assert r["accuracy"] == pytest.approx(ev["acc1"], abs=1e-9)
    with open(os.path.join(wd, "classes.json")) as f:
        assert r["classes"] == json.load(f) == sorted(os.listdir(os.path.join(BUNDLED, "train")))
    for row in r["rows"]:
        assert len(row["labels"]) == 3 and row["probs"] == sorted(row["probs"], reverse=True)
        assert 0 < sum(row["probs"]) <= 1 + 1e-6


def test_any_image_size_and_the_output_files(run, tmp_path):
    wd, _ = run
    img = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (71, 53, 3), dtype=np.uint8)).save(img)
    r = inference.predict(wd, str(img), topk=2)
    assert len(r["rows"]) == 1 and r["accuracy"] is None and len(r["rows"][0]["labels"]) == 2
    inference.write(r, str(tmp_path / "p.csv"))
    inference.write(r, str(tmp_path / "p.json"))
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0] == ["path", "label1", "prob1", "label2", "prob2"]
    assert rows[1][1] == r["rows"][0]["labels"][0]
    assert json.load(open(tmp_path / "p.json"))["predictions"][0]["labels"] == r["rows"][0]["labels"]


def test_official_imagenet_classifiers_get_the_shipped_names():
    names = inference.imagenet_classes()
    ids = [line.split("\t")[0] for line in open(inference.IMAGENET_CLASSES) if not line.startswith("#")]
    assert len(names) == 1000 and len(set(ids)) == 1000 and ids[0] == "n01440764"
    assert names[0].startswith("tench") and names[999].startswith("toilet tissue")
