"""Hostile input, round 2: files and settings made to crash, hang, exhaust or mislead the
entry points. Each ends in one ``error:`` line (or a warning and a skipped item where that
is what a user wants), runs nothing from the data, hangs never, loses no run's records."""

import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    ROOT,
    assert_one_error,
    digits_cifar_archive,
    read_records,
    out_args,
    run_script,
    tiny_model_config,
    write_cifar_archive,
)

from models.build import build_model
from utils.io.tensor_io import save_tensors


DEMO, FAST = DEMO_CLI, FAST_CLI
# NumPy's datetime dtype with metadata None, through the allowed numpy.dtype + BUILD:
# this file segfaulted every entry point.
DTYPE_CRASH = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00M8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNN"
               b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.")
# numpy.ndarray((1000000, 3072), 'u1'): 3 GB of uninitialised memory from 37 bytes.
NDARRAY_BOMB = (b"\x80\x02cnumpy\nndarray\nJ@B\x0f\x00M\x00\x0c\x86X\x02\x00\x00\x00u1\x86R.")


# 1. The restricted unpickler: memory safety at every entry point ------------------------

def test_the_dtype_crash_file_is_refused_by_every_entry_point(tmp_path, trained):
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(DTYPE_CRASH)
    cases = [
        ("val.py", *DEMO, "--weights", str(evil)),
        ("predict.py", *DEMO, "--weights", str(evil), os.path.join(ROOT, "docs", "demo_curves.png")),
        ("export.py", *DEMO, "--weights", str(evil), "--out", str(tmp_path / "x")),
        ("main.py", *DEMO, *FAST, *out_args(tmp_path, "a"), "--init-from", str(evil)),
        ("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
         f"data.path={digits_cifar_archive(tmp_path / 'c.tar.gz', train=DTYPE_CRASH)}", *out_args(tmp_path, "b")),
    ]
    for script, *args in cases:
        assert_one_error(run_script(script, *args), "asks to call numpy.dtype('M8')")


def test_allocation_bombs_in_a_small_archive_are_refused(tmp_path):
    bomb = write_cifar_archive(tmp_path / "bomb.tar.gz", {"train": NDARRAY_BOMB})
    assert os.path.getsize(bomb) < 2048
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={bomb}",
                      *out_args(tmp_path))
    assert_one_error(proc, "asks to call numpy.ndarray(...) directly")
    # A member that unpacks to far more than its archive: a gzip bomb.
    zeros = tmp_path / "zeros.tar.gz"
    with tarfile.open(zeros, "w:gz") as archive:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = 64 << 20
        archive.addfile(info, _Zeros(info.size))
    assert os.path.getsize(zeros) < (1 << 20)
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={zeros}",
                      *out_args(tmp_path, "z"))
    assert_one_error(proc, "would unpack to 67108864 bytes, far more than its archive holds")


class _Zeros:
    """A file object of ``size`` zero bytes, written without holding them."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _png_header(width, height):
    """A PNG that declares ``width`` x ``height`` pixels in a few dozen bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# 2, 5, 6. Images: bombs, pipes, PostScript -----------------------------------------------

def test_prediction_skips_bad_images_with_a_warning_and_keeps_the_rest(tmp_path, trained):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = os.path.join(ROOT, "docs", "demo_predictions.png")
    (folder / "a_good.png").write_bytes(open(good, "rb").read())
    (folder / "b_huge.png").write_bytes(_png_header(60000, 60000))
    (folder / "c_10000.png").write_bytes(_png_header(10000, 10000))
    (folder / "d_text.png").write_text("not an image")
    os.mkfifo(folder / "e_pipe.png")  # would block an open() forever
    marker = tmp_path / "ghostscript-ran"
    (folder / "f_ps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
                                      b"showpage\n")
    (folder / "g.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("gs", "gswin64c"):  # a Ghostscript that leaves a mark if it is ever run
        path = fake_bin / name
        path.write_text(f"#!/bin/sh\ntouch {marker}\n")
        path.chmod(0o755)
    json_out = tmp_path / "p.json"
    proc = run_script("predict.py", *DEMO, "-o", f"train.output_dir={trained}", str(folder),
                      "--json", str(json_out), timeout=120,
                      env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert_one_error(proc, "4 of 5 images could not be read", "the other 1 were predicted",
                     f"written to {json_out}")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 4 and all("\n" not in w for w in warnings)
    assert proc.stderr.count("declares more than 40,000,000 pixels") == 2
    assert [r["file"] for r in json.loads(json_out.read_text())] == [str(folder / "a_good.png")]
    assert not marker.exists()
    proc = run_script("predict.py", *DEMO, "-o", f"train.output_dir={trained}",
                      str(folder / "e_pipe.png"), timeout=60)
    assert_one_error(proc, "is not a regular file")


def test_prediction_checks_the_json_destination_before_the_work(trained, tmp_path):
    proc = run_script("predict.py", *DEMO, "-o", f"train.output_dir={trained}",
                      os.path.join(ROOT, "docs", "demo_predictions.png"),
                      "--json", str(tmp_path / "missing" / "p.json"))
    assert_one_error(proc, "--json", "does not exist")
    assert "demo_predictions.png:" not in proc.stdout


# 3. Output folders: one run at a time, nothing overwritten -------------------------------

def test_a_second_run_into_a_held_folder_stops_and_the_first_keeps_its_records(tmp_path):
    out = tmp_path / "run"
    # Long enough (about 30 steps after the lock) that the first run still holds its folder
    # when the second has started: a finished one would be reported complete instead.
    args = [sys.executable, os.path.join(ROOT, "main.py"), *DEMO, *FAST, "-o",
            "data.train_subset=512", "-o", "stages.0.epochs=2", "-o", f"train.output_dir={out}"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not (out / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error(second, f"train.output_dir {out} is in use by another run (pid "
                             f"{first.pid} on")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert [(r["stage"], r["epoch"]) for r in read_records(str(out))] == [(0, 1), (0, 2), (1, 1)]


def test_a_fresh_run_never_writes_over_an_earlier_one(trained, tmp_path):
    before = {name: open(os.path.join(trained, name), "rb").read()
              for name in ("metrics.jsonl", "config.yaml", "best.safetensors")}
    # The same command again: the run is complete, nothing is trained or written, exit 0.
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"train.output_dir={trained}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"the run in {trained} is complete with this config" in proc.stdout
    assert "best val top1" in proc.stdout.splitlines()[-1]
    # Another config: one error, and no --resume offered for a finished run.
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"train.output_dir={trained}",
                      "-o", "train.seed=1")
    line = assert_one_error(proc, f"train.output_dir {trained} already holds a finished run "
                                  f"(2 epochs)", "--overwrite")
    assert "--resume" not in line
    for name, data in before.items():
        assert open(os.path.join(trained, name), "rb").read() == data, name
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", trained, str(copy)], check=True)
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"train.output_dir={copy}", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = [p for p in os.listdir(tmp_path) if p.startswith("copy.old-")]
    assert len(moved) == 1 and f"moved the earlier contents of {copy} to" in proc.stdout
    assert os.path.isdir(tmp_path / moved[0] / "inference")  # the old run, whole
    assert not (copy / "inference").exists() and not (copy / "val_metrics.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("not a run")
    proc = run_script("main.py", *DEMO, *FAST, *out_args(tmp_path, "other"))
    assert_one_error(proc, "already holds 1 other entries (e.g. thesis.tex)")
    proc = run_script("main.py", *DEMO, *FAST, *out_args(tmp_path, "other"), "--overwrite")
    assert_one_error(proc, "holds files that no run wrote (e.g. thesis.tex); --overwrite moves "
                           "only earlier runs")
    assert (tmp_path / "other" / "thesis.tex").exists()


def test_output_folders_that_cannot_be_folders_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_error(run_script("main.py", *DEMO, "-o", f"train.output_dir={blocker}"),
                     "is a file, not a folder")
    assert_one_error(run_script("main.py", *DEMO, "-o", f"train.output_dir={blocker}/run"),
                     f"lies under {blocker}, which is a file")
    assert_one_error(run_script("val.py", *DEMO, "-o", f"train.output_dir={blocker}/run"),
                     f"lies under {blocker}, which is a file")


# 4. Non-finite and out-of-range settings and weights -------------------------------------

FLOAT_KEYS = ["loss.alpha", "train.ema.decay", "stages.0.optimizer.lr", "stages.0.warmup.epochs",
              "train.clip_grad_norm", "data.rotation", "model.drop_rate",
              "stages.1.lr_schedule.end_lr", "model.kwargs.mlp_ratio", "stages.0.until.val_top1",
              "stages.0.loss.alpha", "stages.0.optimizer.epsilon", "stages.1.optimizer.l2_decay"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "-.Inf"])
def test_non_finite_numbers_are_refused_for_every_float_key(value):
    from utils.config import load_config
    from utils.errors import UserError

    for key in FLOAT_KEYS:
        with pytest.raises(UserError, match=f"'{key}' must be a finite number"):
            load_config("configs/demo.yaml", [f"{key}={value}"])
    with pytest.raises(UserError, match="'stages.0.optimizer.betas.1' must be a finite number"):
        load_config("configs/demo.yaml", [f"stages.0.optimizer.betas=[0.9, {value}]"])


@pytest.mark.parametrize("override,message", [
    ("train.seed=-1", "'train.seed' must be >= 0"),
    ("train.seed=1099511627776", "'train.seed' must be <= 4294967295"),
    ("data.batch_size=1000000000000", "'data.batch_size' must be <= 65536"),
    ("data.image_size=100000", "'data.image_size' must be <= 1024"),
    ("model.kwargs.depth=1000000", "'model.kwargs.depth' must be <= 128"),
    ("model.kwargs.embed_dim=-5", "'model.kwargs.embed_dim' must be >= 1"),
    ("model.kwargs.num_heads=3", "the width must divide into the heads"),
    ("model.kwargs.depth=2.5", "'model.kwargs.depth' must be int"),
    ("model.kwargs={depth: {nested: 1}}", "must be a number, a string, a boolean"),
    ("stages.0.epochs=10000000000", "'stages.0.epochs' must be <= 1000000000"),
    ("data.num_workers=100000", "'data.num_workers' must be <= 64"),
])
def test_integer_and_model_size_bounds(override, message):
    assert_one_error(run_script("main.py", *DEMO, "-o", override, "--dry-run"), message)


def test_nan_weights_are_never_loaded(tmp_path):
    paddle.seed(0)
    state = build_model(tiny_model_config()).state_dict()
    state = {k: v.numpy() for k, v in state.items()}
    state["blocks.0.attn.qkv.weight"][0, 0] = np.nan
    path = str(tmp_path / "nan.safetensors")
    save_tensors(path, state)
    assert_one_error(run_script("val.py", *DEMO, "--weights", path),
                     "holds non-finite values (1 tensors, e.g. blocks.0.attn.qkv.weight)")
    assert_one_error(run_script("main.py", *DEMO, *FAST, *out_args(tmp_path), "-o",
                                f"model.pretrained={path}"), "holds non-finite values")


def test_a_non_finite_validation_loss_is_an_error_and_never_the_best(tmp_path, monkeypatch):
    from main import train
    from training import engine
    from utils.config import load_config
    from utils.errors import UserError

    real = engine.evaluate

    def nan_for_the_ema(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        return dict(result, loss=float("nan")) if calls.append(1) or len(calls) % 2 == 0 \
            else result

    calls = []
    monkeypatch.setattr(engine, "evaluate", nan_for_the_ema)
    out = str(tmp_path / "run")
    cfg = load_config("configs/demo.yaml", [f"train.output_dir={out}", "data.train_subset=128",
                                            "data.val_subset=40", "stages.0.epochs=1"])
    with pytest.raises(UserError, match="the ema weights give a non-finite validation loss at "
                                        "stage 0 epoch 1"):
        train(cfg)
    assert not os.path.exists(os.path.join(out, "best.safetensors"))
