"""Datasets and loaders over uint8 image arrays, with seeded host-side augmentation."""

import ctypes
import functools
import os
import signal
import sys

import numpy as np
from paddle.io import DataLoader, Dataset, DistributedBatchSampler
from paddle.vision.transforms import functional as F
from PIL import Image

from data.cifar import (
    cifar100_class_names,
    default_archive_path,
    load_cifar100,
    locate_cifar100,
)
from data.digits import digits_class_names, load_digits
from utils.cli import derived_seed
from utils.dist import rank, world_size
from utils.errors import UserError

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def load_split(data_cfg, mode):
    """Load a whole split named by ``data.name``: ``(images, labels, class_names)``."""
    if data_cfg.name == "digits":
        images, labels = load_digits(mode)
        return images, labels, digits_class_names()
    path = locate_cifar100(data_cfg.path)
    images, labels = load_cifar100(path, mode)
    return images, labels, cifar100_class_names(path)


def class_names(data_cfg, num_classes):
    """Class names for reports, without downloading anything: the digits, CIFAR-100's from
    the archive's meta when the archive is here, otherwise the class indices."""
    if data_cfg.name == "digits":
        return name_classes(digits_class_names(), num_classes)
    archive = data_cfg.path or default_archive_path()
    if os.path.exists(archive):
        return name_classes(cifar100_class_names(archive), num_classes)
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

    Each sample's flip and rotation are drawn from a generator seeded by
    ``(seed, epoch, index)``, so an epoch is the same whatever the number of
    workers and whichever worker loads the sample.
    """

    def __init__(self, images, labels, hflip_prob=0.0, rotation=0.0, seed=0):
        super().__init__()
        self.images = images
        self.labels = labels
        self.hflip_prob = hflip_prob
        self.rotation = rotation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.hflip_prob > 0 or self.rotation > 0:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
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
    init = functools.partial(_die_with_parent, os.getpid()) if num_workers else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      worker_init_fn=init)


def _die_with_parent(parent, worker_id):
    """In a loader worker: have the kernel kill this process when the training process dies
    (Linux; without it, workers of a run killed with kill -9 live on for minutes)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def eval_loader(images, labels, data_cfg):
    """A loader over this rank's share of the samples (every ``world_size``-th from ``rank``,
    all of them on one process), in order, nothing dropped, nothing repeated, no augmentation."""
    batch = data_cfg.eval_batch_size or data_cfg.batch_size
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
