"""main.ipynb runs top to bottom on the demo through papermill (the command in
docs/notebook_predict_export.md), with its parameters injected, as Jupyter would run it."""

import importlib
import json
import os
import re
import sys

import nbformat
import papermill
import pytest
from conftest import ROOT

# Short epochs but many of them: each prints a line and draws bars, so a notebook that kept
# one output per write would hold far more than 20 in the training cell.
FAST = ["data.train_subset=64", "data.val_subset=20", "stages.0.epochs=8", "stages.1.epochs=8"]
MAX_OUTPUTS_PER_CELL, MAX_TEXT_BYTES = 20, 60_000


def _outputs(notebook, kind):
    return [output for cell in notebook.cells for output in cell.get("outputs", [])
            if output.get("output_type") == kind]


def _text(notebook):
    """Everything the notebook's outputs say in text (streams and text displays)."""
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for cell in notebook.cells for o in cell.get("outputs", []))


def _assert_small(notebook):
    """At most 20 outputs in any cell and 60 KB of text in all: progress redraws and epoch
    lines update one output instead of adding one each."""
    assert max(len(cell.get("outputs", [])) for cell in notebook.cells) <= MAX_OUTPUTS_PER_CELL
    assert len(_text(notebook).encode()) <= MAX_TEXT_BYTES


def report_kind(out):
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        return json.load(handle)["kind"]


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
    text = _text(notebook)
    assert "data (digits): scikit-learn's handwritten digits" in text
    assert "Warning" not in text and "warnings.warn" not in text  # no Paddle import noise
    for noise in ("attention: ", "fontManager", "val: 100%", "eval: 100%"):
        assert noise not in text, noise  # finished bars leave no line
    assert text.count("stage 1 epoch 8/8: loss") == 1 and "test split, best weights" in text
    log = [line for o in _outputs(notebook, "display_data")
           for line in o["data"].get("text/plain", "").splitlines()]
    assert max(len(line) for line in log) <= 100
    _assert_small(notebook)
    # The results: one table of the validation and the test split, the numbers val.py wrote.
    [table] = [o["data"]["text/markdown"] for o in _outputs(notebook, "display_data")
               if "text/markdown" in o["data"]]
    for split, name in (("val", "val_metrics_val.json"), ("test", "val_metrics.json")):
        with open(os.path.join(out, name), encoding="utf-8") as handle:
            report = json.load(handle)
        row = [line for line in table.splitlines() if line.startswith(f"| {split} |")]
        assert row == [f"| {split} | `best.safetensors` ({report_kind(out)}) | "
                       f"{report['top1']:.4f} | {report['top5']:.4f} | {report['loss']:.4f} | "
                       f"{report['num_samples']} |"]
    # Run again: the finished run is reported complete, not trained over.
    papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                               kernel_name="python3", progress_bar=False,
                               parameters={"CONFIG": "configs/demo.yaml", "OUTPUT_DIR": out,
                                           "OVERRIDES": FAST, "RESUME": True})
    notebook = nbformat.read(executed, as_version=4)
    # (Folded at 100 columns in the notebook.)
    assert "is complete (its final test is done); nothing to resume" in " ".join(
        _text(notebook).split())


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
    text = _text(notebook)
    assert f"data (folder): {photos}" in text
    assert os.path.isfile(os.path.join(out, "best.safetensors"))
    assert "the test split as validation" in text  # no val/ here
    images = [o for o in _outputs(notebook, "display_data") if "image/png" in o["data"]]
    assert len(images) >= 3  # curves, per-class chart, predictions of the photos


def test_one_output_redraws_a_bar_in_place_and_keeps_the_last_lines(monkeypatch):
    from utils.reports import progress

    clock, shown = [100.0], []
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    handle = type("Handle", (), {"update": lambda self, data, raw: shown.append(
        data["text/plain"])})()
    stream = progress._OneOutput(handle)
    stream.write("stage 0 epoch 1/1:  50%|#")
    assert shown == ["stage 0 epoch 1/1:  50%|#"]  # the first write shows
    stream.write("\rstage 0 epoch 1/1: 100%|##\n")
    print("epoch line", file=stream)
    assert len(shown) == 1  # held back within the interval
    clock[0] += progress.REDRAW_INTERVAL_S
    stream.write("x\r\n")  # a Windows line ending keeps its line
    assert shown[-1].splitlines() == ["stage 0 epoch 1/1: 100%|##", "epoch line", "x"]
    monkeypatch.setattr(progress, "MAX_LINES", 3)
    clock[0] += progress.REDRAW_INTERVAL_S
    for index in range(5):
        stream.write(f"line {index}\n")
    stream.show()
    assert shown[-1].splitlines() == ["... (6 earlier lines)", "line 3", "line 4"]


def test_one_output_updates_a_few_times_a_second_whatever_is_printed(monkeypatch):
    """100,000 lines printed in one burst: one update (not 100,000 of up to 400 lines)."""
    from utils.reports import progress

    clock, shown = [100.0], []
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    handle = type("Handle", (), {"update": lambda self, data, raw: shown.append(
        len(data["text/plain"]))})()
    stream = progress._OneOutput(handle)
    for index in range(100_000):
        print(f"warning {index}", file=stream)
    assert len(shown) == 1
    clock[0] += progress.REDRAW_INTERVAL_S
    print("later", file=stream)
    assert len(shown) == 2


def test_one_output_outside_a_notebook_changes_nothing(capsys):
    importlib.import_module("ipykernel")  # imported, as papermill does, yet no kernel runs

    from utils.reports.progress import one_output

    stdout = sys.stdout
    with one_output():
        assert sys.stdout is stdout
        print("plain")
    assert capsys.readouterr().out == "plain\n"


def test_a_failing_notebook_says_in_one_line_which_parameter_to_change(tmp_path):
    """A wrong DATA_PATH, and OVERRIDES given as one string: the error is one line in the
    notebook's terms, and the cell fails, so Run All stops there."""
    executed = str(tmp_path / "executed.ipynb")
    missing = str(tmp_path / "no such photos")
    with pytest.raises(papermill.PapermillExecutionError):
        papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                                   kernel_name="python3", progress_bar=False,
                                   parameters={"CONFIG": "configs/demo_folder.yaml",
                                               "OUTPUT_DIR": str(tmp_path / "out"),
                                               "DATA_PATH": missing,
                                               "OVERRIDES": "stages.0.epochs=1"})
    notebook = nbformat.read(executed, as_version=4)
    [error] = _outputs(notebook, "error")
    [line] = error["traceback"]
    assert line.startswith(f"error: DATA_PATH {missing} does not exist; data.name=folder reads")
    assert line.endswith("; set it in the first code cell (the parameters) and run all cells "
                         "again")
    assert "data.path" not in line


def test_errors_give_the_notebook_parameters_instead_of_command_line_options():
    import planning.notebook  # noqa: F401 - the notebook's first data cell imports it
    from utils.errors import Interrupted, UserError

    [line] = UserError("train.output_dir out holds a finished run; use another "
                       "train.output_dir, or pass --overwrite to move it aside; micro-batch: "
                       "-o train.accum_steps=2 keeps it, or pass -o data.path=/x/y.tar.gz "
                       "(the archive)")._render_traceback_()
    assert line == ('error: OUTPUT_DIR out holds a finished run; use another OUTPUT_DIR, '
                    'or set OVERWRITE = True to move it aside; micro-batch: OVERRIDES += '
                    '["train.accum_steps=2"] keeps it, or set DATA_PATH = "/x/y.tar.gz" (the '
                    'archive); set it in the first code cell (the parameters) and run all '
                    'cells again')
    assert UserError("unknown key foo")._render_traceback_() == ["error: unknown key foo"]
    [line] = Interrupted(2, "SIGINT at stage 1 epoch 3")._render_traceback_()
    assert line == ("interrupted: SIGINT at stage 1 epoch 3; to continue set RESUME = True in "
                    "the first code cell (the parameters) and run all cells again")


def test_the_notebook_states_the_full_runs_hours_as_the_plan_gives_them():
    from planning.plan import plan
    from training.config import load_config

    cells = nbformat.read(os.path.join(ROOT, "main.ipynb"), as_version=4).cells
    text = " ".join(cells[0].source.split())
    hours = plan(load_config(os.path.join(ROOT, "configs/rdrop_deit_b_384_cifar100.yaml"),
                             []))["hours"]
    v100, a100 = f"{hours['V100-16GB']:.2g}", f"{hours['A100-40GB']:.2g}"
    assert hours["V100-32GB"] == hours["V100-16GB"]
    assert f"about {v100} h on a V100 (16 or 32 GB) and {a100} h on an A100-40GB" in text
    assert re.search(f"V100（16 GB 或 32 GB）上约需 {v100} 小时， ?在 A100-40GB 上约需 {a100} 小时",
                     text)
