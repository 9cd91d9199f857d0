"""The splits a run uses (CIFAR, the digits demo, your own folders or lists) and the
datasets over them, with seeded host-side views."""

import multiprocessing
import os
import sys
from typing import NamedTuple

import numpy as np
from paddle.io import Dataset

from data import folders
from data.augment import eval_view, train_view
from data.cifar import CIFARS, cifar_class_names, default_archive_path, load_cifar, locate_cifar
from data.digits import digits_class_names, load_digits
from data.loader import FAILED, build_loader
from data.sources import FileImages, as_source
from training.stages import micro_batch
from utils.errors import UserError
from utils.io.tensor_io import class_names_of
from utils.runtime.dist import rank, world_size

# Seed streams: the train and val subsets, the held-out validation split.
TRAIN_SUBSET_STREAM, VAL_SUBSET_STREAM, HOLDOUT_STREAM = 0, 1, 2


class Split(NamedTuple):
    """A split's images (a :mod:`data.sources` source) and int64 labels."""

    images: object
    labels: np.ndarray

    def take(self, indices):
        """The samples at ``indices`` (an index array or a slice)."""
        return Split(self.images.take(indices), self.labels[indices])


def load_split(data_cfg, mode, num_classes=None):
    """Split ``mode`` (train, val or test) named by ``data.name`` as ``(Split, class_names)``;
    ``None`` for a ``val`` split the data does not have (only folders and lists may)."""
    if data_cfg.name == "digits":
        images, labels = load_digits(mode)
        return Split(as_source(images), labels), digits_class_names()
    if data_cfg.name in CIFARS:
        cifar = CIFARS[data_cfg.name]
        path = locate_cifar(cifar, data_cfg.path)
        images, labels = load_cifar(cifar, path, mode)
        return Split(as_source(images), labels), cifar_class_names(cifar, path)
    if data_cfg.name == "folder":
        classes = folders.class_folders(folders.split_folder(data_cfg, "train"))
        found = folders.folder_split(data_cfg, mode, classes)
        if num_classes is not None and len(classes) != num_classes:
            raise UserError(f"{data_cfg.path}/train has {len(classes)} class folders "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                            f"but model.num_classes={num_classes}; set model.num_classes="
                            f"{len(classes)}")
    else:
        found = folders.list_split(data_cfg, f"{mode}_list", num_classes)
        classes = folders.label_names(data_cfg, num_classes)
    return (None if found is None else Split(*found)), classes


def validation_source(data_cfg):
    """Where validation images come from: ``own`` (a ``val/`` folder, ``data.val_list``),
    ``held_out`` (``data.val_split``) or ``test`` (the test split)."""
    if (data_cfg.name == "folder" and os.path.isdir(os.path.join(data_cfg.path, "val"))) or (
            data_cfg.name == "list" and data_cfg.val_list is not None):
        return "own"
    return "held_out" if data_cfg.val_split else "test"


def run_splits(data_cfg, num_classes, seed):
    """The :class:`Split` a run trains, validates and tests on, and the class names.

    The validation split is the data's own (a ``val/`` folder, ``data.val_list``) when it has
    one; else with ``data.val_split: N`` N training images held out (stratified by class,
    seeded), the test split kept for the end; with 0 the test split (the original's and the
    R-Drop paper's protocol).
    """
    train, names = load_split(data_cfg, "train", num_classes)
    test, _ = load_split(data_cfg, "test", num_classes)
    check_labels(train.labels, num_classes, "train")
    check_labels(test.labels, num_classes, "test")
    names = name_classes(names, num_classes)
    if validation_source(data_cfg) == "own":
        if data_cfg.val_split:
            raise UserError(f"the data has its own validation split (val/, data.val_list) and "
                            f"data.val_split={data_cfg.val_split} asks to hold one out; set "
                            f"data.val_split=0 or remove the data's own")
        return train, load_split(data_cfg, "val", num_classes)[0], test, names
    if not data_cfg.val_split:
        return train, test, test, names
    kept, held = holdout_indices(train.labels, data_cfg.val_split, (seed, HOLDOUT_STREAM))
    return train.take(kept), train.take(held), test, names


def stage_loaders(data_cfg, seed, accum_steps, size, train_split, val_split):
    """A stage's training loader (its subset, augmentation and per-rank micro-batches of
    ``data.batch_size / (ranks x accum_steps)``) and validation loader (its subset, this
    rank's share), for a model of ``size`` pixels."""
    keep = subset_indices(len(train_split.labels), data_cfg.train_subset,
                          (seed, TRAIN_SUBSET_STREAM), "data.train_subset")
    augment = data_cfg.train_augment  # false: the images as evaluation sees them (FixRes)
    train_set = ImageDataset(
        train_split.take(keep), size, data_cfg, seed=seed, replace_bad=True,
        augment={"crop": data_cfg.random_resized_crop, "hflip_prob": data_cfg.hflip_prob,
                 "rotation": data_cfg.rotation} if augment else None)
    micro = micro_batch(data_cfg.batch_size, accum_steps, world_size())
    train_loader = build_loader(train_set, micro, data_cfg.num_workers, train=True)
    keep = subset_indices(len(val_split.labels), data_cfg.val_subset, (seed, VAL_SUBSET_STREAM),
                          "data.val_subset")
    return train_loader, eval_loader(val_split.take(keep), data_cfg, size)


def holdout_indices(labels, count, seed):
    """Sorted ``(train, held_out)`` indices: ``count`` held out, each class in proportion to
    its size (largest remainders round), the members drawn from a generator seeded by
    ``seed``."""
    if not 0 < count < len(labels):
        raise UserError(f"data.val_split={count} leaves no training image: the training split "
                        f"has {len(labels)}, so hold out at most {len(labels) - 1} (or 0 to "
                        f"validate on the test split)")
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:count - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(np.flatnonzero(labels == c), q, replace=False)
                           for c, q in zip(classes, quota)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def class_names(data_cfg, num_classes):
    """Class names for reports, without downloading anything: the digits, the class folders
    or ``data.label_names`` of your own data, CIFAR's from the archive's meta when the
    archive is here; otherwise the class indices."""
    if data_cfg.name == "digits":
        return name_classes(digits_class_names(), num_classes)
    if data_cfg.name == "folder":
        train = os.path.join(data_cfg.path, "train")
        return name_classes(folders.class_folders(train) if os.path.isdir(train) else [],
                            num_classes)
    if data_cfg.name == "list":
        return folders.label_names(data_cfg, num_classes)
    cifar = CIFARS[data_cfg.name]
    archive = data_cfg.path or default_archive_path(cifar)
    if os.path.exists(archive):
        return name_classes(cifar_class_names(cifar, archive), num_classes)
    return name_classes([], num_classes)


def names_for_weights(weights, data_cfg, num_classes):
    """The class names of trained weights: those the file carries (so the data need not be at
    hand), else :func:`class_names` of the data."""
    names = class_names_of(weights)
    if names is not None and len(names) == num_classes:
        return names
    return class_names(data_cfg, num_classes)


def name_classes(names, num_classes):
    """Exactly ``num_classes`` distinct names: the data's, then indices for classes it does
    not name."""
    names = list(names[:num_classes]) + [str(i) for i in range(len(names), num_classes)]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})[:3]
        raise UserError(f"the class names repeat ({', '.join(repeated)}); the data's meta "
                        f"is damaged")
    return names


def subset_indices(total, size, seed, key):
    """A seeded, sorted choice of ``size`` of ``total`` indices (all of them when ``size`` is None)."""
    if size is None:
        return np.arange(total)
    if not 0 < size <= total:
        raise UserError(f"{key}={size} must be between 1 and the split size {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


class ImageDataset(Dataset):
    """The samples of a :class:`Split` (or ``(uint8 array, labels)``) as the host sends them:
    uint8 ``[S, S, 3]`` views (:mod:`data.augment`; S is the source's ``ship_size`` for a
    model of ``size``) and labels.

    With ``augment`` (``{crop, hflip_prob, rotation}``) each sample's view is drawn from a
    generator seeded by ``(seed, epoch, index)``, so an epoch is the same whatever the number
    of workers and whichever worker loads the sample; without it the evaluation view.

    An image that cannot be read stops the run, or with ``data.skip_bad_images`` is one
    warning line (once per file in a run, whichever worker meets it) and counted
    (:meth:`take_skipped`): a training sample (``replace_bad``) is then the next readable
    one, an evaluation sample gets label -1, which :func:`training.engine.evaluate` leaves out.
    """

    def __init__(self, split, size, data_cfg, seed=0, augment=None, replace_bad=False):
        super().__init__()
        images, self.labels = split
        self.images = as_source(images)
        self.size = self.images.ship_size(size)
        self.crop_fraction, self.augment = data_cfg.crop_fraction, augment
        self.seed, self.epoch, self.replace_bad = seed, 0, replace_bad
        self.skip_bad = data_cfg.skip_bad_images
        if self.skip_bad:  # shared with the loader's worker processes
            self.skipped = multiprocessing.Value("q", 0)

    def set_epoch(self, epoch):
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def take_skipped(self):
        """The unreadable images met since the last call (0 without ``data.skip_bad_images``)."""
        if not self.skip_bad:
            return 0
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count

    def __getitem__(self, index):
        try:
            return self._sample(int(index))
        except Exception:  # noqa: BLE001 - raised again in the training process (data.loader):
            # an exception let out of here hangs Paddle's loader for good with num_workers: 0
            return np.zeros((self.size, self.size, 3), np.uint8), np.int64(FAILED - int(index))

    def raise_failure(self, index):
        """Raise, in this process, the error that sample ``index`` met in a loader worker,
        as one :class:`UserError`."""
        name = self.images.name(index)
        try:
            self._sample(index)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - MemoryError, a decoder's bug: one line
            message = " ".join(str(exc).split())[:200]
            raise UserError(f"{name} could not be prepared ({type(exc).__name__}: {message}); "
                            f"data.skip_bad_images=true leaves out images that fail") from None
        raise UserError(f"{name} could not be read in a loader worker")

    def _sample(self, index):
        """Sample ``index`` as :meth:`__getitem__` returns it, or the :class:`UserError` of
        an image that cannot be read (or, skipping those, of a split with none readable)."""
        image, label = self._read(index, report=True), self.labels[index]
        if image is None and not self.replace_bad:
            return np.zeros((self.size, self.size, 3), np.uint8), np.int64(-1)
        follower = index
        while image is None:
            follower = (follower + 1) % len(self)
            if follower == index:
                raise UserError(f"none of the {len(self)} images of this split can be read")
            image, label = self._read(follower, report=False), self.labels[follower]
        if self.augment is None:
            return eval_view(image, self.size, self.crop_fraction), label
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return train_view(image, rng, self.size, crop_fraction=self.crop_fraction,
                          **self.augment), label

    def _read(self, index, report):
        """Image ``index``, or ``None`` when it cannot be read and bad images are skipped
        (``report``: this is the sample's own file, to warn about and count)."""
        try:
            return self.images.read(index)
        except UserError as exc:
            if not self.skip_bad:
                raise UserError(f"{exc}; remove it or set data.skip_bad_images=true") from None
            if report:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                if self.images.first_failure(index):
                    print(f"warning: skipped {exc}", file=sys.stderr, flush=True)
            return None


def eval_loader(split, data_cfg, size):
    """A loader over this rank's share of ``split`` (every ``world_size``-th sample from
    ``rank``, all of them on one process), in order, nothing dropped, nothing repeated, in
    the evaluation view for a model of ``size`` pixels."""
    batch = data_cfg.eval_batch_size or max(data_cfg.batch_size // world_size(), 1)
    share = split.take(slice(rank(), None, world_size()))
    return build_loader(ImageDataset(share, size, data_cfg), batch, data_cfg.num_workers,
                        train=False)


def check_labels(labels, num_classes, split):
    """Stop when a label does not fit a ``num_classes``-way head."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"the {split} split has labels in [{labels.min()}, {labels.max()}], "
                        f"outside [0, {num_classes}); set model.num_classes")


def shipping_line(dataset, num_workers):
    """What the host sends the device per training image, and who prepares it."""
    side = dataset.size
    source = "decoded from files" if isinstance(dataset.images, FileImages) else "from memory"
    workers = f"{num_workers} loader workers" if num_workers else "the training process"
    return (f"host -> device: uint8 {side}x{side}x3 = {side * side * 3:,} bytes per image, "
            f"{source} by {workers}")
