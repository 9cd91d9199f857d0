"""CIFAR-100 reader: the ``cifar-100-python`` archive as uint8 arrays.

Reads the same members, in the same order, as ``paddle.vision.datasets.Cifar100``
and returns the same bytes, but as two arrays instead of a list of samples.
"""

import os
import tarfile
import zlib

import numpy as np

from utils.download import download_dataset
from utils.errors import UserError
from utils.safe_pickle import safe_unpickle

ARCHIVE_NAME = "cifar-100-python.tar.gz"
CIFAR100_URL = "https://dataset.bj.bcebos.com/cifar/" + ARCHIVE_NAME
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MODES = ("train", "test")
IMAGE_BYTES = 3 * 32 * 32
# What a damaged archive raises while it is read: cut short, bad gzip, bad tar.
DAMAGED = (tarfile.TarError, EOFError, zlib.error, OSError)


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


def _members(path, wanted):
    """``(name, unpickled content)`` of the members whose name ``wanted`` accepts; a damaged
    archive is one clear error."""
    try:
        for name, handle in _read_members(path):
            if wanted(name):
                yield name, safe_unpickle(handle, f"CIFAR member {name} of {path}",
                                          encoding="bytes")
    except DAMAGED as exc:
        raise UserError(f"{path} is damaged or truncated ({exc.__class__.__name__}: {exc}); "
                        f"download {ARCHIVE_NAME} again") from None


def _batch_arrays(batch, source):
    """Images ``[N, 32, 32, 3]`` and labels ``[N]`` of one CIFAR batch, checked."""
    labels = batch.get(b"labels", batch.get(b"fine_labels")) if isinstance(batch, dict) else None
    if labels is None or b"data" not in batch:
        raise UserError(f"{source} is not a CIFAR batch (no data and labels)")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or data.dtype != np.uint8:
        raise UserError(f"{source} holds data of shape {list(data.shape)} and type {data.dtype}; "
                        f"CIFAR images are uint8 rows of 3x32x32 = {IMAGE_BYTES} values")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),):
        raise UserError(f"{source} has {len(data)} images but labels of shape {list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar100(path, mode):
    """Read one split: uint8 images ``[N, 32, 32, 3]`` (RGB, HWC) and int64 fine labels ``[N]``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images, labels = [], []
    for name, batch in _members(path, lambda name: mode in name):
        batch_images, batch_labels = _batch_arrays(batch, f"CIFAR member {name} of {path}")
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise UserError(f"no '{mode}' split found in {path}; is it the {ARCHIVE_NAME} archive?")
    images, labels = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if len(labels) == 0:
        raise UserError(f"the '{mode}' split in {path} is empty; download {ARCHIVE_NAME} again")
    return images, labels


def cifar100_class_names(path):
    """The 100 fine class names from the archive's ``meta`` member."""
    for name, meta in _members(path, lambda name: os.path.basename(name) == "meta"):
        names = meta.get(b"fine_label_names") if isinstance(meta, dict) else None
        if names is None:
            raise UserError(f"CIFAR member {name} of {path} has no fine_label_names")
        return [n.decode("utf-8") for n in names]
    raise UserError(f"no 'meta' member in {path}; is it the {ARCHIVE_NAME} archive?")
