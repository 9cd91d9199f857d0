"""Your own images, read: class folders and list files of crops of scikit-learn's sample
photos in every mode a user's folder may hold, decoded as NumPy computes them, viewed as
PPIM's transform views them, batched the same with and without workers; list files and
class folders a careless or hostile user makes."""

import os
import unicodedata

import numpy as np
import pytest
from conftest import png_file
from photo_folders import CLASSES, careless_photo_folder, folder_data_cfg, photo_halves
from PIL import Image

from data.augment import eval_view, train_view
from data.dataset import run_splits
from data.folders import folder_split, label_names, list_split
from data.images import read_rgb
from data.loader import build_loader, set_epoch
from data.samples import ImageDataset
from training.config import load_config
from utils.errors import UserError
from utils.schema import Node

PLAIN = Node(crop_fraction=1.0, skip_bad_images=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder data set with what a careless user leaves in one: ``(root, expected)``."""
    return careless_photo_folder(str(tmp_path_factory.mktemp("photos")))



def test_a_folder_gives_sorted_classes_its_files_and_its_own_validation_split(photos, capsys):
    root, expected = photos
    train, val, test, names = run_splits(folder_data_cfg(root), 3, 0)
    assert names == CLASSES
    assert (len(train.labels), len(val.labels), len(test.labels)) == (36, 9, 12)
    for split, folder in ((train, "train"), (val, "val"), (test, "test")):
        paths = [split.images.relative_path(i) for i in range(len(split.labels))]
        assert paths == sorted(p[len(folder) + 1:] for p in expected if p.startswith(folder + "/"))
        assert [CLASSES[label] for label in split.labels] == [p.split("/")[0] for p in paths]
    assert "1 files that are not images passed over" in capsys.readouterr().out  # notes.txt
    with pytest.raises(UserError, match="own validation split .* data.val_split=5"):
        run_splits(folder_data_cfg(root, val_split=5), 3, 0)


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
    train, _, test, _ = run_splits(folder_data_cfg(root), 3, 0)
    for name, split, folder in (("train_list.txt", train, "train"), ("test_list.txt", test, "test")):
        with open(tmp_path / name, "w") as handle:
            for i, label in enumerate(split.labels):
                handle.write(f"{folder}/{split.images.relative_path(i)} {label}\n\n")
    (tmp_path / "labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(CLASSES)))
    cfg = folder_data_cfg(root, name="list", train_list=str(tmp_path / "train_list.txt"),
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

    photo = photo_halves()["flower"]  # 427 x 640
    for size, resize in ((384, 384), (224, 248)):  # PPIM's transforms_384 and transforms_224
        reference = T.Compose([T.Resize(resize, interpolation="bicubic"), T.CenterCrop(size)])
        want = np.asarray(reference(Image.fromarray(photo)))
        assert np.array_equal(eval_view(photo, size, size / resize), want), size


def test_without_a_random_resized_crop_training_takes_windows_of_the_resized_photo():
    photo = photo_halves()["temple_left"]  # 427 x 320: the shorter side is the width
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
    train, _, _, _ = run_splits(folder_data_cfg(root), 3, 0)
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


NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


@pytest.mark.parametrize("bad", ["٣", "³", "３"])
def test_only_the_digits_0_to_9_are_labels_and_indices(tmp_path, bad):
    png_file(tmp_path / "a.png")
    (tmp_path / "train.txt").write_text(f"a.png {bad}\n", encoding="utf-8")
    with pytest.raises(UserError, match="a label of the digits 0-9"):
        list_split(folder_data_cfg(tmp_path, name="list", train_list="train.txt"), "train_list", 5)
    (tmp_path / "names.txt").write_text(f"0 cat\n{bad} dog\n", encoding="utf-8")
    with pytest.raises(UserError, match="an index of the digits 0-9"):
        label_names(folder_data_cfg(tmp_path, label_names="names.txt"), 2)
    with pytest.raises(UserError, match="is not an index"):
        load_config("configs/demo.yaml", [f"stages.{bad}.epochs=1"])


def test_list_paths_that_leave_the_data_folder_are_refused(tmp_path):
    root = tmp_path / "data"
    png_file(tmp_path / "outside.png")
    png_file(root / "inside.png")
    for name in ("../outside.png", str(tmp_path / "outside.png"), "sub/../../outside.png"):
        (root / "train.txt").write_text(f"{name} 0\n")
        with pytest.raises(UserError, match="lies outside data.path"):
            list_split(folder_data_cfg(root, name="list", train_list="train.txt"), "train_list", 2)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    png_file(tmp_path / "a.png")
    (tmp_path / "train.txt").write_bytes("\ufeffa.png 1\n".encode("utf-8"))
    images, labels = list_split(folder_data_cfg(tmp_path, name="list", train_list="train.txt"),
                                "train_list", 2)
    assert list(labels) == [1]
    (tmp_path / "names.txt").write_bytes("\ufeff0 cat\n1 dog\n".encode("utf-8"))
    assert label_names(folder_data_cfg(tmp_path, label_names="names.txt"), 2) == ["cat", "dog"]


def test_repeated_class_names_name_the_real_problem(tmp_path):
    (tmp_path / "names.txt").write_text(f"0 {NFC}\n1 {NFD}\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives two classes one name.*Unicode normalisation"):
        label_names(folder_data_cfg(tmp_path, label_names="names.txt"), 2)
    (tmp_path / "names.txt").write_text("0 cat\n1 cat\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives two classes one name: 'cat' and 'cat'$"):
        label_names(folder_data_cfg(tmp_path, label_names="names.txt"), 2)
    (tmp_path / "names.txt").write_text("0 cat\n0 dog\n", encoding="utf-8")
    with pytest.raises(UserError, match="gives index 0 a second name"):
        label_names(folder_data_cfg(tmp_path, label_names="names.txt"), 2)


def test_class_folders_are_one_class_whatever_their_unicode_form(tmp_path):
    for split, name in (("train", NFC), ("test", NFD)):
        png_file(tmp_path / split / name / "1.png")
        png_file(tmp_path / split / "dog" / "1.png")
    train = folder_split(folder_data_cfg(tmp_path), "train", [NFC, "dog"])
    test = folder_split(folder_data_cfg(tmp_path), "test", [NFC, "dog"])
    assert list(train[1]) == list(test[1]) == [0, 1]
    png_file(tmp_path / "train" / NFD / "2.png")  # both forms in one split: ambiguous
    with pytest.raises(UserError, match="differ only in their Unicode normalisation"):
        run_splits(folder_data_cfg(tmp_path, val_split=0), 3, 0)


def test_a_class_folder_linked_to_another_is_refused(tmp_path):
    png_file(tmp_path / "train" / "cat" / "1.png")
    png_file(tmp_path / "test" / "cat" / "1.png")
    (tmp_path / "train" / "kitten").symlink_to(tmp_path / "train" / "cat")
    with pytest.raises(UserError, match="are the same folder .a symbolic link.: their images "
                                        "would be read under two labels"):
        run_splits(folder_data_cfg(tmp_path, val_split=0), 2, 0)


def test_folders_nested_past_the_bound_are_one_error(tmp_path):
    """A class folder (and a folder given to predict) nested far deeper than any data set:
    one error naming the depth, not a RecursionError."""
    from data.images import find_images

    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        png_file(root / split / "a" / "x.png")
    deep = root / "train" / "a"
    for _ in range(100):  # far past the bound (thousands recursed past Python's limit)
        deep = deep / "d"
    deep.mkdir(parents=True)
    png_file(deep / "y.png")
    with pytest.raises(UserError, match="more than 32 folders deep in the image folder"):
        folder_split(folder_data_cfg(str(root)), "train", ["a"])
    with pytest.raises(UserError, match="more than 32 folders deep in"):
        find_images([str(root)])


def test_prediction_lists_a_folder_as_training_does(tmp_path):
    """One listing of image folders: hidden files and folders passed over (a notebook's
    checkpoint copies), links followed once, non-images and pipes left out."""
    from data.images import find_images, image_files

    root = tmp_path / "photos"
    for name in ("b/x.png", "a/y.png", ".ipynb_checkpoints/y-checkpoint.png", "a/._y.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        png_file(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    os.mkfifo(root / "a" / "pipe.png")
    os.symlink(root, root / "a" / "up")  # a link up the tree: read once
    os.symlink(root / "b", root / "c")  # a second way into b: not read twice
    ignored = [0]
    assert image_files(str(root), "photos", ignored) == ["photos/a/y.png", "photos/b/x.png"]
    assert ignored == [1]
    assert find_images([str(root)]) == [str(root / "a" / "y.png"), str(root / "b" / "x.png")]
