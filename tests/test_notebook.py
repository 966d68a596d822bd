"""notebooks/walkthrough.ipynb runs top to bottom (nbclient, a real Jupyter kernel) with
a few steps per stage, and shows its pictures inline."""
import json
import os

import pytest

from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "walkthrough.ipynb")


def test_committed_without_outputs():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:80]


def test_notebook_executes(tmp_path, monkeypatch, small_data):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MIM_NOTEBOOK_PRETRAIN_STEPS", "3")
    monkeypatch.setenv("MIM_NOTEBOOK_FINETUNE_STEPS", "2")
    monkeypatch.setenv("MIM_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MIM_NOTEBOOK_DATA", small_data)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3, "reconstructions, pretraining curves, fine-tuning curves"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "top-1" in text and "step 3/3" in text and "step 2/2" in text
    # The fine-tuning started from the pretraining run of the notebook.
    with open(tmp_path / "finetune" / "config.json") as f:
        assert json.load(f)["init"]["checkpoint"] == str(tmp_path / "mae_tiny")
    for run in ("mae_tiny", "finetune"):
        assert (tmp_path / run / "curves.png").exists()
