"""main.ipynb runs top to bottom on the demo through papermill (the README's command), with
its parameters injected, as Jupyter would run it."""

import os

import nbformat
import papermill
from conftest import ROOT

FAST = ["data.train_subset=256", "data.val_subset=100", "stages.0.epochs=2", "stages.1.epochs=1"]


def _outputs(notebook, kind):
    return [output for cell in notebook.cells for output in cell.get("outputs", [])
            if output.get("output_type") == kind]


def test_notebook_trains_evaluates_and_shows_curves_on_the_demo(tmp_path):
    out, executed = str(tmp_path / "notebook"), str(tmp_path / "executed.ipynb")
    papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                               kernel_name="python3", progress_bar=False,
                               parameters={"CONFIG": "configs/demo.yaml", "OUTPUT_DIR": out,
                                           "OVERRIDES": FAST})
    notebook = nbformat.read(executed, as_version=4)
    assert os.path.isfile(os.path.join(out, "val_metrics.json"))
    images = [o for o in _outputs(notebook, "display_data") if "image/png" in o["data"]]
    assert len(images) >= 3  # curves, per-class chart, predictions
    assert _outputs(notebook, "error") == []
    text = "".join(o.get("text", "") for o in _outputs(notebook, "stream"))
    assert "data: scikit-learn's handwritten digits" in text
    assert "Warning" not in text and "warnings.warn" not in text  # no Paddle import noise
    # Run again: the finished run is reported complete, not trained over.
    papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                               kernel_name="python3", progress_bar=False,
                               parameters={"CONFIG": "configs/demo.yaml", "OUTPUT_DIR": out,
                                           "OVERRIDES": FAST, "RESUME": True})
    notebook = nbformat.read(executed, as_version=4)
    text = "".join(o.get("text", "") for o in _outputs(notebook, "stream"))
    assert "is complete (its final test is done); nothing to resume" in text


def test_notebook_trains_on_a_folder_of_photos(tmp_path):
    from data.sample_photos import write_sample_folder

    # Paths that YAML would misread (" #" starts a comment): the notebook passes them as they are.
    photos, out = str(tmp_path / "photos #1"), str(tmp_path / "notebook #2")
    write_sample_folder(photos, {"train": 8, "test": 4})
    executed = str(tmp_path / "executed.ipynb")
    papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                               kernel_name="python3", progress_bar=False,
                               parameters={"CONFIG": "configs/demo_folder.yaml",
                                           "OUTPUT_DIR": out, "DATA_PATH": photos,
                                           "OVERRIDES": ["stages.0.epochs=2"]})
    notebook = nbformat.read(executed, as_version=4)
    assert _outputs(notebook, "error") == []
    text = "".join(o.get("text", "") for o in _outputs(notebook, "stream"))
    assert f"data: your images (folder) under {photos}" in text
    assert os.path.isfile(os.path.join(out, "best.safetensors"))
    assert "the test split as validation" in text  # no val/ here
    images = [o for o in _outputs(notebook, "display_data") if "image/png" in o["data"]]
    assert len(images) >= 3  # curves, per-class chart, predictions of the photos
