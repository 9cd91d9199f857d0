"""Datasets and loaders over uint8 image arrays, with seeded host-side augmentation."""

import functools
import os

import numpy as np
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from paddle.vision.transforms import functional as F
from PIL import Image

from data.augment import random_resized_box, resized_crop
from data.cifar import CIFARS, cifar_class_names, default_archive_path, load_cifar, locate_cifar
from data.digits import digits_class_names, load_digits
from training.stages import micro_batch
from utils.errors import UserError
from utils.runtime.dist import die_with_parent, rank, world_size
from utils.runtime.seeds import derived_seed

# Seed streams: the train and val subsets, the held-out validation split.
TRAIN_SUBSET_STREAM, VAL_SUBSET_STREAM, HOLDOUT_STREAM = 0, 1, 2


def load_split(data_cfg, mode):
    """Load a whole split named by ``data.name``: ``(images, labels, class_names)``."""
    if data_cfg.name == "digits":
        images, labels = load_digits(mode)
        return images, labels, digits_class_names()
    cifar = CIFARS[data_cfg.name]
    path = locate_cifar(cifar, data_cfg.path)
    images, labels = load_cifar(cifar, path, mode)
    return images, labels, cifar_class_names(cifar, path)


def run_splits(data_cfg, num_classes, seed):
    """The ``(images, labels)`` a run trains, validates and tests on.

    With ``data.val_split: N`` the validation set is N training images held out (stratified
    by class, seeded) and the test split is kept for the end; with 0 the test split is also
    the validation set (the original's and the R-Drop paper's protocol).
    """
    images, labels, _ = load_split(data_cfg, "train")
    test_images, test_labels, _ = load_split(data_cfg, "test")
    check_labels(labels, num_classes, "train")
    check_labels(test_labels, num_classes, "test")
    test = (test_images, test_labels)
    if not data_cfg.val_split:
        return (images, labels), test, test
    train, val = holdout_indices(labels, data_cfg.val_split, (seed, HOLDOUT_STREAM))
    return (images[train], labels[train]), (images[val], labels[val]), test


def stage_loaders(data_cfg, seed, accum_steps, train_split, val_split):
    """A stage's training loader (its subset, augmentation and per-rank micro-batches of
    ``data.batch_size / (ranks x accum_steps)``) and validation loader (its subset, this
    rank's share)."""
    images, labels = train_split
    keep = subset_indices(len(labels), data_cfg.train_subset, (seed, TRAIN_SUBSET_STREAM),
                          "data.train_subset")
    augment = data_cfg.train_augment  # false: the images as evaluation sees them (FixRes)
    train_set = ImageArrayDataset(images[keep], labels[keep],
                                  hflip_prob=data_cfg.hflip_prob if augment else 0.0,
                                  rotation=data_cfg.rotation if augment else 0.0, seed=seed,
                                  crop=data_cfg.random_resized_crop if augment else None)
    micro = micro_batch(data_cfg.batch_size, accum_steps, world_size())
    train_loader = build_loader(train_set, micro, data_cfg.num_workers, train=True)
    images, labels = val_split
    keep = subset_indices(len(labels), data_cfg.val_subset, (seed, VAL_SUBSET_STREAM),
                          "data.val_subset")
    return train_loader, eval_loader(images[keep], labels[keep], data_cfg)


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
    """Class names for reports, without downloading anything: the digits, CIFAR's from
    the archive's meta when the archive is here, otherwise the class indices."""
    if data_cfg.name == "digits":
        return name_classes(digits_class_names(), num_classes)
    cifar = CIFARS[data_cfg.name]
    archive = data_cfg.path or default_archive_path(cifar)
    if os.path.exists(archive):
        return name_classes(cifar_class_names(cifar, archive), num_classes)
    return name_classes([], num_classes)


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


class ImageArrayDataset(Dataset):
    """uint8 ``[N, H, W, 3]`` images and int64 labels, augmented on the CPU.

    Each sample's random-resized crop (``crop``: ``{scale, ratio}``), flip and rotation
    are drawn, in that order, from a generator seeded by ``(seed, epoch, index)``, so an
    epoch is the same whatever the number of workers and whichever worker loads the sample.
    """

    def __init__(self, images, labels, hflip_prob=0.0, rotation=0.0, seed=0, crop=None):
        super().__init__()
        self.images, self.labels = images, labels
        self.hflip_prob, self.rotation, self.crop = hflip_prob, rotation, crop
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.crop or self.hflip_prob > 0 or self.rotation > 0:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            if self.crop:
                image = resized_crop(image, random_resized_box(
                    rng, *image.shape[:2], self.crop["scale"], self.crop["ratio"]))
            if rng.random() < self.hflip_prob:
                image = image[:, ::-1]
            if self.rotation > 0:
                angle = rng.uniform(-self.rotation, self.rotation)
                image = np.asarray(F.rotate(Image.fromarray(np.ascontiguousarray(image)), angle,
                                            interpolation="bilinear"))
        return np.ascontiguousarray(image), self.labels[index]


class WindowedBatchSampler(DistributedBatchSampler):
    """DistributedBatchSampler that yields only batches ``start .. stop-1`` of an epoch.

    ``start`` skips the batches a resumed epoch already did, without loading them;
    ``stop`` drops the micro-batches that would not fill a gradient accumulation.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start, self.stop = 0, None

    def full_length(self):
        """Batches in a whole epoch."""
        return super().__len__()

    def __iter__(self):
        stop = self.full_length() if self.stop is None else self.stop
        for index, batch in enumerate(super().__iter__()):
            if index >= stop:
                break
            if index >= self.start:
                yield batch

    def __len__(self):
        stop = self.full_length() if self.stop is None else self.stop
        return max(stop - self.start, 0)


def build_loader(dataset, batch_size, num_workers, train):
    """A DataLoader over ``dataset``; training shuffles and drops the last partial batch.

    Training batches are sharded across ranks (DistributedBatchSampler); evaluation
    loaders get a dataset already sharded by :func:`eval_loader` and take all of it.
    """
    shard = {} if train else {"num_replicas": 1, "rank": 0}
    sampler = WindowedBatchSampler(dataset, batch_size=batch_size, shuffle=train,
                                   drop_last=train, **shard)
    if train and len(sampler) == 0:
        raise UserError(f"the training split has {len(dataset)} images, fewer than one "
                        f"batch of {batch_size}; lower data.batch_size")
    # Workers die with the training process (without it, the workers of a run killed with
    # kill -9 live on for minutes).
    init = functools.partial(_worker_dies_with, os.getpid()) if num_workers else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      worker_init_fn=init)


def _worker_dies_with(parent, worker_id):
    die_with_parent(parent)


def eval_loader(images, labels, data_cfg):
    """A loader over this rank's share of the samples (every ``world_size``-th from ``rank``,
    all of them on one process), in order, nothing dropped, nothing repeated, no augmentation."""
    batch = data_cfg.eval_batch_size or max(data_cfg.batch_size // world_size(), 1)
    share = slice(rank(), None, world_size())
    return build_loader(ImageArrayDataset(images[share], labels[share]), batch,
                        data_cfg.num_workers, train=False)


def check_labels(labels, num_classes, split):
    """Stop when a label does not fit a ``num_classes``-way head."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"the {split} split has labels in [{labels.min()}, {labels.max()}], "
                        f"outside [0, {num_classes}); set model.num_classes")


def set_epoch(loader, epoch, start=0):
    """Select ``epoch``'s shuffle order and augmentation draws (both derived from the seed),
    beginning at batch ``start``."""
    dataset = loader.dataset
    dataset.set_epoch(epoch)
    loader.batch_sampler.set_epoch(derived_seed(dataset.seed, epoch))
    loader.batch_sampler.start = start
