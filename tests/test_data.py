"""data/dataset.py and data/batching.py: the held-out validation split, subsets, the digits
demo data, augmentation and the loaders, the batch split over ranks (CIFAR: test_cifar.py)."""

import errno
import io
import json
import os
import re
import zipfile

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    assert_one_error,
    final_tests,
    read_records,
    run_script,
    small_demo_config,
)

from data.batching import micro_batch
from data.dataset import eval_loader, holdout_indices, subset_indices
from data.digits import load_digits
from data.loader import build_loader, set_epoch
from data.samples import ImageDataset
from data.sources import Split, as_source
from main import train
from utils.errors import UserError
from utils.schema import Node

PLAIN = Node(crop_fraction=1.0, skip_bad_images=False)  # the data keys a dataset reads


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


@pytest.mark.slow
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
                                                                              monkeypatch,
                                                                              capsys):
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
    whole = open(path, "rb").read()
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # a bit-flipped image byte: the member's CRC fails
    claims = io.BytesIO()  # 200 bytes whose images header declares 10^12 of them
    with zipfile.ZipFile(claims, "w") as archive:
        with archive.open("images.npy", "w") as member:
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (10 ** 12,)})
        with archive.open("labels.npy", "w") as member:
            np.save(member, fresh[1])
    for damage in (b"not an npz", pickle.dumps({"images": fresh[0]}), whole[:len(whole) // 2],
                   bytes(flipped), claims.getvalue()):
        with open(path, "wb") as handle:
            handle.write(damage)
        got = digits.load_digits("test")
        assert np.array_equal(got[0], fresh[0]) and np.array_equal(got[1], fresh[1])
        assert "is damaged" in capsys.readouterr().out
        assert digits._read_cached(path) is not None  # written again, whole
    os.remove(path)

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(digits.os, "replace", full_disk)
    digits.load_digits("test")  # the split, without a cache
    assert os.listdir(tmp_path) == []  # no temporary file left behind
    monkeypatch.undo()
    monkeypatch.setattr(digits, "CACHE_DIR", str(tmp_path))
    digits.load_digits("test")
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


def test_holdout_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(100), 500)  # CIFAR-100's training split
    train, held = holdout_indices(labels, 5000, seed=(42, 2))
    assert len(held) == 5000 and np.all(np.bincount(labels[held]) == 50)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    again, _ = holdout_indices(labels, 5000, seed=(42, 2))
    assert np.array_equal(train, again)
    other = holdout_indices(labels, 5000, seed=(43, 2))[1]
    assert not np.array_equal(held, other)
    uneven = np.array([0] * 7 + [1] * 2 + [2])  # quotas 3.5, 1, 0.5 of 5: largest remainders
    assert np.bincount(uneven[holdout_indices(uneven, 5, 0)[1]], minlength=3).tolist() == [4, 1, 0]
    with pytest.raises(UserError, match=r"data.val_split=10 leaves no training image: the "
                       r"training split has 10, so hold out at most 9 \(or 0 to validate on"):
        holdout_indices(uneven, 10, 0)


@pytest.mark.slow
def test_validation_comes_from_held_out_images_and_the_test_split_is_used_once(tmp_path):
    out = str(tmp_path / "run")
    best = train(small_demo_config(out, "data.val_subset=null"))
    assert all(r["val_top1"] is not None for r in read_records(out))
    assert best["val_num_samples"] == 240 and best["selected_on"] == "val"
    tests = final_tests(out)
    assert set(tests) == {"best", "last"} and tests["best"]["num_samples"] == 360
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["test_top1"] == tests["best"]["test_top1"]
    val = run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}", "--split", "val")
    assert val.returncode == 0 and val.stdout.strip().endswith("n=240 on the val split")
    test = run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}")
    top1 = float(re.search(r"top1=(\S+)", test.stdout)[1])
    assert top1 == pytest.approx(tests["best"]["test_top1"], abs=1e-4)


@pytest.mark.slow
def test_the_old_protocol_says_its_best_is_chosen_on_the_test_split(tmp_path, capsys):
    out = str(tmp_path / "run")
    best = train(small_demo_config(out, "data.val_split=0"))
    assert best["selected_on"] == "test" and best["val_num_samples"] == 100
    assert "chosen on the test split (data.val_split: 0), so this number is biased upward" \
        in capsys.readouterr().out
    proc = run_script("val.py", *DEMO_CLI, "-o", "data.val_split=0", "-o", f"train.output_dir={out}")
    assert "chosen on the test split" in proc.stdout
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", "data.val_split=0", "-o",
                                f"train.output_dir={out}", "--split", "val"),
                     "this config holds out no validation images")


@pytest.mark.slow
def test_the_batch_of_a_step_splits_over_ranks_and_micro_batches():
    assert micro_batch(24, 1, 1) == 24 and micro_batch(24, 2, 4) == 3
    with pytest.raises(UserError, match=r"data.batch_size=24 does not split into 5 rank\(s\) x "
                                        r"train.accum_steps=2 equal micro-batches; make it a "
                                        r"multiple of 10"):
        micro_batch(24, 2, 5)
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", "train.accum_steps=5",
                                "-o", "train.output_dir=/tmp/never-written-here", "--preflight"),
                     "data.batch_size=32 does not split into 1 rank(s) x train.accum_steps=5")


@pytest.mark.slow
def test_subset_larger_than_the_split_is_one_error_line(tmp_path):
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.train_subset=5000",
                      "-o", f"train.output_dir={tmp_path}")
    assert_one_error(proc, "data.train_subset=5000 must be between 1 and the split size 1197")
