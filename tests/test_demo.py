"""The bundled demo end to end, through main.py and val.py as a user runs them."""

import json
import os
import re
import socket
import struct
import subprocess
import sys
from urllib.parse import urlparse

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_BAND,
    HANG_S,
    ROOT,
    assert_one_error,
    final_tests,
    read_records,
    run_script,
)

from data.cifar import CIFAR100
from data.digits import load_digits
from training.config import load_config
from utils.io.tensor_io import load_tensors


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Train the demo once (about two minutes on two cores) into a temporary folder."""
    out = str(tmp_path_factory.mktemp("demo"))
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_demo_trains_every_stage_and_epoch(demo_run):
    out, proc = demo_run
    cfg = load_config("configs/demo.yaml")
    records = read_records(out)
    assert len(records) == sum(stage.epochs for stage in cfg.stages)
    tests = read_records(out, test=True)
    assert [(t["test"], t["num_samples"]) for t in tests] == [("last", 360), ("best", 360)]
    assert [r["stage"] for r in records] == [i for i, s in enumerate(cfg.stages)
                                             for _ in range(s.epochs)]
    assert records[-1]["train_loss"] < 0.5 * records[0]["train_loss"]
    assert "best val top1" in proc.stdout


@pytest.mark.slow
def test_val_reports_demo_accuracy_per_sample(demo_run):
    out, _ = demo_run
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"top1=(\S+) top5=(\S+) loss=(\S+) n=(\d+) on the test split", last)
    assert match, last
    top1, top5, loss, n = float(match[1]), float(match[2]), float(match[3]), int(match[4])
    # Measured 0.950-0.967 over seeds 0-2 (best weights chosen on the 240 held-out digits);
    # one image is 0.28 points; chance is 0.1.
    assert n == 360 and top1 >= DEMO_BAND and top5 >= top1 and loss < 0.5
    with open(os.path.join(out, "val_metrics.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["num_samples"] == 360 and report["top1"] == pytest.approx(top1, abs=1e-4)
    assert list(report["per_class_top1"]) == [str(d) for d in range(10)]
    # Per-sample accuracy: the class accuracies weighted by class sizes give top-1 back.
    sizes = np.bincount(load_digits("test")[1])
    weighted = sum(a * s for a, s in zip(report["per_class_top1"].values(), sizes)) / 360
    assert weighted == pytest.approx(report["top1"])
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        best = json.load(handle)
    assert best["test_top1"] == pytest.approx(report["top1"]) and best["selected_on"] == "val"
    assert final_tests(out)["best"]["test_top1"] == pytest.approx(report["top1"])
    # The held-out split has a result file of its own: the test split's is kept.
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}",
                      "--split", "val", "--plot")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("n=240 on the val split")
    with open(os.path.join(out, "val_metrics_val.json"), encoding="utf-8") as handle:
        assert json.load(handle)["num_samples"] == 240
    with open(os.path.join(out, "val_metrics.json"), encoding="utf-8") as handle:
        assert json.load(handle) == report
    assert os.path.isfile(os.path.join(out, "per_class_top1_val.png"))


@pytest.mark.slow
def test_outputs_hold_no_pickles_and_paddle_saved_weights_still_evaluate(demo_run, tmp_path):
    out, _ = demo_run
    for folder, _, files in os.walk(out):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.relpath(path, out).startswith("vdl"):
                continue
            assert name.endswith((".safetensors", ".json", ".jsonl", ".yaml", ".png", ".lock",
                                  "RESUME.txt")), path
            with open(path, "rb") as handle:
                head = handle.read(9)
            if name.endswith(".safetensors"):  # u64 header length, then the JSON header
                assert head[8:9] == b"{", path
            else:
                assert head[:1] != b"\x80", path  # no pickle opcode stream
    state, _ = load_tensors(os.path.join(out, "best.safetensors"))
    converted = str(tmp_path / "best.pdparams")
    paddle.save({key: paddle.to_tensor(value) for key, value in state.items()}, converted)
    lines = []
    for weights in (os.path.join(out, "best.safetensors"), converted):
        proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={tmp_path}",
                          "--weights", weights)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines.append(proc.stdout.strip().splitlines()[-1])
    assert lines[0] == lines[1] and lines[0].startswith("top1=")


@pytest.mark.slow
def test_val_at_another_resolution_resamples_the_position_embedding(demo_run, tmp_path):
    out, _ = demo_run
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}",
                      "-o", "data.image_size=48")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pos_embed resampled to this resolution" in proc.stdout
    top1 = float(proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1])
    assert 0.1 < top1 <= 1.0


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def _png_size(path):
    """(width, height) from a PNG's header."""
    with open(path, "rb") as handle:
        return struct.unpack(">II", handle.read(24)[16:24])


@pytest.mark.slow
def test_curves_are_drawn_at_the_end_and_on_demand(demo_run):
    out, proc = demo_run
    curves = os.path.join(out, "curves.png")
    assert _is_png(curves) and f"curves in {curves}" in proc.stdout
    assert _png_size(curves) == (1000, 700)  # shown about that wide: its text stays readable
    os.remove(curves)
    regenerated = subprocess.run([sys.executable, "-m", "utils.reports.plots", out], cwd=ROOT,
                                 capture_output=True, text=True, timeout=HANG_S)
    assert regenerated.returncode == 0 and _is_png(curves), regenerated.stderr[-2000:]
    plotted = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}",
                         "--plot")
    assert plotted.returncode == 0 and _is_png(os.path.join(out, "per_class_top1.png"))


@pytest.mark.slow
def test_val_without_checkpoint_is_one_error_line(tmp_path):
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={tmp_path}")
    assert_one_error(proc, f"no weights at {tmp_path}/best.safetensors", "train first")


def _cifar_host_reachable():
    try:
        socket.create_connection((urlparse(CIFAR100.url).hostname, 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_default_run_offline_fails_fast_with_one_line(tmp_path):
    if _cifar_host_reachable():
        pytest.skip("the CIFAR-100 host is reachable: plain main.py would download it")
    proc = run_script("main.py", env={"HOME": str(tmp_path)}, timeout=HANG_S)  # empty Paddle cache
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: offline")
    assert "2 download(s)" in lines[0] and "Traceback" not in proc.stderr
    for fragment in ("cifar-100-python.tar.gz from https://", "-o data.path=",
                     "DeiT_base_distilled_patch16_384.pdparams from https://",
                     "-o model.pretrained=/path/to/DeiT_base_distilled_patch16_384.pdparams"):
        assert fragment in lines[0], fragment
    # The GPU recipe on this CPU: said before anything else, with the GPUs' hours beside.
    first = proc.stdout.splitlines()[0]
    assert first.startswith("warning: this run is ") and "h on this CPU (" in first
    assert "A100-40GB about 1.9 h" in first



def test_a_per_class_chart_of_many_classes_is_sorted_by_accuracy(tmp_path):
    from utils.reports.plots import per_class_order, plot_per_class

    few = {str(d): d / 10 for d in range(10)}
    assert per_class_order(few) == list(few)  # ten digits keep their order
    rng = np.random.default_rng(0)
    many = {f"class{i}": float(rng.random()) for i in range(100)}
    many["class7"] = None  # no test image of it
    order = per_class_order(many)
    values = [many[n] for n in order[:-1]]
    assert sorted(order) == sorted(many) and order[-1] == "class7"
    assert values == sorted(values, reverse=True)
    assert _is_png(plot_per_class(many, str(tmp_path / "chart.png"), "per-class top-1"))


def test_a_chart_of_a_hundred_classes_names_the_best_and_worst_15(tmp_path):
    from utils.reports.plots import extremes, plot_per_class

    rng = np.random.default_rng(1)
    many = {f"类{i}": float(rng.integers(0, 51)) / 50 for i in range(100)}
    many["类7"] = None  # no test image of it
    best, worst = extremes(many)
    measured = [(value, name) for name, value in many.items() if value is not None]
    ranked = [name for _, name in sorted(measured, key=lambda item: -item[0])]
    assert [many[n] for n in best] == sorted((v for v, _ in measured), reverse=True)[:15]
    assert [many[n] for n in worst] == sorted(v for v, _ in measured)[:15]
    assert set(best) <= set(ranked[:20]) and "类7" not in best + worst
    assert _is_png(plot_per_class(many, str(tmp_path / "chart.png"), "per-class top-1"))
