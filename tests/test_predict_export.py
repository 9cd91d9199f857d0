"""predict.py on real photos (scikit-learn's sample JPEGs, in every PIL mode), export.py, and
the exported model through paddle.inference against the eager one; bad images, damaged
exports, links and folders where they write, a stopped prediction."""

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import paddle
import pytest
import sklearn
from conftest import (
    DEMO_CLI,
    HANG_S,
    ROOT,
    assert_one_error,
    png_file,
    run_script,
    tiny_model_config,
)
from PIL import Image

import predict
from data.images import read_rgb
from data.preprocess import DevicePreprocess
from models.build import build_model
from models.inference import ExportedModel, export_model
from training.config import load_config
from utils.errors import Interrupted, UserError
from utils.io.tensor_io import save_tensors

PHOTOS = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")


@pytest.fixture(scope="module")
def weights_and_photos(tmp_path_factory):
    """Weights of the demo's model (seeded random init) and a folder of real photos: the two
    JPEGs as they are, and one saved as greyscale PNG and as RGBA PNG at another size."""
    root = tmp_path_factory.mktemp("predict")
    paddle.seed(3)
    model = build_model(load_config("configs/demo.yaml").model)
    weights = str(root / "w.safetensors")
    save_tensors(weights, model.state_dict())
    photos = root / "photos"
    photos.mkdir()
    for name in ("china.jpg", "flower.jpg"):
        with Image.open(os.path.join(PHOTOS, name)) as image:
            image.save(photos / name)
    with Image.open(os.path.join(PHOTOS, "china.jpg")) as image:
        image.convert("L").save(photos / "grey.png")
        image.convert("RGBA").resize((123, 77)).save(photos / "rgba.png")
    (photos / "notes.txt").write_text("not an image")
    return weights, str(photos)


@pytest.mark.slow
def test_exported_model_agrees_with_the_eager_model(weights_and_photos, tmp_path):
    weights, photos = weights_and_photos
    cfg = load_config("configs/demo.yaml")
    model = build_model(cfg.model, load_pretrained=False)
    from models.build import load_weights

    load_weights(model, weights, strict=True)
    model.eval()
    export_model(model, 32, str(tmp_path / "inference"), [str(i) for i in range(10)])
    exported = ExportedModel(str(tmp_path / "inference"))
    assert exported.contract["image_size"] == 32 and exported.contract["mean"][0] == 0.485
    preprocess = DevicePreprocess(32)
    batch = paddle.concat([preprocess(paddle.to_tensor(read_rgb(os.path.join(photos, n))[None]))
                           for n in sorted(os.listdir(photos)) if not n.endswith(".txt")])
    with paddle.no_grad():
        eager = model(batch).numpy()
    assert eager.shape == (4, 10)
    assert np.abs(exported(batch.numpy()) - eager).max() < 1e-4


def test_paddle_2_predicts_without_the_self_attention_fusion_that_needs_avx512(tmp_path):
    """Paddle 2.6's CPU self-attention fusion ends in an illegal instruction without AVX-512:
    it is not among the passes there (Paddle 3 keeps it: it checks the processor)."""
    from models.inference import SELF_ATTENTION_FUSION, predictor_config

    cfg = load_config("configs/demo.yaml")
    model = build_model(cfg.model, load_pretrained=False)
    export_model(model, 32, str(tmp_path / "inference"), [str(i) for i in range(10)])
    graph = [name for name in os.listdir(tmp_path / "inference")
             if name in ("model.json", "model.pdmodel")]
    config = predictor_config(str(tmp_path / "inference" / graph[0]),
                              str(tmp_path / "inference" / "model.pdiparams"))
    passes = config.pass_builder().all_passes()
    major = int(paddle.__version__.split(".")[0])
    assert (SELF_ATTENTION_FUSION in passes) == (major >= 3), (paddle.__version__, passes)


@pytest.mark.slow
def test_predict_reads_folders_globs_and_every_mode_the_same_through_both_paths(
        weights_and_photos, tmp_path):
    weights, photos = weights_and_photos
    out = str(tmp_path / "inference")
    proc = run_script("export.py", "-c", "configs/demo.yaml", "--weights", weights, "--out", out)
    assert proc.returncode == 0 and os.path.isfile(os.path.join(out, "preprocess.json")), \
        proc.stderr[-2000:]
    assert "not support input out tensor" not in proc.stderr  # Paddle's harmless PIR line
    results = []
    for path_args in (["--weights", weights], ["--model-dir", out]):
        target = str(tmp_path / f"p{len(results)}.json")
        proc = run_script("predict.py", "-c", "configs/demo.yaml", *path_args, photos,
                          os.path.join(photos, "*.jpg"), "--topk", "3", "--json", target)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if path_args[0] == "--model-dir":  # the exported model is named with its weights
            assert f"model {out}: exported from {os.path.abspath(weights)}; 10 classes, 32 px" \
                in proc.stdout
        with open(target, encoding="utf-8") as handle:
            results.append(json.load(handle))
    eager, exported = results
    names = [os.path.basename(r["file"]) for r in eager]
    assert names == ["china.jpg", "flower.jpg", "grey.png", "rgba.png", "china.jpg", "flower.jpg"]
    for a, b in zip(eager, exported):
        assert len(a["topk"]) == 3 and [t["index"] for t in a["topk"]] == [t["index"] for t in b["topk"]]
        assert all(t["class"] == str(t["index"]) for t in a["topk"])  # the digits' names
        assert np.allclose([t["prob"] for t in a["topk"]], [t["prob"] for t in b["topk"]], atol=1e-4)
        probs = [t["prob"] for t in a["topk"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


@pytest.mark.slow
def test_predict_errors_are_one_line(weights_and_photos, tmp_path):
    weights, photos = weights_and_photos
    missing = run_script("predict.py", "-c", "configs/demo.yaml", "--weights", weights,
                         str(tmp_path / "nope.jpg"))
    assert_one_error(missing, "nope.jpg is not an image file, a folder or a pattern")
    text = run_script("predict.py", "-c", "configs/demo.yaml", "--weights", weights,
                      os.path.join(photos, "notes.txt"))
    assert_one_error(text, "1 of 1 images could not be read")
    assert "warning: skipped " in text.stderr and "notes.txt is not a PNG/JPEG/" in text.stderr
    no_export = run_script("predict.py", "-c", "configs/demo.yaml", "--model-dir", str(tmp_path),
                           photos)
    assert_one_error(no_export, "holds no exported model", "python export.py")


def _png_header(width, height):
    """A PNG that declares ``width`` x ``height`` pixels in a few dozen bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.slow
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
    proc = run_script("predict.py", *DEMO_CLI, "-o", f"train.output_dir={trained}", str(folder),
                      "--json", str(json_out), timeout=HANG_S,
                      env={"PATH": f"{fake_bin}:{os.environ['PATH']}"})
    assert_one_error(proc, "4 of 5 images could not be read", "the other 1 were predicted",
                     f"written to {json_out}")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 4 and all("\n" not in w for w in warnings)
    assert proc.stderr.count("declares more than 40,000,000 pixels") == 2
    assert [r["file"] for r in json.loads(json_out.read_text())] == [str(folder / "a_good.png")]
    assert not marker.exists()
    proc = run_script("predict.py", *DEMO_CLI, "-o", f"train.output_dir={trained}",
                      str(folder / "e_pipe.png"), timeout=HANG_S)
    assert_one_error(proc, "is not a regular file")


@pytest.mark.slow
def test_images_named_in_gbk_or_latin_1_are_predicted_and_written_as_json(trained, tmp_path):
    """File names unzipped from a Windows archive (GBK 好, Latin-1 é bytes, not UTF-8): each is
    read and predicted; the JSON gives each name back exactly (``\\udcXX`` escapes), the
    printed lines show it with the replacement character, instead of ending after the work."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in (b"\xba\xc3.png", b"caf\xe9.png"):
        png_file(Path(os.fsdecode(os.path.join(os.fsencode(str(folder)), name))), value=90)
    json_out = tmp_path / "p.json"
    proc = run_script("predict.py", *DEMO_CLI, "-o", f"train.output_dir={trained}", str(folder),
                      "--json", str(json_out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    files = sorted(os.fsencode(record["file"])
                   for record in json.loads(json_out.read_text(encoding="utf-8")))
    assert files == sorted(os.fsencode(str(folder)) + name for name in (b"/\xba\xc3.png",
                                                                       b"/caf\xe9.png"))
    assert f"{folder}/caf\ufffd.png: " in proc.stdout


@pytest.mark.slow
def test_prediction_checks_the_json_destination_before_the_work(trained, tmp_path):
    proc = run_script("predict.py", *DEMO_CLI, "-o", f"train.output_dir={trained}",
                      os.path.join(ROOT, "docs", "demo_predictions.png"),
                      "--json", str(tmp_path / "missing" / "p.json"))
    assert_one_error(proc, "--json", "does not exist")
    assert "demo_predictions.png:" not in proc.stdout


@pytest.mark.slow
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
    proc = run_script("predict.py", *DEMO_CLI, "--model-dir", str(export),
                      os.path.join(ROOT, "docs", "demo_predictions.png"))
    assert_one_error(proc, message)


@pytest.mark.slow
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
        proc = run_script("predict.py", *DEMO_CLI, "--model-dir", str(export),
                          os.path.join(ROOT, "docs", "demo_predictions.png"))
        assert_one_error(proc, "cannot be loaded", "run python export.py again")




@pytest.mark.slow
def test_predict_json_to_dev_stdout_is_refused_and_dash_means_standard_output(tmp_path):
    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict())
    photo = os.path.join(PHOTOS, "china.jpg")
    stdout_link = tmp_path / "stdout"
    stdout_link.symlink_to("/proc/self/fd/1")
    proc = run_script("predict.py", *DEMO_CLI, photo, "--weights", weights, "--json",
                      str(stdout_link))
    assert_one_error(proc, "--json", "is a symbolic link")
    proc = run_script("predict.py", *DEMO_CLI, photo, "--weights", weights, "--json", "-")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)[0]["file"] == photo and f"{photo}: " in proc.stderr


@pytest.mark.slow
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
    with pytest.raises(Interrupted, match=f"the 2 of 4 images done are in {target}$") as stop:
        predict.main([*DEMO_CLI, str(photos), "--weights", weights, "--json", str(target)])
    assert stop.value.exit_code == 130  # one "interrupted:" line, not "nothing was saved"
    done = json.loads(target.read_text())
    assert [os.path.basename(r["file"]) for r in done] == ["0.png", "1.png"]
    assert all(len(r["topk"]) == 5 for r in done)


@pytest.mark.slow
def test_export_py_into_a_folder_with_a_planted_link_is_one_line(tmp_path, victim):
    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict())
    out = tmp_path / "export"
    out.mkdir()
    (out / "preprocess.json").symlink_to(victim)
    proc = run_script("export.py", *DEMO_CLI, "--weights", weights, "--out", str(out))
    assert_one_error(proc, "preprocess.json is a symbolic link")
    assert victim.read_text() == "keep me\n"


@pytest.mark.slow
def test_an_export_that_fails_midway_leaves_the_one_there_whole(tmp_path, monkeypatch):
    """A full disk while the new export is written: the working export stays as it was
    (model and contract together) and no staging folder is left."""
    from models import inference

    paddle.seed(0)
    model = build_model(tiny_model_config())
    out = tmp_path / "export"
    export_model(model, 32, str(out), [str(i) for i in range(10)])
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def full_disk(path, record):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(inference, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_model(build_model(tiny_model_config()), 32, str(out), list("abcdefghij"))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    image = np.zeros((1, 3, 32, 32), np.float32)
    assert ExportedModel(str(out))(image).shape == (1, 10)


@pytest.mark.slow
def test_an_output_that_is_one_of_the_inputs_is_refused(weights_and_photos, tmp_path):
    """--json naming an image it reads (by a hard link too), or the weights: one error before
    the work, the file as it was."""
    weights, photos = weights_and_photos
    image = os.path.join(photos, "flower.jpg")
    before = open(image, "rb").read()
    link = tmp_path / "looks-new.json"
    os.link(image, link)
    for target in (image, str(link), weights):
        proc = run_script("predict.py", *DEMO_CLI, photos, "--weights", weights,
                          "--json", target)
        assert_one_error(proc, "--json", "which this command reads; write the output elsewhere")
    assert open(image, "rb").read() == before
    folder = tmp_path / "export"
    folder.mkdir()
    copy = folder / "model.safetensors"  # an export would replace or remove model.*
    copy.write_bytes(open(weights, "rb").read())
    proc = run_script("export.py", *DEMO_CLI, "--weights", str(copy), "--out", str(folder))
    assert_one_error(proc, "--out", "which this command reads")


@pytest.mark.slow
def test_export_with_its_standard_error_closed_exports(trained, tmp_path):
    """``export.py 2>&-``: descriptor 2 gets /dev/null, so neither the capture of Paddle's
    native lines fails nor does a file opened later take its number."""
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *DEMO_CLI,
                           "-o", f"train.output_dir={trained}", "--out", str(out)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=HANG_S,
                          preexec_fn=lambda: os.close(2))
    assert proc.returncode == 0 and f"exported to {out}" in proc.stdout
    image = np.zeros((1, 3, 32, 32), np.float32)
    assert ExportedModel(str(out))(image).shape == (1, 10)


def test_an_export_without_the_space_for_it_is_one_line_before_any_file(tmp_path, monkeypatch):
    from collections import namedtuple

    from models import inference

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(inference.shutil, "disk_usage", lambda path: usage(1, 1, 1000))
    out = tmp_path / "export"
    with pytest.raises(OSError, match=r"an export needs about [\d.]+ MB, 0.0 MB free"):
        export_model(build_model(tiny_model_config()), 32, str(out), list("abcdefghij"))
    assert os.listdir(out) == []


def test_chinese_class_names_are_written_as_characters(tmp_path):
    """preprocess.json (and every JSON this project writes) keeps 圆形 as 圆形, not \\u5706\\u5f62,
    and reads back the same."""
    out = tmp_path / "export"
    names = ["圆形", "方形"] + [str(i) for i in range(8)]
    export_model(build_model(tiny_model_config()), 32, str(out), names)
    text = (out / "preprocess.json").read_text(encoding="utf-8")
    assert '"圆形"' in text and "\\u5706" not in text
    assert ExportedModel(str(out)).contract["class_names"] == names
