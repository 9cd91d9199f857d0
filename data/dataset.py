"""The splits a run uses (CIFAR, the digits demo, your own folders or lists): held-out
validation, seeded subsets, class names, and the loaders over them."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import TYPE_CHECKING, Optional

import numpy as np

from data.batching import micro_batch
from data.formats import FORMATS
from data.loader import build_loader
from data.samples import ImageDataset
from data.sources import Split
from utils.errors import UserError
from utils.io.files import path_problem
from utils.io.tensor_io import class_names_of
from utils.runtime.dist import rank, world_size

if TYPE_CHECKING:
    import paddle

    from utils.schema import DataConfig

# Seed streams: the train and val subsets, the held-out validation split.
TRAIN_SUBSET_STREAM, VAL_SUBSET_STREAM, HOLDOUT_STREAM = 0, 1, 2


def load_split(data_cfg: DataConfig, mode: str,
               num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
    """Split ``mode`` (train, val or test) of the format ``data.name`` names
    (:mod:`data.formats`) as ``(Split, class_names)``; ``None`` for a ``val`` split the data
    does not have."""
    return FORMATS[data_cfg.name].read_split(data_cfg, mode, num_classes)


def validation_source(data_cfg: DataConfig) -> str:
    """Where validation images come from: ``own`` (the data's, e.g. a ``val/`` folder or
    ``data.val_list``), ``held_out`` (``data.val_split``) or ``test`` (the test split)."""
    if FORMATS[data_cfg.name].own_validation(data_cfg):
        return "own"
    return "held_out" if data_cfg.val_split else "test"


def run_splits(data_cfg: DataConfig, num_classes: int,
               seed: int) -> tuple[Split, Split, Split, list[str]]:
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
            raise UserError(f"the data has its own validation split (data.name={data_cfg.name}: "
                            f"e.g. a val/ folder, data.val_list, val.npz) and data.val_split="
                            f"{data_cfg.val_split} asks to hold one out; set data.val_split=0 or "
                            f"remove the data's own")
        return train, load_split(data_cfg, "val", num_classes)[0], test, names
    if not data_cfg.val_split:
        return train, test, test, names
    kept, held = holdout_indices(train.labels, data_cfg.val_split, (seed, HOLDOUT_STREAM))
    return train.take(kept), train.take(held), test, names


def stage_loaders(data_cfg: DataConfig, seed: int, accum_steps: int, size: int, train_split: Split,
                  val_split: Split) -> tuple[paddle.io.DataLoader, paddle.io.DataLoader]:
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


def data_path_problem(data_cfg: DataConfig) -> Optional[str]:
    """What is wrong with the ``data.path`` the config names, with what the format reads
    there, in words for an error line; ``None`` when it is unset or there."""
    problem = data_cfg.path and path_problem(data_cfg.path, "any")
    if not problem:
        return None
    reads = FORMATS[data_cfg.name].reads.replace("PATH", data_cfg.path)
    return f"data.path {data_cfg.path} {problem}; {reads}"


# Marks the fingerprints of the files read; a run recorded before them had another kind.
FINGERPRINT = "files:"


def files_read(data_cfg: DataConfig, num_classes: int) -> Optional[list[tuple[str, str]]]:
    """``(name, path)`` of every file a run of ``data_cfg`` reads, listed as its reader lists
    them: the CIFAR archive wherever it is found (``data.path``, an AI Studio mount, Paddle's
    cache), the images of class folders (links followed, hidden and non-image files passed
    over), list files and the images they name. ``None`` for the built-in digits and for
    data that is not here; data that is here but cannot be read as the reader reads it is
    the reader's :class:`UserError`."""
    if data_cfg.path and path_problem(data_cfg.path, "any"):
        return None
    try:
        return FORMATS[data_cfg.name].files(data_cfg, num_classes)
    except OSError as exc:
        raise UserError(f"the data cannot be listed ({exc.strerror}: {exc.filename})") from None


def data_identity(data_cfg: DataConfig, num_classes: int) -> Optional[str]:
    """A fingerprint of the files a run reads (:func:`files_read`: each one's name, size and
    modification time), or ``None`` when there are none to list. A run records it so that
    data replaced since cannot pass for what the run was tested on."""
    files = files_read(data_cfg, num_classes)
    if files is None:
        return None
    digest = hashlib.sha256()
    for name, path in sorted(files, key=lambda item: os.fsencode(item[0])):
        with contextlib.suppress(OSError):  # vanished while listed: left out
            status = os.stat(path)
            digest.update(os.fsencode(name) + f"\0{status.st_size}\0{status.st_mtime_ns}\n"
                          .encode())
    return FINGERPRINT + digest.hexdigest()


def check_holdout(count: int, images: int) -> None:
    """One error when ``data.val_split = count`` would leave none of the ``images`` training
    images to train on."""
    if not 0 < count < images:
        raise UserError(f"data.val_split={count} leaves no training image: the training split "
                        f"has {images}, so hold out at most {images - 1} (or 0 to validate on "
                        f"the test split)")


def holdout_indices(labels: np.ndarray, count: int, seed: tuple[int,
                    ...]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, held_out)`` indices: ``count`` held out, each class in proportion to
    its size (largest remainders round), the members drawn from a generator seeded by
    ``seed``."""
    check_holdout(count, len(labels))
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


def class_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
    """Class names for reports, without downloading anything: the digits, the class folders
    or ``data.label_names`` of your own data, CIFAR's from the archive's meta when the
    archive is here; otherwise the class indices."""
    return name_classes(FORMATS[data_cfg.name].class_names(data_cfg, num_classes), num_classes)


def names_for_weights(weights: str, data_cfg: DataConfig, num_classes: int) -> list[str]:
    """The class names of trained weights: those the file carries (so the data need not be at
    hand), else :func:`class_names` of the data."""
    names = class_names_of(weights)
    if names is not None and len(names) == num_classes:
        return names
    return class_names(data_cfg, num_classes)


def name_classes(names: Optional[list[str]], num_classes: int) -> list[str]:
    """Exactly ``num_classes`` distinct names: the data's, then indices for classes it does
    not name."""
    names = list(names[:num_classes]) + [str(i) for i in range(len(names), num_classes)]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})[:3]
        raise UserError(f"the class names repeat ({', '.join(repeated)}); the data's meta "
                        f"is damaged")
    return names


def subset_indices(total: int, size: Optional[int], seed: tuple[int, ...], key: str) -> np.ndarray:
    """A seeded, sorted choice of ``size`` of ``total`` indices (all of them when ``size`` is None)."""
    if size is None:
        return np.arange(total)
    if not 0 < size <= total:
        raise UserError(f"{key}={size} must be between 1 and the split size {total}")
    return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def eval_loader(split: Split, data_cfg: DataConfig, size: int) -> paddle.io.DataLoader:
    """A loader over this rank's share of ``split`` (every ``world_size``-th sample from
    ``rank``, all of them on one process), in order, nothing dropped, nothing repeated, in
    the evaluation view for a model of ``size`` pixels."""
    batch = data_cfg.eval_batch_size or max(data_cfg.batch_size // world_size(), 1)
    share = split.take(slice(rank(), None, world_size()))
    return build_loader(ImageDataset(share, size, data_cfg), batch, data_cfg.num_workers,
                        train=False)


def check_labels(labels: np.ndarray, num_classes: int, split: str) -> None:
    """Stop when a label does not fit a ``num_classes``-way head."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"the {split} split has labels in [{labels.min()}, {labels.max()}], "
                        f"outside [0, {num_classes}); set model.num_classes")
