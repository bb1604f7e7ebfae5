"""Every notebook in notebooks/ runs top to bottom on CPU with small parameters, and the committed notebooks carry
no outputs.

Each notebook runs in a fresh IPython kernel started from this interpreter (a kernel spec written to a temporary
JUPYTER_PATH, so nothing needs registering), with the notebook's own directory as working directory and the
environment variables below making it small; any cell error fails the test (nbclient raises CellExecutionError
with the cell's traceback).
"""

from __future__ import annotations

import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))
KERNEL = "omni_jax_test"
SMALL = {  # read by the notebooks' parameter cells
    "OMNI_JAX_NB_MAX_NEW_TOKENS": "4",
    "OMNI_JAX_NB_TALKER_TOKENS": "8",
    "OMNI_JAX_NB_TRAIN_STEPS": "20",
    "OMNI_JAX_NB_TRAIN_RECORDS": "48",
    "OMNI_JAX_NB_BATCH_SIZE": "4",
    "OMNI_JAX_NB_EVAL_RECORDS": "8",
    "OMNI_JAX_NB_DEVICE_COUNTS": "8,64",
}


def test_expected_notebooks_exist_and_are_stripped():
    assert NOTEBOOKS == ["convert_to_pytorch.ipynb", "finetune.ipynb", "quickstart.ipynb", "tpu_pod_plan.ipynb"]
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
        assert "colab.research.google.com/github/" in nb.cells[0].source, f"{name}: no Open-in-Colab badge"


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("jupyter")
    os.makedirs(d / "kernels" / KERNEL)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "omni_jax tests", "language": "python"}
    (d / "kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return str(d)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch, kernel_path):
    monkeypatch.setenv("JUPYTER_PATH", kernel_path)
    monkeypatch.setenv("OMNI_JAX_NB_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for k, v in SMALL.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": NB_DIR}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert not [f for f in os.listdir(NB_DIR) if not f.endswith(".ipynb")], "a notebook wrote into notebooks/"
