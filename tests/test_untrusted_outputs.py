"""Hostile input, round 3: no setting makes a third-party loader unpickle a file; no file is
written through or over a symbolic link; SIGHUP and closed pipes end runs as SIGTERM and
a quiet exit do; a stopped prediction keeps what it did."""

import json
import os
import signal
import subprocess
import sys

import paddle
import pytest
import sklearn
from conftest import ROOT, assert_one_error, run_script, tiny_model_config
from PIL import Image

import predict
from models.build import _no_weight_loading, build_model
from models.inference import export_model
from utils.config import load_config
from utils.errors import UserError
from utils.io.files import check_writable, open_unlinked, write_atomically, write_json
from utils.io.tensor_io import save_tensors
from utils.run_folder import RunFolder

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
DEMO = ["-c", "configs/demo.yaml"]


# 1. Code through third-party loaders -------------------------------------------------------

@pytest.mark.parametrize("key", ["model.kwargs", "distill.kwargs"])
@pytest.mark.parametrize("name", ["pretrained", "return_transforms"])
def test_no_setting_passes_ppims_loading_arguments(key, name):
    overrides = [f"{key}={{{name}: true}}"]
    if key == "distill.kwargs":
        overrides.append("distill.teacher=deit_s_distilled")
    with pytest.raises(UserError, match=f"'{key}.{name}' is not accepted: it makes PPIM's"):
        load_config("configs/demo.yaml", overrides)


def test_a_teacher_folder_whose_config_asks_ppim_to_load_is_refused(tmp_path):
    from models.teacher import build_teacher
    from training.amp import Precision

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    text = open(os.path.join(ROOT, "configs", "demo.yaml"), encoding="utf-8").read()
    (teacher / "config.yaml").write_text(text.replace("    epsilon: 1.0e-6",
                                                      "    epsilon: 1.0e-6\n    pretrained: true"))
    cfg = load_config("configs/demo.yaml", [f"distill.teacher={teacher}"])
    with pytest.raises(UserError, match="model.kwargs.pretrained' is not accepted"):
        build_teacher(cfg.distill, 10, Precision())


def test_paddle_load_is_refused_while_a_ppim_model_builds():
    real = paddle.load
    with _no_weight_loading("deit_x"):
        with pytest.raises(UserError, match="PPIM's deit_x tried to load weights with "
                                            "paddle.load"):
            paddle.load("/nonexistent.pdparams")
    assert paddle.load is real
    build_model(tiny_model_config())  # a build that loads nothing is unaffected


# 2. Writes through links -------------------------------------------------------------------

@pytest.fixture
def victim(tmp_path):
    """A file outside the output that a planted link points to."""
    path = tmp_path / "victim.txt"
    path.write_text("keep me\n")
    return path


def test_no_write_replaces_or_goes_through_a_link(tmp_path, victim):
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    for write in (lambda: write_atomically(str(link), b"x"), lambda: write_json(str(link), {}),
                  lambda: open_unlinked(str(link), "a"), lambda: open_unlinked(str(link), "w"),
                  lambda: check_writable(str(link), "--json")):
        with pytest.raises(UserError, match="is a symbolic link"):
            write()
        assert link.is_symlink() and victim.read_text() == "keep me\n"
    # A planted temporary file is replaced, never written through.
    target = tmp_path / "best.json"
    (tmp_path / "best.json.tmp").symlink_to(victim)
    write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and victim.read_text() == "keep me\n"
    assert not os.path.lexists(tmp_path / "best.json.tmp")


def test_predict_json_to_dev_stdout_is_refused_and_dash_means_standard_output(tmp_path):
    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict())
    photo = os.path.join(PHOTOS, "china.jpg")
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")
    proc = run_script("predict.py", *DEMO, photo, "--weights", weights, "--json",
                      str(stdout_link))
    assert_one_error(proc, "--json", "is a symbolic link")
    proc = run_script("predict.py", *DEMO, photo, "--weights", weights, "--json", "-")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)[0]["file"] == photo and f"{photo}: " in proc.stderr


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


def test_overwrite_never_replaces_a_linked_output_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "metrics.jsonl").write_text("{}\n")
    link = tmp_path / "output"
    link.symlink_to(real)
    with pytest.raises(UserError, match="is a symbolic link, which --overwrite would replace"):
        RunFolder(str(link)).hold(overwrite=True)
    assert link.is_symlink() and (real / "metrics.jsonl").exists()


def test_an_export_over_links_or_folders_is_one_error(tmp_path, victim):
    model = build_model(tiny_model_config())
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.pdiparams").symlink_to(victim)
    with pytest.raises(UserError, match="model.pdiparams is a symbolic link"):
        export_model(model, 32, str(out), [str(i) for i in range(10)])
    os.remove(out / "model.pdiparams")
    (out / "preprocess.json").mkdir()
    with pytest.raises(UserError, match="preprocess.json is a folder"):
        export_model(model, 32, str(out), [str(i) for i in range(10)])
    assert victim.read_text() == "keep me\n"


# 8. Signals and pipes ----------------------------------------------------------------------

def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} main.py -c configs/demo.yaml --dry-run | head -1",
                          shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("data: ") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_sighup_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "hup")
    proc = subprocess.Popen([sys.executable, "main.py", *DEMO, "-o", f"train.output_dir={out}",
                             "-o", "data.train_subset=256", "-o", "train.progress=off"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("stage 0 epoch 1/"):
            proc.send_signal(signal.SIGHUP)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGHUP, err[-2000:]
    line = [text for text in err.splitlines() if text.startswith("interrupted: ")][0]
    assert "SIGHUP at stage 0" in line and "--resume" in line and "Traceback" not in err
    assert os.path.isfile(os.path.join(out, "last", "state.json"))


def test_a_stopped_prediction_writes_the_images_it_did(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(4):
        with Image.open(os.path.join(PHOTOS, "flower.jpg")) as image:
            image.resize((40 + index, 30)).save(photos / f"{index}.png")
    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict())
    from data import augment

    calls = []

    real_view = augment.eval_view

    def view_then_stop(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C, SIGTERM or SIGHUP raise here
        return real_view(*args)

    monkeypatch.setattr(augment, "eval_view", view_then_stop)
    target = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        predict.main([*DEMO, str(photos), "--weights", weights, "--json", str(target)])
    done = json.loads(target.read_text())
    assert [os.path.basename(r["file"]) for r in done] == ["0.png", "1.png"]
    assert all(len(r["topk"]) == 5 for r in done)


def test_export_py_into_a_folder_with_a_planted_link_is_one_line(tmp_path, victim):
    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict())
    out = tmp_path / "export"
    out.mkdir()
    (out / "preprocess.json").symlink_to(victim)
    proc = run_script("export.py", *DEMO, "--weights", weights, "--out", str(out))
    assert_one_error(proc, "preprocess.json is a symbolic link")
    assert victim.read_text() == "keep me\n"
