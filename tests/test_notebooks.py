"""Every teaching notebook executes top to bottom on the NumPy backend (small sizes)."""

from __future__ import annotations

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the test extra (nbformat, nbclient)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the test extra (nbclient)")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # cells that need a GPU are tagged and skipped on CPU machines
        if "gpu" in cell.get("metadata", {}).get("tags", []) and os.environ.get("MLA_NOTEBOOK_GPU") != "1":
            cell.source = "print('skipped: needs a GPU (set MLA_NOTEBOOK_GPU=1 on a GPU machine)')"
    env_backend = os.environ.setdefault("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert env_backend
