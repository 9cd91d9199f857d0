"""main.ipynb runs top to bottom on the demo, with parameters injected after its tagged cell
(papermill's convention), through nbclient as Jupyter would run it."""

import os

import nbformat
from conftest import ROOT
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

FAST = ["data.train_subset=256", "data.val_subset=100", "stages.0.epochs=2", "stages.1.epochs=1"]


def test_notebook_trains_evaluates_and_shows_curves_on_the_demo(tmp_path):
    notebook = nbformat.read(os.path.join(ROOT, "main.ipynb"), as_version=4)
    tagged = [i for i, cell in enumerate(notebook.cells)
              if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and notebook.cells[tagged[0]].cell_type == "code"
    out = str(tmp_path / "notebook")
    notebook.cells.insert(tagged[0] + 1, new_code_cell(
        f'CONFIG = "configs/demo.yaml"\nOUTPUT_DIR = {out!r}\nOVERRIDES = {FAST!r}',
        metadata={"tags": ["injected-parameters"]}))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    assert os.path.isfile(os.path.join(out, "val_metrics.json"))
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "display_data" and "image/png" in output["data"]]
    assert len(images) >= 3  # curves, per-class chart, predictions
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert errors == []
