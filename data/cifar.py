"""CIFAR-100 reader: the ``cifar-100-python`` archive as uint8 arrays.

Reads the same members, in the same order, as ``paddle.vision.datasets.Cifar100``
and returns the same bytes, but as two arrays instead of a list of samples.
"""

import os
import pickle
import tarfile

import numpy as np

from utils.download import download_dataset
from utils.errors import UserError

ARCHIVE_NAME = "cifar-100-python.tar.gz"
CIFAR100_URL = "https://dataset.bj.bcebos.com/cifar/" + ARCHIVE_NAME
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MODES = ("train", "test")


def default_archive_path():
    """Where Paddle's own ``Cifar100`` dataset caches the archive."""
    from paddle.dataset.common import DATA_HOME

    return os.path.join(DATA_HOME, "cifar", ARCHIVE_NAME)


def locate_cifar100(path=None):
    """Return the archive or folder to read; download through Paddle when ``path`` is unset."""
    fix = (f"download {CIFAR100_URL} on a machine with internet and pass "
           f"-o data.path=/path/to/{ARCHIVE_NAME} (the archive or its extracted folder)")
    if path is not None:
        if not os.path.exists(path):
            raise UserError(f"data.path {path} does not exist; {fix}")
        return path
    cached = default_archive_path()
    if os.path.isfile(cached):
        return cached
    return download_dataset(CIFAR100_URL, "cifar", CIFAR100_MD5,
                            f"CIFAR-100 ({cached})", fix)


def _read_members(path):
    """Yield ``(name, file object)`` for the members of an archive or folder."""
    if os.path.isdir(path):
        inner = os.path.join(path, "cifar-100-python")
        root = inner if os.path.isdir(inner) else path
        for name in sorted(os.listdir(root)):
            with open(os.path.join(root, name), "rb") as handle:
                yield name, handle
        return
    with tarfile.open(path, mode="r") as archive:
        members = sorted(m.name for m in archive if m.isfile())
        for name in members:
            yield name, archive.extractfile(name)


def _load_pickle(handle):
    return pickle.load(handle, encoding="bytes")


def load_cifar100(path, mode):
    """Read one split: uint8 images ``[N, 32, 32, 3]`` (RGB, HWC) and int64 fine labels ``[N]``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images, labels = [], []
    for name, handle in _read_members(path):
        if mode not in name:
            continue
        batch = _load_pickle(handle)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        batch_labels = batch.get(b"labels", batch.get(b"fine_labels"))
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not images:
        raise UserError(f"no '{mode}' split found in {path}; is it the {ARCHIVE_NAME} archive?")
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def cifar100_class_names(path):
    """The 100 fine class names from the archive's ``meta`` member."""
    for name, handle in _read_members(path):
        if os.path.basename(name) == "meta":
            meta = _load_pickle(handle)
            return [n.decode("utf-8") for n in meta[b"fine_label_names"]]
    raise UserError(f"no 'meta' member in {path}; is it the {ARCHIVE_NAME} archive?")
