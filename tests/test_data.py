"""The CIFAR-100 reader against Paddle's own Cifar100, the digits demo data and the loaders."""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cifar_batch, write_cifar_archive

from data import cifar
from data.cifar import CIFARS, cifar_class_names, load_cifar, locate_cifar
from data.dataset import Split, eval_loader, subset_indices
from data.samples import ImageDataset
from data.digits import load_digits
from data.loader import build_loader, set_epoch
from data.sources import as_source
from utils.config import Node
from utils.errors import UserError

FINE_NAMES = [f"class_{i}" for i in range(100)]
C100, C10 = CIFARS["cifar100"], CIFARS["cifar10"]
PLAIN = Node(crop_fraction=1.0, skip_bad_images=False)  # the data keys a dataset reads


def _real_digit_images(mode):
    """Real digit scans with three different channels, so a channel mix-up shows."""
    images, labels = load_digits(mode)
    grey = images[..., 0]
    rgb = np.stack([grey, 255 - grey, grey[:, :, ::-1]], axis=-1)
    return np.ascontiguousarray(rgb), labels * 7 + 3  # spread labels over 100 classes


def _assert_same_samples(images, labels, reference):
    """Our arrays hold exactly the bytes and labels of Paddle's dataset, in its order."""
    assert images.dtype == np.uint8 and images.shape == (len(reference), 32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (len(reference),)
    for index in range(len(reference)):
        image, label = reference[index]
        assert np.asarray(image).tobytes() == images[index].tobytes()
        assert int(label) == labels[index]


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """A cifar-100-python.tar.gz written from real digit images."""
    path = tmp_path_factory.mktemp("cifar") / C100.archive
    members = {"train": cifar_batch(*_real_digit_images("train")),
               "test": cifar_batch(*_real_digit_images("test")),
               "meta": {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                        b"coarse_label_names": [b"c"] * 20}}
    return write_cifar_archive(path, members)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_reader_is_byte_identical_to_paddle_cifar100(cifar_archive, mode):
    from paddle.vision.datasets import Cifar100

    images, labels = load_cifar(C100, cifar_archive, mode)
    _assert_same_samples(images, labels, Cifar100(data_file=cifar_archive, mode=mode,
                                                  download=False, backend="pil"))
    expected, expected_labels = _real_digit_images(mode)
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)


def test_reader_reads_an_extracted_folder_the_same(cifar_archive, tmp_path):
    with tarfile.open(cifar_archive) as archive:
        archive.extractall(tmp_path, filter="data")
    for folder in (tmp_path, tmp_path / "cifar-100-python"):
        images, labels = load_cifar(C100, str(folder), "test")
        ref_images, ref_labels = load_cifar(C100, cifar_archive, "test")
        assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    assert cifar_class_names(C100, str(tmp_path)) == FINE_NAMES
    assert cifar_class_names(C100, cifar_archive) == FINE_NAMES


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory):
    """A cifar-10-python.tar.gz written from real digit images: five training batches, stored
    out of order, with CIFAR-10's label key, and the test batch."""
    images, labels = load_digits("train")
    chunks = np.array_split(np.arange(len(labels)), 5)
    members = {}
    for number in (3, 1, 5, 2, 4):
        batch = cifar_batch(images[chunks[number - 1]], labels[chunks[number - 1]])
        batch[b"labels"] = batch.pop(b"fine_labels")
        del batch[b"coarse_labels"]
        members[f"data_batch_{number}"] = batch
    test = cifar_batch(*load_digits("test"))
    test[b"labels"] = test.pop(b"fine_labels")
    members.update({"test_batch": test, "readme.html": b"<html></html>",
                    "batches.meta": {b"label_names": [f"digit {i}".encode() for i in range(10)],
                                     b"num_vis": 3072}})
    path = tmp_path_factory.mktemp("cifar10") / C10.archive
    return write_cifar_archive(path, members, folder=C10.folder)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_cifar10_reader_is_byte_identical_to_paddle_cifar10(cifar10_archive, mode, tmp_path):
    from paddle.vision.datasets import Cifar10

    images, labels = load_cifar(C10, cifar10_archive, mode)
    _assert_same_samples(images, labels, Cifar10(data_file=cifar10_archive, mode=mode,
                                                 download=False, backend="pil"))
    expected, expected_labels = load_digits(mode)
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)
    with tarfile.open(cifar10_archive) as archive:
        archive.extractall(tmp_path, filter="data")
    folder_images, folder_labels = load_cifar(C10, str(tmp_path), mode)
    assert np.array_equal(folder_images, images) and np.array_equal(folder_labels, labels)


def test_cifar10_is_a_data_name_with_its_class_names(cifar10_archive):
    from data.dataset import class_names, run_splits
    from utils.config import load_config

    cfg = load_config("configs/demo.yaml", ["data.name=cifar10", f"data.path={cifar10_archive}",
                                            "data.val_split=100"])
    train, val, test, names = run_splits(cfg.data, 10, 0)
    assert (len(train.labels), len(val.labels), len(test.labels)) == (1337, 100, 360)
    assert names == [f"digit {i}" for i in range(10)]
    assert class_names(cfg.data, 10) == [f"digit {i}" for i in range(10)]
    with pytest.raises(UserError, match="is it the cifar-10-python.tar.gz archive"):
        load_cifar(C10, write_cifar_archive(
            str(Path(cifar10_archive).parent / "other.tar.gz"), {"train": {}}), "train")


def test_missing_archive_offline_names_file_and_option(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "default_archive_path", lambda c: str(tmp_path / c.archive))

    def unreachable(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr("utils.io.download.socket.create_connection", unreachable)
    with pytest.raises(UserError) as info:
        locate_cifar(C100, None)
    message = str(info.value)
    assert str(tmp_path / C100.archive) in message
    assert "-o data.path=" in message and "Name or service not known" in message
    with pytest.raises(UserError, match="data.path /nope does not exist"):
        locate_cifar(C100, "/nope")


def test_digits_demo_split_is_stratified_fixed_and_held_out():
    train_images, train_labels = load_digits("train")
    test_images, test_labels = load_digits("test")
    assert train_images.shape == (1437, 32, 32, 3) and train_images.dtype == np.uint8
    assert test_images.shape == (360, 32, 32, 3)
    assert len(test_labels) / (len(test_labels) + len(train_labels)) >= 0.2
    per_class = np.bincount(train_labels) + np.bincount(test_labels)
    assert np.all(np.abs(np.bincount(test_labels) - 0.2 * per_class) <= 1)  # stratified
    again, _ = load_digits("test")
    assert np.array_equal(again, test_images)
    assert (train_images[..., 0] == train_images[..., 2]).all() and train_images.max() > 200


def test_subsets_are_seeded_sorted_and_bounded():
    first = subset_indices(50, 10, (3, 0), "data.train_subset")
    assert np.array_equal(first, subset_indices(50, 10, (3, 0), "data.train_subset"))
    assert not np.array_equal(first, subset_indices(50, 10, (4, 0), "data.train_subset"))
    assert np.all(np.diff(first) > 0) and len(set(first)) == 10
    assert np.array_equal(subset_indices(5, None, 0, "k"), np.arange(5))
    with pytest.raises(UserError, match="data.val_subset=60 must be between 1 and the split size 50"):
        subset_indices(50, 60, 0, "data.val_subset")


def test_augmentation_depends_only_on_seed_epoch_and_index():
    images, labels = load_digits("test")
    dataset = ImageDataset((images, labels), 32, PLAIN, seed=1,
                           augment={"hflip_prob": 0.5, "rotation": 15.0})
    dataset.set_epoch(2)
    first = [dataset[i][0] for i in range(8)]
    assert [np.array_equal(a, dataset[i][0]) for i, a in enumerate(first)] == [True] * 8
    dataset.set_epoch(3)
    assert not all(np.array_equal(a, dataset[i][0]) for i, a in enumerate(first))
    plain = ImageDataset((images, labels), 32, PLAIN)
    assert np.array_equal(plain[5][0], images[5])


def test_train_loader_ships_uint8_and_eval_loader_sees_every_sample():
    images, labels = load_digits("test")
    data_cfg = Node(PLAIN, batch_size=64, eval_batch_size=None, num_workers=0)
    train = build_loader(ImageDataset((images, labels), 32, PLAIN, seed=0), 64, 0, train=True)
    set_epoch(train, 0)
    batches = list(train)
    assert len(batches) == 360 // 64 and str(batches[0][0].dtype).endswith("uint8")
    assert list(batches[0][0].shape) == [64, 32, 32, 3]
    order0 = np.concatenate([b[1].numpy() for b in batches])
    set_epoch(train, 1)
    order1 = np.concatenate([b[1].numpy() for b in train])
    assert not np.array_equal(order0, order1)
    seen = np.concatenate([b[1].numpy() for b in eval_loader(Split(as_source(images), labels),
                                                                   data_cfg, 32)])
    assert np.array_equal(seen, labels)


def _photo_tiles(count_per_photo=16, size=32):
    """CIFAR-sized tiles of scikit-learn's sample photos (random crops, box-downsampled)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng, tiles = np.random.default_rng(0), []
    for photo in load_sample_images().images:
        height, width, _ = photo.shape
        for _ in range(count_per_photo):
            side = int(rng.integers(64, 300))
            top, left = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
            crop = Image.fromarray(photo[top:top + side, left:left + side])
            tiles.append(np.asarray(crop.resize((size, size), Image.BOX)))
    return np.stack(tiles)


@pytest.mark.parametrize("size", [384, 96])
def test_device_resize_stays_in_range_and_close_to_pils_bicubic(size):
    """PIL's bicubic resize (what PPIM's transforms and the ImageNet weights used) against
    the device's, in normalised units. Measured on these tiles (Paddle 3.3.1 and 2.6.2):
    mean |difference| 0.015 and max 0.30 (0.9 and 17 of 255 in pixels), from the kernels'
    coefficient (-0.75 against PIL's -0.5); without the clamp Paddle's overshoot reached
    [-2.58, 2.81] where the range is [-2.12, 2.64]."""
    import paddle
    from PIL import Image

    from data.preprocess import IMAGENET_MEAN, IMAGENET_STD, DevicePreprocess

    tiles = _photo_tiles()
    ours = DevicePreprocess(size)(paddle.to_tensor(tiles)).numpy().astype(np.float64)
    mean = np.array(IMAGENET_MEAN)[None, :, None, None]
    std = np.array(IMAGENET_STD)[None, :, None, None]
    pil = np.stack([np.asarray(Image.fromarray(t).resize((size, size), Image.BICUBIC))
                    for t in tiles]).transpose(0, 3, 1, 2) / 255.0
    pil = (pil - mean) / std
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    assert np.all(ours >= low - 1e-6) and np.all(ours <= high + 1e-6)
    difference = np.abs(ours - pil)
    assert difference.mean() < 0.02 and difference.max() < 0.35


def test_the_digits_cache_holds_what_scikit_learn_gives_and_a_bad_one_is_remade(tmp_path,
                                                                              monkeypatch):
    import pickle

    from data import digits

    monkeypatch.setattr(digits, "CACHE_DIR", str(tmp_path))
    fresh = digits._prepare("test")
    first = digits.load_digits("test")  # computed, then kept
    path = digits.cache_path("test")
    assert os.path.isfile(path) and path.startswith(str(tmp_path))
    again = digits.load_digits("test")  # read back
    for got in (first, again):
        assert np.array_equal(got[0], fresh[0]) and np.array_equal(got[1], fresh[1])
        assert got[0].dtype == np.uint8 and got[1].dtype == np.int64
    for damage in (b"not an npz", pickle.dumps({"images": fresh[0]})):
        with open(path, "wb") as handle:
            handle.write(damage)
        got = digits.load_digits("test")
        assert np.array_equal(got[0], fresh[0]) and np.array_equal(got[1], fresh[1])
        assert digits._read_cached(path) is not None  # written again, whole
    np.savez(path, images=fresh[0], labels=fresh[1] + 10)  # labels beyond the ten classes
    assert digits._read_cached(path) is None
    np.savez_compressed(path, images=np.zeros((2000, 32, 32, 3), np.uint8),  # 6 MB of zeros
                        labels=np.zeros(2000, np.int64))
    monkeypatch.setattr(digits, "MAX_CACHED_BYTES", 4 << 20)
    assert os.path.getsize(path) < 100_000 and digits._read_cached(path) is None
    os.remove(path)
    os.mkfifo(path)  # a pipe where the cache goes is never opened (it would block)
    assert digits._read_cached(path) is None
    assert digits.cache_path("train") != path  # one file per split
