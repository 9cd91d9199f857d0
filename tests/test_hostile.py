"""Hostile input, round 2: files and settings made to crash, hang, exhaust or mislead the
entry points. Each ends in one ``error:`` line (or a warning and a skipped item where that
is what a user wants), runs nothing from the data, hangs never, loses no run's records."""

import json
import os
import signal
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
    ROOT,
    assert_one_error,
    cifar_batch,
    process_alive,
    read_records,
    run_script,
    tiny_model_config,
    write_cifar_archive,
)

from data.digits import load_digits
from models.build import build_model
from utils.io.tensor_io import save_tensors

DEMO = ["-c", "configs/demo.yaml"]
FAST = ["-o", "data.train_subset=128", "-o", "data.val_subset=40", "-o", "data.batch_size=32",
        "-o", "stages.0.epochs=1", "-o", "stages.1.epochs=1"]
# NumPy's datetime dtype with metadata None, through the allowed numpy.dtype + BUILD:
# this file segfaulted every entry point.
DTYPE_CRASH = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00M8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNN"
               b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.")
# numpy.ndarray((1000000, 3072), 'u1'): 3 GB of uninitialised memory from 37 bytes.
NDARRAY_BOMB = (b"\x80\x02cnumpy\nndarray\nJ@B\x0f\x00M\x00\x0c\x86X\x02\x00\x00\x00u1\x86R.")


def _out(tmp_path, name="out"):
    return ["-o", f"train.output_dir={tmp_path / name}"]


def _archive(path, **members):
    images, labels = load_digits("train")
    content = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]},
               "train": cifar_batch(images[:160], labels[:160]),
               "test": cifar_batch(images[160:220], labels[160:220])}
    content.update(members)
    return write_cifar_archive(path, content)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny demo run and its exported model."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("export.py", *DEMO, "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


# 1. The restricted unpickler: memory safety at every entry point ------------------------

def test_the_dtype_crash_file_is_refused_by_every_entry_point(tmp_path, trained):
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(DTYPE_CRASH)
    cases = [
        ("val.py", *DEMO, "--weights", str(evil)),
        ("predict.py", *DEMO, "--weights", str(evil), os.path.join(ROOT, "docs", "demo_curves.png")),
        ("export.py", *DEMO, "--weights", str(evil), "--out", str(tmp_path / "x")),
        ("main.py", *DEMO, *FAST, *_out(tmp_path, "a"), "--init-from", str(evil)),
        ("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
         f"data.path={_archive(tmp_path / 'c.tar.gz', train=DTYPE_CRASH)}", *_out(tmp_path, "b")),
    ]
    for script, *args in cases:
        assert_one_error(run_script(script, *args), "asks to call numpy.dtype('M8')")


def test_allocation_bombs_in_a_small_archive_are_refused(tmp_path):
    bomb = write_cifar_archive(tmp_path / "bomb.tar.gz", {"train": NDARRAY_BOMB})
    assert os.path.getsize(bomb) < 2048
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={bomb}",
                      *_out(tmp_path))
    assert_one_error(proc, "asks to call numpy.ndarray(...) directly")
    # A member that unpacks to far more than its archive: a gzip bomb.
    zeros = tmp_path / "zeros.tar.gz"
    with tarfile.open(zeros, "w:gz") as archive:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = 64 << 20
        archive.addfile(info, _Zeros(info.size))
    assert os.path.getsize(zeros) < (1 << 20)
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={zeros}",
                      *_out(tmp_path, "z"))
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
    args = [sys.executable, os.path.join(ROOT, "main.py"), *DEMO, *FAST,
            "-o", f"train.output_dir={out}"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not (out / "run.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error(second, f"train.output_dir {out} is in use by another run (pid "
                             f"{first.pid} on")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert [(r["stage"], r["epoch"]) for r in read_records(str(out))] == [(0, 1), (1, 1)]


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
    proc = run_script("main.py", *DEMO, *FAST, *_out(tmp_path, "other"))
    assert_one_error(proc, "already holds 1 other entries (e.g. thesis.tex)")
    proc = run_script("main.py", *DEMO, *FAST, *_out(tmp_path, "other"), "--overwrite")
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
    assert_one_error(run_script("main.py", *DEMO, *FAST, *_out(tmp_path), "-o",
                                f"model.pretrained={path}"), "holds non-finite values")


def test_a_non_finite_validation_loss_is_an_error_and_never_the_best(tmp_path, monkeypatch):
    from training import run as run_module
    from training import trainer as trainer_module
    from utils.config import load_config
    from utils.errors import UserError

    real = trainer_module.evaluate

    def nan_for_the_ema(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        return dict(result, loss=float("nan")) if calls.append(1) or len(calls) % 2 == 0 \
            else result

    calls = []
    monkeypatch.setattr(trainer_module, "evaluate", nan_for_the_ema)
    out = str(tmp_path / "run")
    cfg = load_config("configs/demo.yaml", [f"train.output_dir={out}", "data.train_subset=128",
                                            "data.val_subset=40", "stages.0.epochs=1"])
    with pytest.raises(UserError, match="the ema weights give a non-finite validation loss at "
                                        "stage 0 epoch 1"):
        run_module.fit(cfg)
    assert not os.path.exists(os.path.join(out, "best.safetensors"))


# 5, 9. Data files: pipes, devices, loops, odd types ------------------------------------

def test_the_cifar_reader_opens_only_its_regular_members(tmp_path):
    archive = _archive(tmp_path / "a.tar.gz")
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as handle:
        handle.extractall(folder, filter="data")
    os.mkfifo(folder / "cifar-100-python" / "file.txt~")  # every file was opened: a hang
    proc = run_script("main.py", *DEMO, *FAST, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={folder}", "-o",
                      "data.val_split=0", *_out(tmp_path), timeout=300)  # 160 train images
    assert proc.returncode == 0, proc.stderr[-2000:]
    os.remove(folder / "cifar-100-python" / "test")
    os.mkfifo(folder / "cifar-100-python" / "test")
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
                      f"data.path={folder}", *_out(tmp_path, "b"), timeout=120)
    assert_one_error(proc, "cifar-100-python/test is not a regular file")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, words in (("/dev/zero", "is not a regular file (a device, pipe or socket)"),
                        (str(loop), "is a symbolic link loop")):
        proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
                          f"data.path={path}", *_out(tmp_path, "c"), timeout=120)
        assert_one_error(proc, f"data.path {path} {words}")


@pytest.mark.parametrize("member,words", [
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": ["a", "b"]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0.5, 1.0]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [None, 2 ** 80]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [[1], [2]]}),
    ("meta", {b"fine_label_names": [1, 2, 3]}),
    ("meta", {b"fine_label_names": b"abc"}),
])
def test_cifar_labels_and_meta_of_odd_types_are_one_line(tmp_path, member, words):
    archive = _archive(tmp_path / "a.tar.gz", **{member: words})
    proc = run_script("main.py", *DEMO, *FAST, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={archive}", *_out(tmp_path))
    assert_one_error(proc, "labels that are not a list of integers" if member == "test"
                     else "has no fine_label_names list")


def test_a_config_that_is_not_utf8_or_a_yaml_bomb_is_one_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  name: d\xefgits\n".encode("latin-1"))
    assert_one_error(run_script("main.py", "-c", str(latin), "--dry-run"), "is not UTF-8 text")
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.time()
    assert_one_error(run_script("main.py", "-c", str(bomb), "--dry-run", timeout=60),
                     "expands to more than 100000 values")
    assert_one_error(run_script("main.py", *DEMO, "-o",
                                "model.kwargs={a: &a [1, 1], b: [*a, *a]}", "--dry-run"),
                     "'model.kwargs.b' must be a number, a string")
    assert time.time() - start < 60


# 7. Loader workers die with their run --------------------------------------------------

def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_loader_workers_exit_when_their_run_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO,
                             "-o", "data.num_workers=2", *_out(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and time.time() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.1)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(process_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(w) for w in workers)


# 8. What the project reads back: checkpoints, metadata, exports -------------------------

def _resume(out):
    return run_script("main.py", *DEMO, *FAST, "-o", f"train.output_dir={out}", "--resume")


STATE_EDITS = {
    "a list": (lambda s: [], "no complete checkpoint"),
    "empty": (lambda s: {}, "no complete checkpoint"),
    "no position": (lambda s: {k: v for k, v in s.items() if k != "position"},
                    "lacks position"),
    "negative step": (lambda s: dict(s, global_step=-3), "'global_step' must be a count"),
    "negative records": (lambda s: dict(s, records=-1), "'records' must be a count"),
    "stage -1": (lambda s: dict(s, position=dict(s["position"], stage=-1)),
                 "'position.stage' must be a count"),
    "micro 1e9": (lambda s: dict(s, position=dict(s["position"], stage=1, micro=10 ** 9),
                                 progress=None), "micro-batch 1000000000"),
    "micro a float": (lambda s: dict(s, position=dict(s["position"], micro=1e9)),
                      "'position.micro' must be a count"),
    "stage 9": (lambda s: dict(s, position=dict(s["position"], stage=9)),
                "position stage 9 epoch 0 is not in the config's stages"),
    "best a string": (lambda s: dict(s, best="x"), "'best' must be a mapping"),
    "files outside": (lambda s: dict(s, files=["../../escape"]), "no complete checkpoint"),
    "nan progress": (lambda s: dict(s, progress={"micro": 0, "seen": 1, "elapsed": 0.0,
                                                 "excluded": 0, "sums": {"loss": float("nan"),
                                                                         "ce": 0, "kl": 0}}),
                     "is not valid JSON (the non-standard number NaN)"),
}


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_an_edited_state_json_is_one_line(trained, tmp_path, edit):
    change, message = STATE_EDITS[edit]
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", trained, copy], check=True)
    path = os.path.join(copy, "last", "state.json")
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(change(state)))
    assert_one_error(_resume(copy), message)


def test_a_checkpoint_whose_bytes_changed_is_refused(trained, tmp_path):
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", trained, copy], check=True)
    path = os.path.join(copy, "last", "raw.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0x04  # one bit of one weight
    open(path, "wb").write(bytes(data))
    assert_one_error(_resume(copy), "raw.safetensors is damaged: its bytes no longer match")
    best = os.path.join(copy, "best.safetensors")
    data = bytearray(open(best, "rb").read())
    data[len(data) // 2] ^= 0x80
    open(best, "wb").write(bytes(data))
    assert_one_error(run_script("val.py", *DEMO, "-o", f"train.output_dir={copy}"),
                     "best.safetensors is damaged")


def test_safetensors_with_odd_metadata_are_one_line(tmp_path):
    from safetensors.numpy import save

    from utils.errors import UserError
    from utils.io.tensor_io import load_tensors

    tensors = {"a/b": np.zeros(2, np.float32)}
    for rest in ("{bad json", "[1, 2]", '{"a": 5}', '"x"'):
        path = str(tmp_path / "odd.safetensors")
        with open(path, "wb") as handle:
            handle.write(save(tensors, metadata={"rest": rest}))
        with pytest.raises(UserError, match="has damaged metadata"):
            load_tensors(path)


@pytest.mark.parametrize("contract,message", [
    ([], "preprocess.json is damaged"),
    ({"image_size": "32", "class_names": ["a"]}, "preprocess.json is damaged"),
    ({"image_size": 32, "class_names": ["a", "a"]}, "distinct class_names"),
    ({"image_size": 10 ** 9, "class_names": ["a"]}, "preprocess.json is damaged"),
    ({"image_size": 32, "class_names": [str(i) for i in range(10)], "mean": [0, 0, 0],
      "std": [1, 1, 1]}, "another normalisation"),
])
def test_a_damaged_export_is_one_line(trained, tmp_path, contract, message):
    export = tmp_path / "inference"
    subprocess.run(["cp", "-r", os.path.join(trained, "inference"), str(export)], check=True)
    (export / "preprocess.json").write_text(json.dumps(contract))
    proc = run_script("predict.py", *DEMO, "--model-dir", str(export),
                      os.path.join(ROOT, "docs", "demo_predictions.png"))
    assert_one_error(proc, message)


def test_a_truncated_export_is_one_line(trained, tmp_path):
    for name in ("model.json", "model.pdiparams"):
        export = tmp_path / name
        subprocess.run(["cp", "-r", os.path.join(trained, "inference"), str(export)], check=True)
        files = [f for f in os.listdir(export) if f.startswith(name.split(".")[0])
                 and f.endswith(name.split(".")[1])]
        if not files:  # Paddle 2.6 writes model.pdmodel instead of model.json
            continue
        path = export / files[0]
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        proc = run_script("predict.py", *DEMO, "--model-dir", str(export),
                          os.path.join(ROOT, "docs", "demo_predictions.png"))
        assert_one_error(proc, "cannot be loaded", "run python export.py again")


# 9. Signals, full disks and the words of the end ----------------------------------------

def _has_loaded_paddle(pid):
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as handle:
            return "libpaddle" in handle.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_as_soon_as_paddle_is_loaded_is_one_line(tmp_path):
    """Paddle's import installs a C++ SIGTERM handler that printed a "FatalError" dump; a
    SIGTERM from then on, while the rest imports and the data loads, ends in one line."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO,
                             *_out(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _has_loaded_paddle(proc.pid) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert "FatalError" not in stderr and "C++ Traceback" not in stderr, stderr[-2000:]
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(("error: interrupted (SIGTERM)",
                                                       "interrupted: SIGTERM"))


NO_SPACE = """
import errno, os, runpy, sys
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
import utils.checkpoint
utils.checkpoint.save_tensors = full
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_a_full_disk_before_any_checkpoint_says_none_was_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_SPACE, *DEMO, *FAST, *_out(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = assert_one_error(proc, "No space left on device", "no checkpoint was saved there yet")
    assert "None" not in line and "previous checkpoint" not in line


def test_no_space_without_a_file_name_says_no_none():
    code = ("import errno, os, sys; sys.path.insert(0, '.')\n"
            "from utils import cli\n"
            "def main():\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert_one_error(proc, "No space left on device")
    assert "None" not in proc.stderr


def test_a_stop_after_the_last_epoch_is_not_an_interruption(tmp_path, monkeypatch, capsys):
    from training import run as run_module
    from training import trainer as trainer_module
    from utils.config import load_config

    real = trainer_module.Trainer._checkpoint

    def stop_at_the_end(self, position, progress):
        real(self, position, progress)
        if position.stage == len(self.cfg.stages):
            self.stops.signum = signal.SIGINT  # as if Ctrl-C came now

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", stop_at_the_end)
    out = str(tmp_path / "run")
    best = run_module.fit(load_config("configs/demo.yaml", [
        f"train.output_dir={out}", "data.train_subset=128", "data.val_subset=40",
        "stages.0.epochs=1", "stages.1.epochs=1"]))
    assert best is not None
    assert "SIGINT after the last epoch: training is complete" in capsys.readouterr().out


def test_an_epoch_of_skipped_steps_records_no_loss_and_standard_json(tmp_path, monkeypatch):
    from losses.rdrop import RDropLoss
    from training import run as run_module
    from training import trainer as trainer_module
    from utils.config import load_config

    loss = RDropLoss(alpha=1.0)

    def nan_in_stage_0(logits, labels):
        parts = loss(logits, labels)
        return {k: v * float("nan") for k, v in parts.items()} if trainer_module_stage[0] == 0 \
            else parts

    nan_in_stage_0.copies = 2
    trainer_module_stage = [0]
    real_stage = trainer_module.Trainer._run_stage

    def run_stage(self, stage_index, start):
        trainer_module_stage[0] = stage_index
        return real_stage(self, stage_index, start)

    monkeypatch.setattr(trainer_module.Trainer, "_run_stage", run_stage)
    monkeypatch.setattr(trainer_module, "build_loss", lambda *args: nan_in_stage_0)
    out = str(tmp_path / "run")
    run_module.fit(load_config("configs/demo.yaml", [
        f"train.output_dir={out}", "data.train_subset=128", "data.val_subset=40",
        "data.batch_size=32", "stages.0.epochs=1", "stages.1.epochs=1",
        "train.nan_policy=skip", "train.nan_max_skips=100"]))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(name)) for line in lines]
    assert records[0]["train_loss"] is None and records[0]["grad_norm"] is None
    assert records[1]["train_loss"] > 0


# Beyond the list: more paths of the wrong kind, odd archive members, damaged records ------

def test_more_paths_of_the_wrong_kind_are_one_line(tmp_path):
    cases = [
        (["main.py", "-c", str(tmp_path), "--dry-run"], "is a folder, not a file"),
        (["main.py", *DEMO, "-o", "train.output_dir=''"], "train.output_dir is empty"),
        (["val.py", *DEMO, "--weights", str(tmp_path)], "is a folder, not a file"),
        (["val.py", *DEMO, "--weights", "/dev/zero"], "is not a regular file"),
        (["main.py", *DEMO, *_out(tmp_path), "--resume", "/dev/zero"],
         "no complete checkpoint to resume in /dev/zero"),
        (["predict.py", *DEMO, "--model-dir", "/dev/null",
          os.path.join(ROOT, "docs", "demo_predictions.png")], "is not a regular file"),
    ]
    for (script, *args), message in cases:
        assert_one_error(run_script(script, *args, timeout=120), message)


def test_links_in_a_cifar_archive_are_not_followed(tmp_path):
    path = tmp_path / "links.tar.gz"
    _archive(path)
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isfile()]
    with tarfile.open(path, "w:gz") as archive:
        for member, data in members:
            if not member.name.endswith("train"):
                archive.addfile(member, __import__("io").BytesIO(data))
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={path}",
                      *_out(tmp_path))
    assert_one_error(proc, "no 'train' split found")


def test_a_damaged_metrics_file_is_one_line_for_the_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": 0, "epoch": 0}\n{"stage": 0, "ep\n')
    proc = subprocess.run([sys.executable, "-m", "utils.reports.plots", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_one_error(proc, "line 2 of", "is damaged")
