"""notebooks/walkthrough.ipynb runs top to bottom on a tiny run and draws its figures inline."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes(tiny_run, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("OASIS_RUN", str(tiny_run))          # the kernel inherits this environment
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    # Every cell after the set-up draws a figure inline (samples, reconstructions, anomaly map, completion,
    # a synthetic subject).
    with_png = [any("image/png" in o.get("data", {}) for o in c.outputs) for c in code_cells]
    assert with_png == [False, True, True, True, True, True], with_png
    assert str(tiny_run) in "".join(o.get("text", "") for o in code_cells[0].outputs)
