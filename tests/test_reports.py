"""utils/reports/: metrics.jsonl, VisualDL, the printed lines, progress in a log file and
the plots, including damaged or planted files where they are written or read."""

import importlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    FAST_CLI,
    HANG_S,
    ROOT,
    SAVING_RUN_CLI,
    assert_one_error,
    kill_in_stage_1,
    read_records,
    run_script,
)

from utils.errors import UserError


@pytest.mark.slow
def test_a_damaged_metrics_file_is_one_line_for_the_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": 0, "epoch": 0}\n{"stage": 0, "ep\n')
    proc = subprocess.run([sys.executable, "-m", "utils.reports.plots", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert_one_error(proc, "line 2 of", "is damaged")


@pytest.mark.slow
def test_a_planted_metrics_or_visualdl_link_is_refused_and_its_target_untouched(tmp_path,
                                                                                 victim):
    from utils.reports.logger import VDL_FILE, RunLogger

    for planted in ("metrics.jsonl", os.path.join("vdl", VDL_FILE)):
        out = tmp_path / planted.replace(os.sep, "_")
        (out / planted).parent.mkdir(parents=True)
        (out / planted).symlink_to(victim)
        with pytest.raises(UserError, match="is a symbolic link"):
            RunLogger(str(out))
        assert victim.read_text() == "keep me\n"


def _scalars(out, tag):
    from visualdl import LogReader

    files = [f for f in os.listdir(os.path.join(out, "vdl")) if f.startswith("vdlrecords")]
    assert files == ["vdlrecords.run.log"]
    reader = LogReader(file_path=os.path.join(out, "vdl", files[0]))
    return [(r.id, r.value) for r in reader.get_data("scalar", tag)]


@pytest.mark.slow
def test_visualdl_keeps_one_continuous_history_across_a_resume(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={whole}").returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *SAVING_RUN_CLI, "-o",
                             f"train.output_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    position = kill_in_stage_1(proc, killed)
    assert position["stage"] == 1
    resumed = run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resuming from \S+ at stage 1 epoch \d/2, after micro-batch \d+",
                     resumed.stdout)
    for tag in ("train/loss", "epoch/val_top1"):
        want, got = _scalars(whole, tag), _scalars(killed, tag)
        assert [step for step, _ in got] == [step for step, _ in want], tag  # each step once
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


@pytest.mark.slow
def test_people_read_one_numbering_and_loss_parts_that_add_up(tmp_path):
    out = str(tmp_path / "run")
    # Two epochs left after the signal: a loaded machine may read the line late.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *SAVING_RUN_CLI, "-o",
                             "stages.1.epochs=3", "-o", f"train.output_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("stage 1 epoch 1/3:"):
            proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 143, stderr[-2000:]
    # At the end of epoch 1 (the signal came before its stop check) or inside a later one.
    stopped = re.search(r"interrupted: SIGTERM at stage 1 epoch ([123]) \(\d+ optimizer steps "
                        r"into the whole run\)", stderr)
    assert stopped, stderr[-2000:]
    done = max(int(stopped.group(1)) - 1, 1)  # epochs of stage 1 completed
    epoch_lines = [l for l in lines if re.match(r"stage \d epoch \d/\d: ", l)]
    names = ["stage 0 epoch 1/1", "stage 1 epoch 1/3", "stage 1 epoch 2/3"]
    assert [l.split(":")[0] for l in epoch_lines] == names[:1 + done]
    for line in epoch_lines:
        loss, ce, alpha, kl = map(float, re.search(
            r"loss (\S+) = ce (\S+) \+ (\S+) x kl (\S+) \|", line).groups())
        assert loss == pytest.approx(ce + alpha * kl, abs=2e-4)
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        best = json.load(handle)
    assert (best["stage"], best["epoch"]) in [(0, 1), (1, 1), (1, 2)]
    assert [(r["stage"], r["epoch"]) for r in read_records(out)] == \
        [(0, 1), (1, 1), (1, 2)][:1 + done]


@pytest.mark.slow
def test_progress_in_a_log_file_is_lines_not_carriage_returns(tmp_path, capsys):
    importlib.import_module("ipykernel")  # papermill imports it: that alone is no notebook

    from utils.reports import progress

    progress.set_mode("auto")  # pytest's stderr is no terminal: lines, never bars
    monkey = progress.LINE_INTERVAL_S
    progress.LINE_INTERVAL_S = 0
    try:
        tracked = progress.track(range(3), "stage 0 epoch 1/1")
        tracked.set_postfix(loss="2.3")
        assert list(tracked) == [0, 1, 2]
    finally:
        progress.LINE_INTERVAL_S = monkey
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 3
    assert err.splitlines()[0].startswith("stage 0 epoch 1/1: 1/3 (33%), ")
    proc = run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={tmp_path / 'log'}")
    assert proc.returncode == 0 and "\r" not in proc.stderr  # a background job's log


def test_an_epoch_in_a_notebook_is_one_line_of_its_width():
    """The real recipe's worst case (R-Drop at α = 5, EMA and SWA, a 1,000 img/s GPU):
    the brief line keeps the loss, validation and averages, and fits without a fold."""
    from losses.rdrop import RDropLoss
    from utils.reports.progress import NOTEBOOK_COLUMNS, fold
    from utils.reports.text import epoch_line

    means = {"loss": 1.23456, "ce": 0.98765, "kl": 0.04938}
    stats = {**means, "grad_norm": 2.5, "grad_norm_max": 7.0, "overflow_steps": 3,
             "images_per_s": 1234.5}
    results = {"raw": {"top1": 0.91234, "top5": 0.98765, "loss": 0.34567, "num_samples": 5000},
               "ema": {"top1": 0.92}, "swa": {"top1": 0.925}}
    where = "stage 2 epoch 10/10"
    line = epoch_line(where, stats, results, RDropLoss(alpha=5.0).in_words(means), brief=True)
    assert line == ("stage 2 epoch 10/10: loss 1.2346 = ce 0.9877 + 5 x kl 0.0494 | val top1 "
                    "0.9123, ema 0.9200, swa 0.9250 | 1234 img/s")
    assert len(line) <= NOTEBOOK_COLUMNS and fold(line) == [line]
    full = epoch_line(where, stats, results, RDropLoss(alpha=5.0).in_words(means))
    assert "top5 0.9877" in full and "grad norm 2.5 (max 7)" in full and len(fold(full)) > 1


def test_the_run_line_says_where_a_relative_output_folder_is(tmp_path, monkeypatch):
    """A config is found from the repository too, but train.output_dir is relative to the
    current folder: the first line says where the run writes."""
    from utils.reports.text import run_line

    monkeypatch.chdir(tmp_path)
    line = run_line("cpu", 10, 2, 3, "output/demo", "held_out")
    assert line.endswith(f"output in output/demo ({tmp_path}/output/demo: train.output_dir is "
                         f"relative to the current folder)")
    assert run_line("cpu", 10, 2, 3, str(tmp_path), "held_out").endswith(f"output in {tmp_path}")


def test_charts_draw_chinese_class_names_with_real_glyphs(tmp_path):
    """A class folder named 圆形: drawn from Noto Sans CJK SC (mplfonts, a requirement), not as
    missing-glyph boxes; matplotlib warns of every glyph no font in its list has."""
    import warnings

    from matplotlib.ft2font import FT2Font

    from utils.reports import plots

    name = plots.cjk_font()
    assert name == "Noto Sans CJK SC"
    from matplotlib import font_manager

    path = font_manager.findfont(font_manager.FontProperties(family=name))
    assert all(FT2Font(path).get_char_index(ord(char)) for char in "圆形方形")
    figure = plots._figure(figsize=(3, 2))
    axes = figure.add_subplot()
    axes.bar(["圆形", "方形"], [0.9, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" fails the test
        plots._save(figure, str(tmp_path / "chinese.png"))
    assert (tmp_path / "chinese.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_chart_is_written_after_paddle_is_loaded_through_the_project(tmp_path):
    """Paddle 2.6's wheels export their own zlib: a Pillow loaded after Paddle wrote PNG files
    through it and died of SIGSEGV. The project loads Pillow first (utils/__init__.py)."""
    code = ("import sys, utils, paddle\n"
            "from utils.reports.plots import plot_per_class\n"
            "plot_per_class({'a': 0.5, 'b': 1.0}, sys.argv[1], 'two classes')\n")
    path = tmp_path / "chart.png"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_damaged_chinese_font_or_a_failing_chart_never_ends_a_run(tmp_path):
    """The CJK font file cut short (a broken install) and a chart that cannot be written:
    training and val.py --plot still finish with exit 0 and their results, each failure one
    warning line."""
    import importlib.util

    from utils.reports.plots import CJK_FONT

    real = os.path.join(importlib.util.find_spec("mplfonts").submodule_search_locations[0],
                        *CJK_FONT)
    fake = tmp_path / "site" / "mplfonts"
    (fake / CJK_FONT[0]).mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    with open(real, "rb") as handle:
        (fake / os.path.join(*CJK_FONT)).write_bytes(handle.read(4096))  # cut short
    env = {"PYTHONPATH": str(tmp_path / "site")}
    out = tmp_path / "run"
    trained = run_script("main.py", "-c", "configs/demo.yaml", *FAST_CLI, "-o",
                         f"train.output_dir={out}", env=env)
    assert trained.returncode == 0 and "Traceback" not in trained.stderr, trained.stderr[-2000:]
    assert "warning: the Chinese font" in trained.stdout and (out / "best.json").exists()
    assert (out / "curves.png").exists()  # drawn without the font
    (out / "per_class_top1.png").mkdir()  # the chart's name taken by a folder
    plotted = run_script("val.py", "-c", str(out), "--plot", env=env)
    assert plotted.returncode == 0 and "Traceback" not in plotted.stderr, plotted.stderr[-2000:]
    assert "warning: per_class_top1.png skipped" in plotted.stdout
    assert json.loads((out / "val_metrics.json").read_text())["num_samples"] > 0
    assert plotted.stdout.strip().splitlines()[-1].startswith("top1=")


def test_a_failing_visualdl_is_one_warning_and_the_records_are_kept(tmp_path, monkeypatch,
                                                                    capsys):
    """VisualDL that cannot start, or fails at a scalar: one warning line each, and
    metrics.jsonl gets every record."""
    import visualdl

    from utils.reports.logger import RunLogger

    def broken(*args, **kwargs):
        raise RuntimeError("protobuf mismatch")

    monkeypatch.setattr(visualdl, "LogWriter", broken)
    logger = RunLogger(str(tmp_path / "a"))
    logger.log_step(0, {"loss": 1.0})
    logger.log_epoch(0, {"stage": 0, "epoch": 1, "val_top1": 0.5})
    logger.close()
    assert capsys.readouterr().out.count("warning: the VisualDL log (vdl/) skipped "
                                         "(protobuf mismatch)") == 1
    monkeypatch.undo()
    logger = RunLogger(str(tmp_path / "b"))
    monkeypatch.setattr(logger.writer, "add_scalar", broken)
    logger.log_step(0, {"loss": 1.0, "lr": 0.1})
    logger.log_epoch(0, {"stage": 0, "epoch": 1, "val_top1": 0.5})
    logger.close()
    assert capsys.readouterr().out.count("warning: the VisualDL log (vdl/) from here on") == 1
    for run in ("a", "b"):
        assert read_records(str(tmp_path / run)) == [{"stage": 0, "epoch": 1, "val_top1": 0.5}]
