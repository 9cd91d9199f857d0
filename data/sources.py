"""Where a split's images come from: uint8 arrays in memory, or image files read one at a time.

Both answer ``len``, ``take(indices)`` (a sub-source, nothing read), ``read(index)`` (one uint8
``[H, W, 3]`` RGB image) and ``name(index)``. A file source holds only its paths, packed in
two NumPy arrays (the UTF-8 bytes and their offsets): loader workers share them with the
training process page for page, where a list of a million Python strings would be copied
into every worker as their reference counts are touched.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import NamedTuple, Optional, Union

import numpy as np

from data.images import read_rgb


def as_source(images: Union[np.ndarray, ArrayImages, FileImages]) -> Union[ArrayImages, FileImages]:
    """``images`` as a source: a uint8 array is wrapped, a source is returned as it is."""
    return images if isinstance(images, (ArrayImages, FileImages)) else ArrayImages(images)


class ArrayImages:
    """uint8 ``[N, H, W, 3]`` images held in memory (CIFAR, the digits demo)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self):
        return len(self.images)

    def take(self, indices: Union[np.ndarray, slice]) -> ArrayImages:
        """The images at ``indices`` (an index array or a slice)."""
        return ArrayImages(self.images[indices])

    def read(self, index: int) -> np.ndarray:
        """Image ``index``."""
        return self.images[index]

    def name(self, index: int) -> str:
        """How a message names image ``index``."""
        return f"image {index}"

    def ship_size(self, model_size: int) -> int:
        """The side of what the host sends for a model of ``model_size``: the stored side (the
        images are already small; the device resizes them)."""
        return self.images.shape[1]


class FileImages:
    """Image files under ``root``, named by paths relative to it, decoded when read."""

    def __init__(self, root: str, relative_paths: Optional[list[str]] = None,
                 packed: Optional[tuple] = None) -> None:
        self.root = root
        if packed is None:
            encoded = [os.fsencode(p) for p in relative_paths]
            ends = np.cumsum([len(p) for p in encoded], dtype=np.int64)
            blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else \
                np.zeros(0, np.uint8)
            # One flag per file, shared by every subset and loader worker: warned about.
            packed = (blob, ends - [len(p) for p in encoded], ends, np.arange(len(encoded)),
                      multiprocessing.RawArray("B", max(len(encoded), 1)))
        self.blob, self.starts, self.ends, self.ids, self.warned = packed

    def __len__(self):
        return len(self.starts)

    def take(self, indices: Union[np.ndarray, slice]) -> FileImages:
        """The files at ``indices`` (an index array or a slice); the paths are not copied."""
        return FileImages(self.root, packed=(self.blob, self.starts[indices], self.ends[indices],
                                             self.ids[indices], self.warned))

    def relative_path(self, index: int) -> str:
        """The path of file ``index`` relative to the root."""
        return os.fsdecode(self.blob[self.starts[index]:self.ends[index]].tobytes())

    def name(self, index: int) -> str:
        """The file's full path."""
        return os.path.join(self.root, self.relative_path(index))

    def read(self, index: int) -> np.ndarray:
        """File ``index`` decoded to uint8 RGB (:func:`data.images.read_rgb`)."""
        return read_rgb(self.name(index))

    def ship_size(self, model_size: int) -> int:
        """The side of what the host sends: the model's (files have any size)."""
        return model_size

    def first_failure(self, index: int) -> int:
        """Whether file ``index`` is met unreadable for the first time in this process tree."""
        slot = self.ids[index]
        first = not self.warned[slot]
        self.warned[slot] = 1
        return first


class Split(NamedTuple):
    """A split's images (a :mod:`data.sources` source) and int64 labels."""

    images: object
    labels: np.ndarray

    def take(self, indices: Union[np.ndarray, slice]) -> Split:
        """The samples at ``indices`` (an index array or a slice)."""
        return Split(self.images.take(indices), self.labels[indices])
