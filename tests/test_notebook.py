"""The quick-start notebook runs top to bottom (so it cannot rot)."""

import base64
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "thr/kept_frac" in text and "A = " in text
    (plot_cell,) = [cell for cell in notebook.cells if "thr_metrics.png" in cell.source]
    images = [o for o in plot_cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the plot cell must show its figure, once"
    assert len(base64.b64decode(images[0]["data"]["image/png"])) > 10_000
