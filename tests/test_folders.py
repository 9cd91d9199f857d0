"""Your own images: class folders and list files of crops of scikit-learn's sample photos,
written here in every mode a user's folder may hold, read, viewed, trained on end to end, and
every error path."""

import json
import os

import numpy as np
import pytest
from conftest import (
    assert_one_error,
    assert_same_run,
    final_tests,
    read_records,
    run_script,
    stop_at_evaluation,
)
from PIL import Image

from data.augment import eval_view, train_view
from data.dataset import run_splits
from data.samples import ImageDataset
from data.images import read_rgb
from data.loader import build_loader, set_epoch
from training.run import fit
from utils.config import Node, load_config
from utils.errors import UserError
from utils.io.tensor_io import class_names_of

CLASSES = ["flower", "temple_left", "temple_right"]
COUNTS = {"train": 12, "val": 3, "test": 4}
# How each image is stored, in turn: what a folder of downloaded photos holds.
FORMATS = ("rgb.jpg", "grey.png", "rgba.png", "palette.png", "wide16.png", "cmyk.tif",
           "rotated.jpg", "rgb.bmp", "rgb.webp", "palette.gif")
PLAIN = Node(crop_fraction=1.0, skip_bad_images=False)


def _halves():
    from sklearn.datasets import load_sample_images

    temple, flower = load_sample_images().images
    middle = temple.shape[1] // 2
    return {"flower": flower, "temple_left": temple[:, :middle], "temple_right": temple[:, middle:]}


def _write(path, crop, kind):
    """Save ``crop`` (uint8 RGB) as ``kind``; return the uint8 RGB array a reader should give,
    computed here in NumPy (None for lossy formats, compared with a tolerance elsewhere)."""
    image = Image.fromarray(crop)
    if kind == "grey.png":
        grey = crop[..., 1]
        Image.fromarray(grey).save(path)
        return np.repeat(grey[..., None], 3, -1)
    if kind == "rgba.png":
        alpha = np.full(crop.shape[:2], 7, np.uint8)  # nearly transparent: alpha is dropped
        Image.fromarray(np.dstack([crop, alpha])).save(path)
        return crop
    if kind in ("palette.png", "palette.gif"):
        palette = image.quantize(16)
        palette.info["transparency"] = 0
        palette.save(path, transparency=0)
        table = np.array(palette.getpalette()[:48], np.uint8).reshape(16, 3)
        return table[np.asarray(palette)]
    if kind == "wide16.png":
        wide = crop[..., 0].astype(np.uint16) * 257 + crop[..., 2]  # 16 significant bits
        Image.fromarray(wide).save(path)
        return np.repeat(np.round(wide / 65535 * 255).astype(np.uint8)[..., None], 3, -1)
    if kind == "cmyk.tif":
        cmyk = np.dstack([255 - crop, np.zeros(crop.shape[:2], np.uint8)])
        Image.fromarray(cmyk, "CMYK").save(path)
        return crop
    if kind == "rotated.jpg":  # stored on its side, EXIF orientation 6: shown turned clockwise
        exif = image.getexif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(crop, 1))).save(path, exif=exif.tobytes(),
                                                                      quality=95)
        return None
    if kind.endswith(".jpg"):
        image.save(path, quality=95)
        return None
    image.save(path, **({"lossless": True} if kind.endswith(".webp") else {}))
    return crop


def write_photo_folder(root, counts=COUNTS, seed=0):
    """``root/<split>/<class>/<n>-<kind>`` crops of random size and shape, every format in
    turn; returns {relative path: expected RGB or None}."""
    rng, halves, expected, number = np.random.default_rng(seed), _halves(), {}, 0
    for split, count in counts.items():
        for name in CLASSES:
            os.makedirs(os.path.join(root, split, name))
            half = halves[name]
            for _ in range(count):
                height, width = int(rng.integers(40, 200)), int(rng.integers(40, 200))
                top = int(rng.integers(0, half.shape[0] - height))
                left = int(rng.integers(0, half.shape[1] - width))
                kind = FORMATS[number % len(FORMATS)]
                relative = f"{split}/{name}/{number:03d}-{kind}"
                crop = np.ascontiguousarray(half[top:top + height, left:left + width])
                expected[relative] = (_write(os.path.join(root, relative), crop, kind), crop)
                number += 1
    return expected


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder data set, plus what a careless user leaves in one: a notebook's checkpoint
    folder, macOS metadata, notes, a pipe with an image name."""
    root = str(tmp_path_factory.mktemp("photos"))
    expected = write_photo_folder(root)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    with open(os.path.join(root, "train", "flower", "._000-rgb.jpg"), "wb") as handle:
        handle.write(b"\x00\x05\x16\x07 AppleDouble")
    with open(os.path.join(root, "train", "flower", "notes.txt"), "w") as handle:
        handle.write("where these came from")
    os.mkfifo(os.path.join(root, "train", "temple_left", "blocked.png"))
    os.symlink("..", os.path.join(root, "train", "temple_right", "loop"))  # back up the tree
    return root, expected


def _data_cfg(root, **fields):
    base = load_config("configs/demo_folder.yaml", [f"data.path={root}"]).data
    return Node(base, **fields)


def test_a_folder_gives_sorted_classes_its_files_and_its_own_validation_split(photos, capsys):
    root, expected = photos
    train, val, test, names = run_splits(_data_cfg(root), 3, 0)
    assert names == CLASSES
    assert (len(train.labels), len(val.labels), len(test.labels)) == (36, 9, 12)
    for split, folder in ((train, "train"), (val, "val"), (test, "test")):
        paths = [split.images.relative_path(i) for i in range(len(split.labels))]
        assert paths == sorted(p[len(folder) + 1:] for p in expected if p.startswith(folder + "/"))
        assert [CLASSES[label] for label in split.labels] == [p.split("/")[0] for p in paths]
    assert "1 files that are not images passed over" in capsys.readouterr().out  # notes.txt
    with pytest.raises(UserError, match="own validation split .* data.val_split=5"):
        run_splits(_data_cfg(root, val_split=5), 3, 0)


def test_every_mode_decodes_to_8_bit_rgb_as_numpy_computes_it(photos):
    root, expected = photos
    for relative, (want, crop) in expected.items():
        got = read_rgb(os.path.join(root, relative))
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, relative
        if want is not None:
            tolerance = 1 if relative.endswith("cmyk.tif") else 0
            assert np.abs(got.astype(int) - want).max() <= tolerance, relative
        else:  # JPEG, one of them stored on its side: upright, the crop up to JPEG's loss
            assert got.shape == crop.shape and np.abs(got.astype(int) - crop).mean() < 6, relative


def test_list_files_name_the_same_samples_as_the_folders(photos, tmp_path):
    root, _ = photos
    train, _, test, _ = run_splits(_data_cfg(root), 3, 0)
    for name, split, folder in (("train_list.txt", train, "train"), ("test_list.txt", test, "test")):
        with open(tmp_path / name, "w") as handle:
            for i, label in enumerate(split.labels):
                handle.write(f"{folder}/{split.images.relative_path(i)} {label}\n\n")
    (tmp_path / "labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CLASSES)))
    cfg = _data_cfg(root, name="list", train_list=str(tmp_path / "train_list.txt"),
                    test_list=str(tmp_path / "test_list.txt"),
                    label_names=str(tmp_path / "labels.txt"))
    listed_train, listed_val, listed_test, names = run_splits(cfg, 3, 0)
    assert names == CLASSES and listed_val is listed_test  # no val_list: the test split
    for mine, theirs in ((listed_train, train), (listed_test, test)):
        assert np.array_equal(mine.labels, theirs.labels)
        for i in (0, len(mine.labels) - 1):
            assert np.array_equal(mine.images.read(i), theirs.images.read(i))


def test_the_evaluation_view_is_ppim_deit_s_transform():
    from paddle.vision import transforms as T

    photo = _halves()["flower"]  # 427 x 640
    for size, resize in ((384, 384), (224, 248)):  # PPIM's transforms_384 and transforms_224
        reference = T.Compose([T.Resize(resize, interpolation="bicubic"), T.CenterCrop(size)])
        want = np.asarray(reference(Image.fromarray(photo)))
        assert np.array_equal(eval_view(photo, size, size / resize), want), size


def test_without_a_random_resized_crop_training_takes_windows_of_the_resized_photo():
    photo = _halves()["temple_left"]  # 427 x 320: the shorter side is the width
    side = 64
    resized = np.asarray(Image.fromarray(photo).resize((64, 85), Image.BICUBIC))  # int(427 / 5)
    views = [train_view(photo, np.random.default_rng((1, 0, i)), side) for i in range(8)]
    tops = []
    for view in views:
        assert view.shape == (side, side, 3) and view.dtype == np.uint8
        tops += [top for top in range(85 - side + 1)
                 if np.array_equal(view, resized[top:top + side])]
    assert len(tops) == 8 and len(set(tops)) > 1  # each a window; the window moves
    assert np.array_equal(train_view(photo, np.random.default_rng((1, 0, 3)), side), views[3])
    flipped = train_view(photo, np.random.default_rng((1, 0, 3)), side, hflip_prob=1.0)
    assert np.array_equal(flipped, views[3][:, ::-1])  # the same draw, then mirrored


def test_file_batches_are_the_same_with_or_without_workers(photos):
    root, _ = photos
    train, _, _, _ = run_splits(_data_cfg(root), 3, 0)
    augment = {"crop": {"scale": [0.35, 1.0], "ratio": [0.75, 1.33]}, "hflip_prob": 0.5,
               "rotation": 10.0}
    batches = []
    for workers in (0, 2):
        loader = build_loader(ImageDataset(train, 32, PLAIN, seed=5, augment=augment), 8,
                              workers, train=True)
        set_epoch(loader, 1)
        batches.append([(x.numpy(), y.numpy()) for x, y in loader])
    assert len(batches[0]) == 36 // 8
    for (a, la), (b, lb) in zip(*batches):
        assert a.shape == (8, 32, 32, 3) and np.array_equal(a, b) and np.array_equal(la, lb)


def test_a_million_file_names_cost_bytes_not_objects(tmp_path):
    from data.sources import FileImages

    names = [f"class_{i % 7}/{i:07d}.jpg" for i in range(200_000)]
    files = FileImages(str(tmp_path), names)
    assert files.blob.nbytes == sum(len(n) for n in names)
    part = files.take(np.arange(10, 200_000, 3))
    assert np.shares_memory(part.blob, files.blob) and part.relative_path(1) == names[13]


def _cfg(root, out, *extra):
    return load_config("configs/demo_folder.yaml", [
        f"data.path={root}", f"train.output_dir={out}", "train.progress=off", "stages.0.epochs=3",
        "data.num_workers=0", "model.num_classes=3", *extra])


def test_a_folder_run_trains_tests_and_predicts_without_the_data(photos, tmp_path):
    root, _ = photos
    out = str(tmp_path / "run")
    args = ["-c", "configs/demo_folder.yaml", "-o", f"data.path={root}", "-o",
            f"train.output_dir={out}", "-o", "train.progress=off", "-o", "model.num_classes=3"]
    proc = run_script("main.py", *args, "-o", "stages.0.epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host -> device: uint8 32x32x3 = 3,072 bytes per image, decoded from files by 2 " \
           "loader workers" in proc.stdout
    assert "9 of the data's own for validation" in proc.stdout
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        best = json.load(handle)
    assert best["class_names"] == CLASSES and best["selected_on"] == "val"
    for name in ("best.safetensors", "last/raw.safetensors", "last/ema.safetensors"):
        assert class_names_of(os.path.join(out, name)) == CLASSES, name
    tests = final_tests(out)
    assert tests["best"]["num_samples"] == 12
    proc = run_script("val.py", *args)
    assert proc.returncode == 0 and f"top1={tests['best']['test_top1']:.4f}" in proc.stdout
    proc = run_script("val.py", *args, "--split", "val")
    assert proc.returncode == 0 and "n=9" in proc.stdout
    # Without the data: the class names come with the weights.
    image = os.path.join(str(tmp_path), "query.png")
    Image.fromarray(_halves()["flower"][100:300, 100:300]).save(image)
    missing = ["-o", f"data.path={tmp_path / 'gone'}"]
    proc = run_script("predict.py", *args, *missing, image, "--topk", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranked = proc.stdout.strip().splitlines()[-1].split(": ", 1)[1].split(", ")
    assert sorted(entry.rsplit(" ", 1)[0] for entry in ranked) == CLASSES
    proc = run_script("export.py", *args, *missing)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(out, "inference", "preprocess.json"), encoding="utf-8") as handle:
        contract = json.load(handle)
    assert contract["class_names"] == CLASSES and contract["crop_fraction"] == 1.0


def _break(path):
    with open(path, "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 this is not a JPEG")


def _linked_copy(photos, folder):
    """The train and test images of ``photos`` linked into ``folder`` (no val/)."""
    root, expected = photos
    for relative in expected:
        if not relative.startswith("val/"):
            os.makedirs(folder / os.path.dirname(relative), exist_ok=True)
            os.symlink(os.path.join(root, relative), folder / relative)
    return folder


def test_an_unreadable_image_stops_the_run_naming_it_even_from_a_worker(photos, tmp_path):
    bad = _linked_copy(photos, tmp_path / "bad")
    _break(bad / "train" / "flower" / "zz-broken.jpg")
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", f"data.path={bad}",
                      "-o", f"train.output_dir={tmp_path / 'out'}", "-o", "train.progress=off",
                      "-o", "model.num_classes=3")
    assert_one_error(proc, "zz-broken.jpg", "cannot be decoded", "data.skip_bad_images=true")


def test_skipped_bad_images_are_warned_once_counted_and_left_out(photos, tmp_path, capfd):
    bad = _linked_copy(photos, tmp_path / "bad")
    _break(bad / "train" / "flower" / "zz-broken.jpg")
    _break(bad / "test" / "temple_left" / "zz-broken.png")
    out = str(tmp_path / "out")
    fit(_cfg(str(bad), out, "data.skip_bad_images=true", "stages.0.epochs=2",
             "data.num_workers=2", "data.batch_size=37"))  # every training image, each epoch
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and all("zz-broken" in w for w in warnings)  # once per file
    replaced = [line for line in captured.out.splitlines() if "replaced by the next readable" in line]
    assert len(replaced) == 2 and all(line.startswith("warning: 1 unreadable") for line in replaced)
    assert final_tests(out)["best"]["num_samples"] == 12  # 13 files, one left out
    assert "warning: test (best): 1 unreadable images left out" in captured.out


@pytest.mark.parametrize("damage,fragments", [
    (lambda r: os.makedirs(r / "train" / "empty_class" / "nested"),
     ["class folders with no images", "empty_class"]),
    (lambda r: os.makedirs(r / "test" / "stranger"), ["class folders that", "stranger"]),
    (lambda r: os.rename(r / "test", r / "testing"), ["has no test/ folder"]),
])
def test_a_broken_folder_layout_is_one_error(tmp_path, damage, fragments):
    root = tmp_path / "data"
    write_photo_folder(str(root), {"train": 1, "test": 1})
    damage(root)
    with pytest.raises(UserError) as info:
        run_splits(_data_cfg(str(root)), 3, 0)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_class_count_other_than_the_model_s_is_one_error(photos):
    with pytest.raises(UserError, match="has 3 class folders .* model.num_classes=4; set "
                                        "model.num_classes=3"):
        run_splits(_data_cfg(photos[0]), 4, 0)


@pytest.mark.parametrize("line,fragment", [
    ("train/flower/nothing.jpg 0", "line 2 names train/flower/nothing.jpg, which is not a file"),
    ("train/flower/notes.txt 0", "has no image extension"),
    ("train/flower/000-rgb.jpg 3", "line 2 has label 3, outside [0, 3)"),
    ("train/flower/000-rgb.jpg flower", "does not read 'relative/path label'"),
])
def test_a_bad_list_line_is_one_error_naming_file_and_line(photos, tmp_path, line, fragment):
    root, _ = photos
    listing = tmp_path / "train.txt"
    listing.write_text(f"train/flower/000-rgb.jpg 0\n{line}\n")
    cfg = _data_cfg(root, name="list", train_list=str(listing), test_list=str(listing))
    with pytest.raises(UserError, match="train.txt") as info:
        run_splits(cfg, 3, 0)
    assert fragment in str(info.value)


def test_missing_list_or_label_files_are_one_error_each(photos, tmp_path):
    root, _ = photos
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", "data.name=list",
                      "-o", f"data.path={root}", "-o", f"train.output_dir={tmp_path}")
    assert_one_error(proc, "data.train_list", "train_list.txt does not exist")
    listing = tmp_path / "train.txt"
    listing.write_text("train/flower/000-rgb.jpg 0\n")
    (tmp_path / "labels.txt").write_text("0 flower\n1 temple\n")
    cfg = _data_cfg(root, name="list", train_list=str(listing), test_list=str(listing),
                    label_names=str(tmp_path / "labels.txt"))
    with pytest.raises(UserError, match="model.num_classes=3 needs each of 0..2 once"):
        run_splits(cfg, 3, 0)
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", "data.path=null",
                      "--dry-run")
    assert_one_error(proc, "'data.path' is missing", "data.name=folder")


def test_a_folder_run_stopped_midway_resumes_to_the_same_records(photos, tmp_path, monkeypatch):
    root, _ = photos
    whole = str(tmp_path / "whole")
    fit(_cfg(root, whole))
    stopped = _cfg(root, str(tmp_path / "stopped"), "data.num_workers=2")
    # Evaluations: raw and EMA per epoch; call 3 is epoch 2's raw weights.
    assert stop_at_evaluation(stopped, 3, monkeypatch)["evaluating"]
    fit(stopped, resume=True)
    assert_same_run(whole, stopped.train.output_dir, 3, ("raw", "ema"))


def test_preflight_and_the_gpu_recipe_s_data_settings_run_on_a_folder(photos, tmp_path):
    root, _ = photos
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", f"data.path={root}",
                      "-o", "model.num_classes=3", "-o", "data.batch_size=8", "--preflight",
                      "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["host_bytes_per_image"] == 32 * 32 * 3 and report["num_workers"] == 2
    assert report["loader_images_per_s"] > 0
    # The GPU recipe for folders, its model swapped for the tiny one: its crops, its
    # evaluation view and its stages run on the photos.
    tiny = ["model.name=DistilledVisionTransformer", "model.pretrained=false",
            "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}",
            "data.image_size=32", "model.num_classes=3", "train.amp=off", f"data.path={root}",
            f"train.output_dir={tmp_path / 'recipe'}", "train.progress=off",
            "train.ema.enabled=false", "stages.0.epochs=1", "stages.1.epochs=1",
            "data.num_workers=0"]
    fit(load_config("configs/rdrop_deit_b_384_folder.yaml", tiny))
    assert [r["stage"] for r in read_records(str(tmp_path / "recipe"))] == [0, 1]
    assert final_tests(str(tmp_path / "recipe"))["best"]["num_samples"] == 12


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_while_preparing_an_image_ends_the_run_in_one_line(photos, tmp_path,
                                                                        monkeypatch, workers):
    """Any exception in a sample (here a MemoryError from the decoder), not only an unreadable
    file: with num_workers 0 Paddle's loader used to wait for it forever."""
    import data.sources as sources

    root, _ = photos
    real = sources.read_rgb

    def runs_out(path):
        if path.endswith("001-grey.png"):
            raise MemoryError("decoding needs more memory than there is")
        return real(path)

    monkeypatch.setattr(sources, "read_rgb", runs_out)
    with pytest.raises(UserError, match="001-grey.png could not be prepared .MemoryError: "
                                        "decoding needs more memory"):
        fit(_cfg(root, str(tmp_path), f"data.num_workers={workers}"))


def test_a_loader_worker_killed_by_the_system_ends_the_run_in_one_line(photos, tmp_path,
                                                                       monkeypatch):
    """The out-of-memory killer takes a worker: one line, not Paddle's SystemError."""
    import signal

    import data.sources as sources

    root, _ = photos
    real, main_pid = sources.read_rgb, os.getpid()

    def killed(path):
        if os.getpid() != main_pid and path.endswith("002-rgba.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    monkeypatch.setattr(sources, "read_rgb", killed)
    with pytest.raises(UserError, match="a data loader worker died"):
        fit(_cfg(root, str(tmp_path), "data.num_workers=2"))
