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

from utils.reports.progress import NOTEBOOK_COLUMNS

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


@pytest.mark.slow
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
    assert max(len(line) for line in log) <= NOTEBOOK_COLUMNS
    epochs = [line for line in log if re.match(r"stage \d epoch \d/8: loss ", line)]
    assert len(epochs) == 16 and all(line.endswith(" img/s") for line in epochs)  # one line each
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
    # (Folded at NOTEBOOK_COLUMNS in the notebook.)
    assert "is complete (its final test is done); nothing to resume" in " ".join(
        _text(notebook).split())


@pytest.mark.slow
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


PARAMETERS_CELL = "in the first code cell (the parameters) and run all cells again"


def _another_run(folder):
    """A folder holding another run's records."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as handle:
        handle.write('{"stage": 0, "epoch": 1}\n{"stage": 0, "epoch": 2}\n')


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong DATA_PATH", "bad OVERRIDES entry", "another run"])
def test_a_wrong_parameter_stops_run_all_at_the_data_cell_in_one_line(tmp_path, case):
    """Each wrong parameter is the data cell's error (nothing is loaded before it), one line
    naming the parameter and its value, and Run All stops there."""
    executed, out = str(tmp_path / "executed.ipynb"), str(tmp_path / "out")
    parameters = {"CONFIG": "configs/demo.yaml", "OUTPUT_DIR": out}
    if case == "wrong DATA_PATH":  # the real config: its CIFAR archive is not downloaded
        missing = str(tmp_path / "data99999" / "cifar-100-python.tar.gz")
        parameters.update(CONFIG="configs/rdrop_deit_b_384_cifar100.yaml", DATA_PATH=missing)
        start = f'error: DATA_PATH = "{missing}" does not exist; download https://'
        end = f"; change DATA_PATH {PARAMETERS_CELL}"
    elif case == "bad OVERRIDES entry":
        parameters["OVERRIDES"] = ["stages.0.epochs=1", "loss.rdrop:false"]
        start = ('error: OVERRIDES[1] = "loss.rdrop:false": override \'loss.rdrop:false\' must '
                 'look like section.key=value')
        end = f"; change OVERRIDES[1] {PARAMETERS_CELL}"
    else:
        _another_run(out)
        start = (f"error: OUTPUT_DIR {out} already holds a run's records (2 epochs); continue "
                 f"it with RESUME = True, choose another OUTPUT_DIR, or set OVERWRITE = True")
        end = f"; set it {PARAMETERS_CELL}"
    with pytest.raises(papermill.PapermillExecutionError):
        papermill.execute_notebook(os.path.join(ROOT, "main.ipynb"), executed, cwd=ROOT,
                                   kernel_name="python3", progress_bar=False,
                                   parameters=parameters)
    cells = [cell for cell in nbformat.read(executed, as_version=4).cells
             if cell.cell_type == "code"]
    [failed] = [index for index, cell in enumerate(cells)
                if any(o["output_type"] == "error" for o in cell.get("outputs", []))]
    assert "parameters = Parameters(" in cells[failed].source  # the data cell
    assert all(cell.get("execution_count") is None for cell in cells[failed + 1:])
    [line] = [o for o in cells[failed].outputs if o["output_type"] == "error"][0]["traceback"]
    assert line.startswith(start) and line.endswith(end), line
    assert "\n" not in line and not os.path.exists(os.path.join(out, "run.lock"))


def test_parameters_name_the_parameter_that_makes_an_error(tmp_path):
    """Without a kernel: a wrong type, a config error traced to the override that makes it,
    the data path blamed on whoever set it."""
    from planning.notebook import Parameters
    from utils.errors import UserError

    def error(**values):
        given = dict(CONFIG="configs/demo.yaml", OUTPUT_DIR=str(tmp_path / "out"),
                     OVERRIDES=[], DATA_PATH=None, RESUME=False, OVERWRITE=False)
        with pytest.raises(UserError) as info:
            Parameters(**{**given, **values}).config()
        [line] = info.value._render_traceback_()
        return line

    assert error(OVERRIDES=3) == f"error: OVERRIDES = 3 must be a string or a list of strings; " \
                                 f"change it {PARAMETERS_CELL}"
    assert error(RESUME="yes").startswith("error: RESUME = 'yes' must be True or False")
    assert error(OVERRIDES=["stages.0.epochs=2", "loss.alpha=x"]) == (
        f"error: OVERRIDES[1] = \"loss.alpha=x\": config key 'loss.alpha' must be float, got "
        f"str 'x'; change OVERRIDES[1] {PARAMETERS_CELL}")
    assert len(error(OVERRIDES=["x" * 100_000 + "=1"])) < 500  # a pasted blob is not echoed
    assert error(OVERRIDES="loss.alphaa=1").startswith(
        "error: OVERRIDES = \"loss.alphaa=1\": config key 'loss.alphaa' is unknown")
    assert error(CONFIG="configs/nope.yaml").startswith(
        'error: CONFIG = "configs/nope.yaml": config file configs/nope.yaml does not exist')
    assert error(CONFIG="configs/demo_folder.yaml", OVERRIDES=["data.path=/nope"]).startswith(
        'error: OVERRIDES[0] = "data.path=/nope": data.path /nope does not exist; '
        'data.name=folder reads /nope/train/')
    assert error(CONFIG="configs/demo_folder.yaml").startswith(
        'error: CONFIG = "configs/demo_folder.yaml" reads its data from data.path '
        'output/photos, which does not exist')


@pytest.mark.slow
def test_the_parameters_cell_shows_only_overrides_the_code_accepts(tmp_path):
    """papermill reads all six parameters (a comment holding "=" hides one from it); the
    examples of the introduction load with the default config, and no comment shows another
    form of an override."""
    from papermill.translators import PythonTranslator

    from planning.notebook import Parameters

    cells = nbformat.read(os.path.join(ROOT, "main.ipynb"), as_version=4).cells
    assert [p.name for p in PythonTranslator.inspect(cells[1])] == [
        "CONFIG", "OUTPUT_DIR", "OVERRIDES", "DATA_PATH", "RESUME", "OVERWRITE"]
    assert not re.search(r"\w\.\w+[:=]", " ".join(line.partition("#")[2]
                                                for line in cells[1].source.splitlines()))
    examples = re.findall(r'"([\w.]+=[^"]*)"', cells[0].source)
    assert len(examples) == 6, examples  # three in each language
    for example in examples:
        Parameters("configs/rdrop_deit_b_384_cifar100.yaml", str(tmp_path / "out"), example,
                   None, False, False).config()


@pytest.fixture(autouse=True)
def plain_terms_after():
    """Importing planning.notebook sets the notebook's terms for the whole process: this
    module's tests leave the plain ones to the modules after them."""
    from utils.errors import NotebookTerms

    saved = {name: NotebookTerms.__dict__[name] for name in ("advice", "resume", "stop")}
    yield
    for name, value in saved.items():
        setattr(NotebookTerms, name, value)


def test_errors_give_the_notebook_parameters_instead_of_command_line_options():
    from planning.notebook import use_notebook_terms
    from utils.errors import Interrupted, UserError

    use_notebook_terms()

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
    [line] = UserError("it takes 40 h on this CPU; Ctrl-C stops it")._render_traceback_()
    assert line == "error: it takes 40 h on this CPU; interrupting the kernel (the ■ button) " \
                   "stops it"
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


def test_the_committed_notebook_holds_no_outputs():
    """JupyterLab saves outputs into main.ipynb as it runs: the file in the repository stays
    clean (docs/notebook_predict_export.md says how to restore it)."""
    cells = nbformat.read(os.path.join(ROOT, "main.ipynb"), as_version=4).cells
    code = [cell for cell in cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
