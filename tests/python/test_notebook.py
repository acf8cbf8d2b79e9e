"""examples/quickstart.ipynb runs top to bottom (so it never rots)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import turboquant

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_executes(monkeypatch):
    # The kernel imports the same turboquant as this test process.
    pkg_parent = str(Path(turboquant.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "1024 tokens" in outputs and "x vs fp16" in outputs and "tokens reloaded" in outputs
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
