"""Images already in NumPy arrays: ``data.path/train.npz`` and ``test.npz`` (and optionally
``val.npz``), each with ``images`` (uint8, ``[N, H, W, 3]`` RGB or ``[N, H, W]`` grey) and
``labels`` (integers ``[N]``); ``train.npz`` may name the classes in ``class_names``
(strings ``[num_classes]``). Written by ``numpy.savez(path, images=..., labels=...)``.

The arrays are read without pickle (``allow_pickle=False``): an archive cannot run code."""

from __future__ import annotations

import os
import zipfile
from typing import Optional

import numpy as np

from data.formats import DataFormat
from data.sources import Split, as_source
from utils.errors import UserError
from utils.io.files import path_problem, read_error_words
from utils.schema import DataConfig

LAYOUT = ("PATH/train.npz and PATH/test.npz (optionally PATH/val.npz), each with 'images' "
          "(uint8 [N, H, W, 3] or [N, H, W]) and 'labels' (integers [N]), as numpy.savez "
          "writes them")


def _file(data_cfg: DataConfig, mode: str) -> str:
    return os.path.join(data_cfg.path, f"{mode}.npz")


def _arrays(path: str, keys: Optional[tuple] = None) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (only ``keys`` of them when given: the others are not read), or
    one :class:`UserError` that says what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files if keys is None or key in keys}
    except OSError as exc:
        words = read_error_words(exc)
        raise UserError(f"{path} cannot be read ({words or exc}); data.name=npz reads "
                        f"{LAYOUT.replace('PATH', os.path.dirname(path))}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path} is not a NumPy .npz archive of plain arrays ({exc}); write it "
                        f"with numpy.savez(path, images=..., labels=...)") from None


def read_split(data_cfg: DataConfig, mode: str,
               num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
    """The images and labels of ``mode``.npz (``None`` for a missing ``val.npz``), checked."""
    path = _file(data_cfg, mode)
    if mode == "val" and path_problem(path):
        return None, []
    arrays = _arrays(path)
    missing = [key for key in ("images", "labels") if key not in arrays]
    if missing:
        raise UserError(f"{path} has no {' or '.join(repr(k) for k in missing)} array (it has "
                        f"{', '.join(arrays) or 'none'}); save them as images=..., labels=...")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:  # grey: the model reads RGB
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 \
            or 0 in images.shape:
        raise UserError(f"{path}: 'images' is {images.dtype} {list(images.shape)}; it must be "
                        f"uint8 [N, H, W, 3] (RGB) or [N, H, W] (grey), N > 0")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] \
            or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: 'labels' is {labels.dtype} {list(labels.shape)}; it must "
                        f"be integers [{images.shape[0]}], one per image")
    names = _names(arrays, path) if mode == "train" else class_names(data_cfg, 0)
    return Split(as_source(images), labels.astype(np.int64)), names


def class_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
    """``class_names`` of ``train.npz`` when it has them (strings), else none."""
    path = _file(data_cfg, "train")
    return [] if path_problem(path) else _names(_arrays(path, ("class_names",)), path)


def _names(arrays, path):
    names = arrays.get("class_names")
    if names is None:
        return []
    if names.ndim != 1 or names.dtype.kind != "U":
        raise UserError(f"{path}: 'class_names' is {names.dtype} {list(names.shape)}; it must "
                        f"be strings [num_classes]")
    return [str(name) for name in names]


def files(data_cfg: DataConfig, num_classes: int) -> list[tuple[str, str]]:
    """The .npz files a run reads."""
    return [(f"{mode}.npz", _file(data_cfg, mode)) for mode in ("train", "val", "test")
            if not path_problem(_file(data_cfg, mode))]


FORMAT = DataFormat(
    name="npz", read_split=read_split, class_names=class_names, files=files,
    source=lambda data_cfg: data_cfg.path,
    reads="data.name=npz reads " + LAYOUT, needs_path=True,
    own_validation=lambda data_cfg: not path_problem(_file(data_cfg, "val")))
