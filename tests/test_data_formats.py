"""The data-format registry (data/formats/): what every format declares, and the npz format,
added as one module, read against scikit-learn's digits saved with NumPy."""

import os

import numpy as np
import pytest
from conftest import DEMO_CLI, assert_one_error, run_script
from sklearn.datasets import load_digits as sklearn_digits

from data.dataset import class_names, data_identity, files_read, run_splits, validation_source
from data.formats import FORMATS
from training.config import load_config
from utils.errors import UserError


def _npz_config(path, *extra):
    return load_config("configs/demo.yaml", ["data.name=npz", f"data.path={path}",
                                             "data.val_split=0", *extra])


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
    """scikit-learn's 8x8 digits (grey, 0-16) as uint8 grey images in train/test .npz files,
    the first 1,500 for training, with the class names."""
    folder = tmp_path_factory.mktemp("npz")
    digits = sklearn_digits()
    images = (digits.images * 255 / 16).round().astype(np.uint8)
    labels = digits.target.astype(np.int32)
    np.savez(folder / "train.npz", images=images[:1500], labels=labels[:1500],
             class_names=np.array([f"digit {i}" for i in range(10)]))
    np.savez(folder / "test.npz", images=images[1500:], labels=labels[1500:])
    return folder, images, labels


def test_every_format_declares_how_it_reads_lists_and_names_its_data():
    assert {"cifar100", "cifar10", "digits", "folder", "list", "npz"} <= set(FORMATS)
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.reads.startswith(("data.name=", "download "))
        assert callable(fmt.read_split) and callable(fmt.files) and callable(fmt.class_names)


def test_npz_splits_are_the_arrays_saved_grey_made_rgb(digits_npz):
    folder, images, labels = digits_npz
    cfg = _npz_config(folder)
    train, val, test, names = run_splits(cfg.data, 10, 0)
    assert val is test and validation_source(cfg.data) == "test"  # no val.npz
    assert names == [f"digit {i}" for i in range(10)] == class_names(cfg.data, 10)
    got = np.stack([train.images.read(i) for i in range(len(train.labels))])
    assert got.shape == (1500, 8, 8, 3) and got.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], images[:1500])
    np.testing.assert_array_equal(train.labels, labels[:1500])
    assert train.labels.dtype == np.int64 and len(test.labels) == len(labels) - 1500


def test_npz_files_are_fingerprinted_and_a_val_file_is_the_validation_split(digits_npz, tmp_path):
    folder, images, labels = digits_npz
    cfg = _npz_config(folder)
    assert [name for name, _ in files_read(cfg.data, 10)] == ["train.npz", "test.npz"]
    before = data_identity(cfg.data, 10)
    own = tmp_path / "own"
    own.mkdir()
    for name in ("train.npz", "test.npz"):
        os.link(folder / name, own / name)
    np.savez(own / "val.npz", images=images[:7], labels=labels[:7])
    cfg = _npz_config(own)
    assert validation_source(cfg.data) == "own"
    assert len(run_splits(cfg.data, 10, 0)[1].labels) == 7
    assert data_identity(cfg.data, 10) != before


@pytest.mark.parametrize("arrays, fragment", [
    ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": np.zeros(2, np.int64)},
     "'images' is float32 [2, 4, 4, 3]; it must be uint8"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)},
     "'labels' is int64 [3]; it must be integers [2]"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "has no 'labels' array"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([{"a": 1}, 2])},
     "is not a NumPy .npz archive of plain arrays"),
])
def test_a_bad_npz_is_one_error_that_says_what_it_must_hold(tmp_path, arrays, fragment):
    np.savez(tmp_path / "train.npz", **arrays)
    np.savez(tmp_path / "test.npz", images=np.zeros((1, 4, 4, 3), np.uint8), labels=[0])
    with pytest.raises(UserError) as caught:
        run_splits(_npz_config(tmp_path).data, 10, 0)
    assert fragment in str(caught.value)


@pytest.mark.slow
def test_npz_without_a_path_or_its_files_is_one_line_naming_the_layout(tmp_path):
    with pytest.raises(UserError, match="config key 'data.path' is missing: data.name=npz"):
        load_config("configs/demo.yaml", ["data.name=npz"])
    (tmp_path / "train.npz").write_bytes(b"not a zip")
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=npz", "-o",
                      f"data.path={tmp_path}", "-o", f"train.output_dir={tmp_path / 'out'}")
    assert_one_error(proc, f"{tmp_path / 'train.npz'} is not a NumPy .npz archive")
