"""Hostile input, round 2 (continued): data files, loader workers, and what the project
reads back (checkpoints, metadata, exports). Each ends in one ``error:`` line, hangs never
and loses no run's records."""

import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    ROOT,
    assert_one_error,
    digits_cifar_archive,
    out_args,
    process_alive,
    run_script,
)


DEMO, FAST = DEMO_CLI, FAST_CLI


# 5, 9. Data files: pipes, devices, loops, odd types ------------------------------------

def test_the_cifar_reader_opens_only_its_regular_members(tmp_path):
    archive = digits_cifar_archive(tmp_path / "a.tar.gz")
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as handle:
        handle.extractall(folder, filter="data")
    os.mkfifo(folder / "cifar-100-python" / "file.txt~")  # every file was opened: a hang
    proc = run_script("main.py", *DEMO, *FAST, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={folder}", "-o",
                      "data.val_split=0", *out_args(tmp_path), timeout=300)  # 160 train images
    assert proc.returncode == 0, proc.stderr[-2000:]
    os.remove(folder / "cifar-100-python" / "test")
    os.mkfifo(folder / "cifar-100-python" / "test")
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
                      f"data.path={folder}", *out_args(tmp_path, "b"), timeout=120)
    assert_one_error(proc, "cifar-100-python/test is not a regular file")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, words in (("/dev/zero", "is not a regular file (a device, pipe or socket)"),
                        (str(loop), "is a symbolic link loop")):
        proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o",
                          f"data.path={path}", *out_args(tmp_path, "c"), timeout=120)
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
    archive = digits_cifar_archive(tmp_path / "a.tar.gz", **{member: words})
    proc = run_script("main.py", *DEMO, *FAST, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={archive}", *out_args(tmp_path))
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
                             "-o", "data.num_workers=2", *out_args(tmp_path)], cwd=ROOT,
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
