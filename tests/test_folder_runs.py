"""Your own images, trained on: a folder run end to end to predictions without the data,
stopped and resumed, bad images stopping the run or skipped, and every layout error."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import (
    assert_one_error,
    assert_same_run,
    final_tests,
    png_file,
    read_records,
    run_script,
    stop_at_evaluation,
)
from photo_folders import (
    CLASSES,
    careless_photo_folder,
    folder_data_cfg,
    photo_halves,
    write_photo_folder,
)
from PIL import Image

from data.dataset import run_splits
from main import train
from training.config import load_config
from utils.errors import UserError
from utils.io.tensor_io import class_names_of


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder data set with what a careless user leaves in one: ``(root, expected)``."""
    return careless_photo_folder(str(tmp_path_factory.mktemp("photos")))


def _cfg(root, out, *extra):
    return load_config("configs/demo_folder.yaml", [
        f"data.path={root}", f"train.output_dir={out}", "train.progress=off", "stages.0.epochs=3",
        "data.num_workers=0", "model.num_classes=3", *extra])


@pytest.mark.slow
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
    # Three classes are all in any top five: no top-5 is said or recorded.
    assert best["test_top5"] is None and "top5" not in proc.stdout
    for name in ("best.safetensors", "last/raw.safetensors", "last/ema.safetensors"):
        assert class_names_of(os.path.join(out, name)) == CLASSES, name
    tests = final_tests(out)
    assert tests["best"]["num_samples"] == 12
    proc = run_script("val.py", *args)
    assert proc.returncode == 0 and f"top1={tests['best']['test_top1']:.4f}" in proc.stdout
    assert f"top1={tests['best']['test_top1']:.4f} loss=" in proc.stdout
    proc = run_script("val.py", *args, "--split", "val")
    assert proc.returncode == 0 and "n=9" in proc.stdout
    # Without the data: the class names come with the weights.
    image = os.path.join(str(tmp_path), "query.png")
    Image.fromarray(photo_halves()["flower"][100:300, 100:300]).save(image)
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
    assert contract["weights"] == os.path.join(os.path.abspath(out), "best.safetensors")


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


@pytest.mark.slow
def test_an_unreadable_image_stops_the_run_naming_it_even_from_a_worker(photos, tmp_path):
    bad = _linked_copy(photos, tmp_path / "bad")
    _break(bad / "train" / "flower" / "zz-broken.jpg")
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", f"data.path={bad}",
                      "-o", f"train.output_dir={tmp_path / 'out'}", "-o", "train.progress=off",
                      "-o", "model.num_classes=3")
    assert_one_error(proc, "zz-broken.jpg", "cannot be decoded", "data.skip_bad_images=true")


@pytest.mark.slow
def test_skipped_bad_images_are_warned_once_counted_and_left_out(photos, tmp_path, capfd):
    bad = _linked_copy(photos, tmp_path / "bad")
    _break(bad / "train" / "flower" / "zz-broken.jpg")
    _break(bad / "test" / "temple_left" / "zz-broken.png")
    out = str(tmp_path / "out")
    train(_cfg(str(bad), out, "data.skip_bad_images=true", "stages.0.epochs=2",
             "data.num_workers=2", "data.batch_size=37"))  # every training image, each epoch
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and all("zz-broken" in w for w in warnings)  # once per file
    replaced = [line for line in captured.out.splitlines() if "replaced by the next readable" in line]
    assert len(replaced) == 2 and all(line.startswith("warning: 1 unreadable") for line in replaced)
    assert final_tests(out)["best"]["num_samples"] == 12  # 13 files, one left out
    # The loader leaves it out of each pass over the 13 test files: the final test's two.
    assert captured.out.count("warning: 1 unreadable images left out of this pass over 13 "
                              "images") >= 2


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
        run_splits(folder_data_cfg(str(root)), 3, 0)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_class_count_other_than_the_model_s_is_one_error(photos):
    with pytest.raises(UserError, match="has 3 class folders .* model.num_classes=4; set "
                                        "model.num_classes=3"):
        run_splits(folder_data_cfg(photos[0]), 4, 0)


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
    cfg = folder_data_cfg(root, name="list", train_list=str(listing), test_list=str(listing))
    with pytest.raises(UserError, match="train.txt") as info:
        run_splits(cfg, 3, 0)
    assert fragment in str(info.value)


@pytest.mark.slow
def test_missing_list_or_label_files_are_one_error_each(photos, tmp_path):
    root, _ = photos
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", "data.name=list",
                      "-o", f"data.path={root}", "-o", f"train.output_dir={tmp_path}")
    assert_one_error(proc, "data.train_list", "train_list.txt does not exist")
    listing = tmp_path / "train.txt"
    listing.write_text("train/flower/000-rgb.jpg 0\n")
    (tmp_path / "labels.txt").write_text("0 flower\n1 temple\n")
    cfg = folder_data_cfg(root, name="list", train_list=str(listing), test_list=str(listing),
                    label_names=str(tmp_path / "labels.txt"))
    with pytest.raises(UserError, match="model.num_classes=3 needs each of 0..2 once"):
        run_splits(cfg, 3, 0)
    proc = run_script("main.py", "-c", "configs/demo_folder.yaml", "-o", "data.path=null",
                      "--dry-run")
    assert_one_error(proc, "'data.path' is missing", "data.name=folder")


@pytest.mark.slow
def test_a_folder_run_stopped_midway_resumes_to_the_same_records(photos, tmp_path, monkeypatch):
    root, _ = photos
    whole = str(tmp_path / "whole")
    train(_cfg(root, whole))
    stopped = _cfg(root, str(tmp_path / "stopped"), "data.num_workers=2")
    # Evaluations: raw and EMA per epoch; call 3 is epoch 2's raw weights.
    assert stop_at_evaluation(stopped, 3, monkeypatch)["evaluating"]
    train(stopped, resume=True)
    assert_same_run(whole, stopped.train.output_dir, 3, ("raw", "ema"))


@pytest.mark.slow
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
    train(load_config("configs/rdrop_deit_b_384_folder.yaml", tiny))
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
        train(_cfg(root, str(tmp_path), f"data.num_workers={workers}"))


@pytest.mark.slow
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
        train(_cfg(root, str(tmp_path), "data.num_workers=2"))


@pytest.mark.slow
def test_the_plan_reads_a_folder_data_set_and_refuses_what_a_run_refuses(photos, tmp_path):
    """--dry-run on folder data that is there counts its images (the split a run reads); a
    data.val_split that leaves nothing to train on is the run's one error line."""
    root, _ = photos
    cfg = _cfg(root, str(tmp_path / "run"))
    train_split, val_split, test_split, _ = run_splits(cfg.data, 3, cfg.train.seed)
    from planning.plan import plan

    cost = plan(cfg)
    assert cost["test_images"] == len(test_split.labels) > 0
    assert cost["total_images"] == cost["stages"][0]["images"] > 0
    args = ["-c", "configs/demo_folder.yaml", "-o", f"data.path={root}", "-o",
            "model.num_classes=3", "-o", "data.val_split=100000", "--dry-run"]
    proc = run_script("main.py", *args)
    assert_one_error(proc, "data.val_split=100000 leaves no training image")


@pytest.mark.slow
def test_a_finished_run_whose_data_changed_is_not_called_complete(tmp_path):
    """The same command after the data the run read changed (an image rewritten, in a split
    folder that is a symbolic link, as the reader follows it): one error saying so, not
    "complete" with the old test numbers. Files the reader passes over (a notebook's
    checkpoints, macOS's ._ files, a README) change nothing; image names in GBK and Latin-1
    bytes (unzipped from a Windows archive), and a data folder so named, are read and
    fingerprinted as they are."""
    root = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"data-\xd1\xf9\xb1\xbe"))
    write_photo_folder(root)
    os.rename(os.path.join(root, "test"), str(tmp_path / "test_elsewhere"))
    os.symlink(str(tmp_path / "test_elsewhere"), os.path.join(root, "test"))
    flowers = os.path.join(root, "train", "flower")
    for prefix, name in zip((b"\xba\xc3-", b"caf\xe9-"), sorted(os.listdir(flowers))):
        os.rename(os.path.join(flowers, name),
                  os.path.join(flowers, os.fsdecode(prefix + os.fsencode(name))))
    out = str(tmp_path / "run")
    args = ["-c", "configs/demo_folder.yaml", "-o", f"data.path={root}", "-o",
            f"train.output_dir={out}", "-o", "model.num_classes=3", "-o", "stages.0.epochs=1",
            "-o", "train.progress=off"]
    first = run_script("main.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_script("main.py", *args)
    assert again.returncode == 0 and "is complete with this config" in again.stdout
    os.makedirs(os.path.join(flowers, ".ipynb_checkpoints"))
    png_file(Path(flowers) / ".ipynb_checkpoints" / "a-checkpoint.png")
    png_file(Path(flowers) / "._000-rgb.png")
    with open(os.path.join(root, "train", "flower", "README.txt"), "w") as handle:
        handle.write("photos of flowers\n")
    skipped = run_script("main.py", *args)
    assert skipped.returncode == 0 and "is complete with this config" in skipped.stdout, \
        skipped.stderr[-2000:]
    image = next(os.path.join(folder, name) for folder, _, names in
                 os.walk(os.path.join(root, "test")) for name in names if name.endswith(".png"))
    Image.fromarray(photo_halves()["flower"][:40, :40]).save(image)
    assert_one_error(run_script("main.py", *args), f"the run in {out} finished on other data",
                     "--overwrite")
    # Data the reader could no longer read is not the data the run read either.
    for name in os.listdir(os.path.join(root, "test")):
        shutil.rmtree(os.path.join(root, "test", name))
    assert_one_error(run_script("main.py", *args), f"the run in {out} finished on other data",
                     "test has no class folders")
