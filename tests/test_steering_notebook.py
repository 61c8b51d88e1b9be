"""The steering notebook runs top to bottom on builtin:tiny-qwen2 (a fresh `analyze --dynamics`), so it cannot rot."""

import base64
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "steering.ipynb"


def test_steering_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv("TRL_THR_STEERING_RESULTS", raising=False)  # recompute, do not show saved results
    monkeypatch.delenv("TRL_THR_STEERING_MODEL", raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "model: builtin:tiny-qwen2" in text
    for name in ("dlogp_correct", "dentropy", "grpo - positive-amplify", "keeps"):
        assert name in text, name
    (chart_cell,) = [cell for cell in notebook.cells if "dynamics.png" in cell.source]
    images = [o for o in chart_cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1 and len(base64.b64decode(images[0]["data"]["image/png"])) > 5_000


def test_the_notebook_is_what_its_generator_writes():
    """examples/notebooks/steering.ipynb is written by benchmarks/steering/make_notebook.py: the same cells, in order
    (outputs aside), so that an edit to one without the other fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_notebook", NOTEBOOK.parents[2] / "benchmarks" / "steering" / "make_notebook.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [(c.cell_type, c.source) for c in generator.CELLS]
