"""CIFAR-10 and CIFAR-100 readers: the ``cifar-10-python`` / ``cifar-100-python`` archives
as uint8 arrays.

Reads the same members, in the same order, as ``paddle.vision.datasets.Cifar10`` /
``Cifar100`` and returns the same bytes, but as two arrays instead of a list of samples.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.errors import UserError
from utils.io.download import download_dataset
from utils.io.files import path_problem, read_error_words
from utils.io.safe_pickle import safe_unpickle

MODES = ("train", "test")
IMAGE_BYTES = 3 * 32 * 32
# What a damaged archive raises while it is read: cut short, bad gzip, bad tar.
DAMAGED = (tarfile.TarError, EOFError, zlib.error, OSError)
# The real archives have at most 8 members, each smaller than the archive (images barely
# compress): a member far larger than its archive is a decompression bomb, many members no
# CIFAR.
MAX_MEMBERS, MAX_EXPANSION = 1000, 4


@dataclass(frozen=True)
class Cifar:
    """One CIFAR archive: its file, where Paddle downloads it, the members of each split
    (full-match patterns of their file names), and where the class names are."""

    title: str
    archive: str
    folder: str
    md5: str
    members: dict
    names_key: bytes

    @property
    def url(self) -> str:
        """Where Paddle's own dataset downloads the archive."""
        return "https://dataset.bj.bcebos.com/cifar/" + self.archive

    @property
    def fetch_advice(self) -> str:
        """How to give a run the archive by hand."""
        return (f"download {self.url} on a machine with internet and pass -o data.path="
                f"/path/to/{self.archive} (the archive or its extracted folder)")


CIFAR100 = Cifar("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
                 "eb9058c3a382ffc7106e4002c42a8d85",
                 {"train": "train", "test": "test", "meta": "meta"}, b"fine_label_names")
CIFAR10 = Cifar("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                "c58f30108f718f92721af3b95e74349a",
                {"train": r"data_batch_\d+", "test": "test_batch", "meta": "batches.meta"},
                b"label_names")


# Where AI Studio mounts the datasets added to a project (read-only: reset at each start);
# AISTUDIO_DATA in the environment names another folder.
AISTUDIO_DATA = os.environ.get("AISTUDIO_DATA", "/home/aistudio/data")


def default_archive_path(cifar: Cifar) -> str:
    """Where Paddle's own ``Cifar10`` / ``Cifar100`` datasets cache the archive."""
    from paddle.dataset.common import DATA_HOME

    return os.path.join(DATA_HOME, "cifar", cifar.archive)


def _mounted_archives(cifar):
    """The archives of AI Studio datasets mounted under ``AISTUDIO_DATA`` (the public
    CIFAR-100 dataset added to a project lands in ``/home/aistudio/data/dataNNNN/``): the
    first readable one (or ``None``), and the unreadable ones before it with what is wrong."""
    skipped = []
    for path in sorted(glob.glob(os.path.join(glob.escape(AISTUDIO_DATA), "data*",
                                              cifar.archive))):
        problem = path_problem(path) or (None if os.access(path, os.R_OK)
                                         else "cannot be read (permission denied)")
        if problem is None:
            return path, skipped
        skipped.append(f"{path} {problem}")
    return None, skipped


def mounted_archive(cifar: Cifar) -> Optional[str]:
    """The first readable archive of an AI Studio dataset mounted under ``AISTUDIO_DATA``, or
    ``None``."""
    return _mounted_archives(cifar)[0]


def archive_here(cifar: Cifar, path: Optional[str] = None) -> Optional[str]:
    """The archive or folder a run reads without downloading: ``path``, else a mounted AI
    Studio dataset's archive, else Paddle's cache; ``None`` when none is here."""
    if path is not None:
        return None if path_problem(path, "any") else path
    cached = default_archive_path(cifar)
    return mounted_archive(cifar) or (cached if os.path.isfile(cached) else None)


_SAID: set = set()  # the lines locate_cifar has printed in this process


def locate_cifar(cifar: Cifar, path: Optional[str] = None) -> str:
    """Return the archive or folder to read (:func:`archive_here`, the source said in a line
    when it is a mount), downloaded into Paddle's cache when none is here."""
    fix = cifar.fetch_advice
    if path is not None:
        problem = path_problem(path, "any")
        if problem:
            raise UserError(f"data.path {path} {problem}; {fix}")
        return path
    mounted, skipped = _mounted_archives(cifar)
    for line in [f"data: skipped {line}" for line in skipped] + (
            [] if mounted is None else [f"data: {cifar.title} from the AI Studio dataset "
                                        f"mounted at {mounted} (data.path unset)"]):
        if line not in _SAID:  # once per process, not once per split read
            _SAID.add(line)
            print(line, flush=True)
    if mounted is not None:
        return mounted
    cached = default_archive_path(cifar)
    if os.path.isfile(cached):
        return cached
    return download_dataset(cifar.url, "cifar", cifar.md5, f"{cifar.title} ({cached})", fix)


def cifar_files(cifar: Cifar, path: Optional[str] = None) -> Optional[list[tuple[str, str]]]:
    """``(name, path)`` of the files a run reads (:func:`archive_here`): the archive, or the
    members of an extracted folder; ``None`` when the data is not here."""
    source = archive_here(cifar, path)
    if source is None:
        return None
    if not os.path.isdir(source):
        return [(".", source)]
    return [(os.path.relpath(name, source), name) for wanted in cifar.members
            for name in _folder_members(cifar, source, wanted)]


def _read_member(cifar, path, wanted):
    """Yield ``(name, file object)`` for the members of split ``wanted`` (train, test or
    meta) of an archive or folder, sorted by name. Only those regular files are opened: a
    pipe or device in a folder would block, other files are none of the reader's business."""
    pattern = re.compile(cifar.members[wanted])
    if os.path.isdir(path):
        for name in _folder_members(cifar, path, wanted):
            problem = path_problem(name)
            if problem:
                raise UserError(f"CIFAR member {name} {problem}")
            with open(name, "rb") as handle:
                yield name, handle
        return
    limit = MAX_EXPANSION * os.path.getsize(path) + (1 << 20)
    with tarfile.open(path, mode="r") as archive:
        members = []
        for count, member in enumerate(archive):
            if count >= MAX_MEMBERS:
                raise UserError(f"{path} has more than {MAX_MEMBERS} members; it is not the "
                                f"{cifar.archive} archive")
            if member.isfile() and pattern.fullmatch(os.path.basename(member.name)):
                if member.size > limit:
                    raise UserError(f"CIFAR member {member.name} of {path} would unpack to "
                                    f"{member.size} bytes, far more than its archive holds; "
                                    f"refusing to read it")
                members.append(member)
        for member in sorted(members, key=lambda m: m.name):
            yield member.name, archive.extractfile(member)


def _folder_members(cifar, path, wanted):
    """The paths of the members of split ``wanted`` in an extracted folder, sorted."""
    inner = os.path.join(path, cifar.folder)
    folder = inner if os.path.isdir(inner) else path
    pattern = re.compile(cifar.members[wanted])
    return [os.path.join(folder, entry) for entry in sorted(os.listdir(folder))
            if pattern.fullmatch(entry)]


def _members(cifar, path, wanted):
    """``(name, unpickled content)`` of the members of split ``wanted``; a damaged archive
    is one clear error."""
    try:
        for name, handle in _read_member(cifar, path, wanted):
            yield name, safe_unpickle(handle, f"CIFAR member {name} of {path}",
                                      encoding="bytes")
    except DAMAGED as exc:
        words = isinstance(exc, OSError) and read_error_words(exc)
        if words:
            raise UserError(f"{exc.filename or path} {words}") from None
        raise UserError(f"{path} is damaged or truncated ({exc.__class__.__name__}: {exc}); "
                        f"download {cifar.archive} again") from None


def _batch_arrays(batch, source):
    """Images ``[N, 32, 32, 3]`` and labels ``[N]`` of one CIFAR batch, checked."""
    labels = batch.get(b"labels", batch.get(b"fine_labels")) if isinstance(batch, dict) else None
    if labels is None or b"data" not in batch:
        raise UserError(f"{source} is not a CIFAR batch (no data and labels)")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES or data.dtype != np.uint8:
        raise UserError(f"{source} holds data of shape {list(data.shape)} and type {data.dtype}; "
                        f"CIFAR images are uint8 rows of 3x32x32 = {IMAGE_BYTES} values")
    labels = _integers(labels, source)
    if labels.shape != (len(data),):
        raise UserError(f"{source} has {len(data)} images but labels of shape {list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _integers(labels, source):
    """Labels as int64, from a list of Python integers (or an integer array)."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
        return labels.astype(np.int64)
    if isinstance(labels, (list, tuple)) and all(
            type(v) is int and -2 ** 31 <= v < 2 ** 31 for v in labels):
        return np.array(labels, dtype=np.int64).reshape(-1)
    raise UserError(f"{source} has labels that are not a list of integers")


def load_cifar(cifar: Cifar, path: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split: uint8 images ``[N, 32, 32, 3]`` (RGB, HWC) and int64 labels ``[N]``
    (CIFAR-100: the fine labels)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    images, labels = [], []
    for name, batch in _members(cifar, path, mode):
        batch_images, batch_labels = _batch_arrays(batch, f"CIFAR member {name} of {path}")
        images.append(batch_images)
        labels.append(batch_labels)
    if not images:
        raise UserError(f"no '{mode}' split found in {path}; is it the {cifar.archive} archive?")
    images, labels = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if len(labels) == 0:
        raise UserError(f"the '{mode}' split in {path} is empty; download {cifar.archive} again")
    return images, labels


def cifar_class_names(cifar: Cifar, path: str) -> list[str]:
    """The class names (CIFAR-100: the 100 fine ones) from the archive's meta member."""
    key = cifar.names_key.decode()
    for name, meta in _members(cifar, path, "meta"):
        names = meta.get(cifar.names_key) if isinstance(meta, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
            raise UserError(f"CIFAR member {name} of {path} has no {key} list")
        return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    raise UserError(f"no '{cifar.members['meta']}' member in {path}; is it the "
                    f"{cifar.archive} archive?")
