"""predict.py on real photos (scikit-learn's sample JPEGs, in every PIL mode), export.py, and
the exported model through paddle.inference against the eager one."""

import json
import os

import numpy as np
import paddle
import pytest
import sklearn
from conftest import assert_one_error, run_script
from PIL import Image

from data.images import read_rgb
from data.preprocess import DevicePreprocess
from models.build import build_model
from models.inference import ExportedModel, export_model
from utils.config import load_config
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
