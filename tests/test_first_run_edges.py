"""The rough edges of a first run: one continuous VisualDL history across a resume, a finished
run resumed, one numbering and loss parts that add up, every missing download named at once,
progress lines in a log file, an average the run did not keep."""

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
    DEMO_CLI,
    ROOT,
    SMALL_DEMO,
    assert_one_error,
    kill_in_stage_1,
    read_records,
    run_script,
    small_demo_config,
)

from main import train
from utils.config import load_config
from utils.errors import UserError

# 5. Rough edges of a first run ----------------------------------------------------------------

RUN = [*DEMO_CLI, *[a for o in SMALL_DEMO for a in ("-o", o)], "-o", "train.save_every_steps=2"]


def _scalars(out, tag):
    from visualdl import LogReader

    files = [f for f in os.listdir(os.path.join(out, "vdl")) if f.startswith("vdlrecords")]
    assert files == ["vdlrecords.run.log"]
    reader = LogReader(file_path=os.path.join(out, "vdl", files[0]))
    return [(r.id, r.value) for r in reader.get_data("scalar", tag)]


def test_visualdl_keeps_one_continuous_history_across_a_resume(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert run_script("main.py", *RUN, "-o", f"train.output_dir={whole}").returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *RUN, "-o",
                             f"train.output_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    position = kill_in_stage_1(proc, killed)
    assert position["stage"] == 1
    resumed = run_script("main.py", *RUN, "-o", f"train.output_dir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"resuming from \S+ at stage 1 epoch \d/2, after micro-batch \d+",
                     resumed.stdout)
    for tag in ("train/loss", "epoch/val_top1"):
        want, got = _scalars(whole, tag), _scalars(killed, tag)
        assert [step for step, _ in got] == [step for step, _ in want], tag  # each step once
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = str(tmp_path / "run")
    assert run_script("main.py", *RUN, "-o", f"train.output_dir={out}").returncode == 0
    files = {os.path.join(r, n): os.stat(os.path.join(r, n)).st_mtime_ns
             for r, _, names in os.walk(out) for n in names if n != "run.lock"}
    proc = run_script("main.py", *RUN, "-o", f"train.output_dir={out}", "--resume")
    assert proc.returncode == 0 and f"the run in {out} is complete" in proc.stdout
    assert {path: os.stat(path).st_mtime_ns for path in files} == files
    assert not any(f for f in os.listdir(os.path.join(out, "vdl")) if f != "vdlrecords.run.log")


def test_people_read_one_numbering_and_loss_parts_that_add_up(tmp_path):
    out = str(tmp_path / "run")
    # Two epochs left after the signal: a loaded machine may read the line late.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *RUN, "-o",
                             "stages.1.epochs=3", "-o", f"train.output_dir={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("stage 1 epoch 1/3:"):
            proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    # At the end of epoch 1 (the signal came before its stop check) or inside a later one.
    stopped = re.search(r"interrupted: SIGTERM at stage 1 epoch ([123]) \(step \d+\)", stderr)
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


def test_offline_every_missing_download_is_named_at_once(monkeypatch):
    import data.cifar as cifar
    import utils.io.download as download
    from data.cifar import pending_download as cifar_download
    from models.build import pending_download as weights_download

    monkeypatch.setattr(cifar, "default_archive_path", lambda c: "/nonexistent/archive.tar.gz")
    monkeypatch.setattr(download, "weights_cached", lambda url: False)
    monkeypatch.setattr(download, "_unreachable", lambda url: "Name or service not known")
    import models.build as build

    monkeypatch.setattr(build, "weights_cached", lambda url: False)
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml")
    needed = [cifar_download(cfg.data), weights_download(cfg.model)]
    assert all(needed)
    with pytest.raises(UserError) as caught:
        download.ensure_downloadable(needed)
    message = str(caught.value)
    for fragment in ("offline (Name or service not known): 2 download(s) cannot be made",
                     "CIFAR-100: fetch cifar-100-python.tar.gz from https://dataset.bj.bcebos.com",
                     "pass -o data.path=/path/to/cifar-100-python.tar.gz",
                     "fetch DeiT_base_distilled_patch16_384.pdparams from https://",
                     "-o model.pretrained=/path/to/DeiT_base_distilled_patch16_384.pdparams"):
        assert fragment in message, fragment
    assert weights_download(cfg.model, load_pretrained=False) is None  # a resume needs none


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
    proc = run_script("main.py", *RUN, "-o", f"train.output_dir={tmp_path / 'log'}")
    assert proc.returncode == 0 and "\r" not in proc.stderr  # a background job's log


def test_asking_for_an_average_the_run_did_not_keep_says_so(tmp_path):
    out = str(tmp_path / "run")
    train(small_demo_config(out, "stages.1.epochs=1"))
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}", "--kind",
                                "swa"),
                     "--kind swa: SWA is off in the run in", "train.swa.enabled: false")
