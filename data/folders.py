"""Your own images: class folders (``data.name: folder``) and PaddleClas list files
(``data.name: list``), read as lists of files; nothing is decoded here.

Folder layout: ``data.path/{train,test}[/val]/<class>/.../<image>``; the classes are the
sorted names of the training split's class folders. List layout: lines of
``relative/path label`` under the root ``data.path`` (PaddleClas's ``train_list.txt``),
and optionally a label-names file of ``index name`` lines (PaddleClas's
``class_id_map_file``). Hidden files and folders (``.ipynb_checkpoints``, macOS ``._x.jpg``)
are passed over, and only regular files with a raster-image extension are listed.
"""

from __future__ import annotations

import os
import unicodedata
from typing import TYPE_CHECKING, Optional

import numpy as np

from data.images import IMAGE_EXTENSIONS, file_identity, image_files, is_image_name
from data.sources import FileImages
from utils.errors import UserError
from utils.io.files import path_problem, read_text_lines

if TYPE_CHECKING:
    from utils.schema import DataConfig

SPLIT_FOLDERS = ("train", "val", "test")
FOLDER_LAYOUT = "PATH/train/<class>/<image> and PATH/test/<class>/<image> (optionally PATH/val/)"


def split_folder(data_cfg: DataConfig, split: str) -> Optional[str]:
    """The folder of ``split`` under ``data.path``, or ``None`` for an absent ``val``."""
    folder = os.path.join(data_cfg.path, split)
    if os.path.isdir(folder):
        return folder
    problem = path_problem(data_cfg.path, "folder")
    if problem:
        raise UserError(f"data.path {data_cfg.path} {problem}; data.name=folder reads "
                        f"{FOLDER_LAYOUT.replace('PATH', data_cfg.path)}")
    if split == "val":
        return None
    raise UserError(f"data.path {data_cfg.path} has no {split}/ folder; data.name=folder reads "
                    f"{FOLDER_LAYOUT.replace('PATH', data_cfg.path)}")


def class_folders(folder: str) -> list[str]:
    """The sorted names of the class folders in ``folder`` (hidden ones passed over). A name
    that is not UTF-8, two names that are one after Unicode normalisation (NFC: macOS writes
    "é" as e + accent, others as one character), and a class folder that is a link to another
    (the same images under two labels) are one error each."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries
                           if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UserError(f"cannot list {folder} ({exc.strerror})") from None
    if not names:
        raise UserError(f"{folder} has no class folders; data.name=folder reads "
                        f"{FOLDER_LAYOUT}")
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"the class folder {name!r} in {folder} is not a UTF-8 name; "
                            f"rename it") from None
    _distinct(names, lambda name: unicodedata.normalize("NFC", name),
              lambda a, b: f"the class folders {a!r} and {b!r} in {folder} differ only in "
                           f"their Unicode normalisation (NFC/NFD); they are one name: merge "
                           f"or rename them")
    _distinct(names, lambda name: file_identity(os.path.join(folder, name)),
              lambda a, b: f"the class folders {a!r} and {b!r} in {folder} are the same folder "
                           f"(a symbolic link): their images would be read under two labels; "
                           f"remove the link")
    return names


def _distinct(names, key, message):
    """One :class:`UserError` (``message(first, second)``) for two names with one ``key``."""
    first = {}
    for name in names:
        if key(name) in first:
            raise UserError(message(first[key(name)], name))
        first[key(name)] = name


def _nfc(name):
    return unicodedata.normalize("NFC", name)


def _is_number(text):
    """Whether ``text`` is a count in the digits 0-9 (``str.isdigit`` also takes "٣" and "³",
    which ``int`` reads as 3)."""
    return text.isascii() and text.isdigit()


def folder_split(data_cfg: DataConfig, split: str,
                 classes: list[str]) -> Optional[tuple[FileImages, np.ndarray]]:
    """``(FileImages, labels)`` of a split folder, or ``None`` for an absent ``val``. Class
    folders with no images, and class folders that the training split does not have, are
    one error each."""
    folder = split_folder(data_cfg, split)
    if folder is None:
        return None
    index = {_nfc(name): i for i, name in enumerate(classes)}  # NFC: macOS writes NFD
    present = class_folders(folder)
    unknown = [name for name in present if _nfc(name) not in index]
    if unknown:
        raise UserError(f"{folder} has class folders that {data_cfg.path}/train lacks: "
                        f"{', '.join(unknown[:5])}; every class needs training images")
    by_class, ignored = _class_files(folder, present)
    empty = [name for name, files in zip(present, by_class) if not files]
    if empty:
        raise UserError(f"class folders with no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{folder}: {', '.join(empty[:10])}; add images or remove them")
    if ignored:
        print(f"{folder}: {ignored} files that are not images passed over", flush=True)
    labels = [np.full(len(files), index[_nfc(name)], dtype=np.int64)
              for name, files in zip(present, by_class)]
    return FileImages(folder, [path for files in by_class for path in files]), \
        np.concatenate(labels)


def _class_files(folder, present):
    """The image files of each class folder ``present`` in the split ``folder`` (paths
    relative to it, as :func:`folder_split` reads them), and how many other files were
    passed over."""
    ignored = [0]
    seen = {file_identity(folder)} | {file_identity(os.path.join(folder, name))
                                       for name in present}
    by_class = [image_files(os.path.join(folder, name), name, ignored, seen)
                for name in present]
    return by_class, ignored[0]


def folder_files(data_cfg: DataConfig) -> list[tuple[str, str]]:
    """``(name under data.path, path)`` of every image a run on class folders reads, listed
    as the reader lists them (hidden and non-image files passed over, links followed)."""
    found = []
    for split in SPLIT_FOLDERS:
        folder = split_folder(data_cfg, split)
        if folder is None:
            continue
        for files in _class_files(folder, class_folders(folder))[0]:
            found += [(f"{split}/{name}", os.path.join(folder, name)) for name in files]
    return found


def list_path(data_cfg: DataConfig, key: str) -> Optional[str]:
    """The list file of ``data.<key>`` (relative to ``data.path``), or ``None`` if unset."""
    name = getattr(data_cfg, key)
    return None if name is None else os.path.join(data_cfg.path, name)


def list_split(data_cfg: DataConfig, key: str,
               num_classes: int) -> Optional[tuple[FileImages, np.ndarray]]:
    """``(FileImages, labels)`` of the list file of ``data.<key>``, or ``None`` if unset. A
    line that does not read ``path label``, names a file that is missing or not an image, or
    has a label outside ``[0, num_classes)`` is one error naming the file and line."""
    path = list_path(data_cfg, key)
    if path is None:
        return None
    if path_problem(path) == "does not exist":
        raise UserError(f"data.{key}: {path} does not exist; data.name=list reads lines of "
                        f"'relative/path label' from files under data.path")
    paths, labels = [], []
    for number, line in enumerate(read_text_lines(path, f"data.{key}:", "surrogateescape"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not _is_number(parts[1].removeprefix("-")):
            raise UserError(f"{where} does not read 'relative/path label' (a label of the digits "
                            f"0-9): {line.strip()!r}")
        name, label = parts[0], int(parts[1])
        if not 0 <= label < num_classes:
            raise UserError(f"{where} has label {label}, outside [0, {num_classes}); fix the "
                            f"line or set model.num_classes")
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise UserError(f"{where} names {name}, which lies outside data.path; list "
                            f"files name images by their path under data.path")
        if not is_image_name(os.path.basename(name)):
            raise UserError(f"{where} names {name}, which has no image extension "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        if not os.path.isfile(os.path.join(data_cfg.path, name)):
            raise UserError(f"{where} names {name}, which is not a file under "
                            f"{data_cfg.path}")
        paths.append(name)
        labels.append(label)
    if not paths:
        raise UserError(f"data.{key}: {path} lists no images")
    return FileImages(data_cfg.path, paths), np.array(labels, dtype=np.int64)


def list_files(data_cfg: DataConfig, num_classes: int) -> list[tuple[str, str]]:
    """``(name under data.path, path)`` of every file a run on list files reads: the lists,
    the label names and the images the lists name."""
    found = []
    for key in ("train_list", "val_list", "test_list", "label_names"):
        path = list_path(data_cfg, key)
        if path is None:
            continue
        found.append((getattr(data_cfg, key), path))
        if key != "label_names":
            images = list_split(data_cfg, key, num_classes)[0]
            found += [(name, os.path.join(data_cfg.path, name))
                      for name in map(images.relative_path, range(len(images)))]
    return found


def label_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
    """The class names of ``data.label_names`` (lines of ``index name``, every index of
    ``[0, num_classes)`` once), or the indices when it is unset."""
    if data_cfg.label_names is None:
        return [str(i) for i in range(num_classes)]
    path = os.path.join(data_cfg.path or "", data_cfg.label_names)
    names, lines = {}, read_text_lines(path, "data.label_names:")
    for number, line in ((n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()):
        index, _, name = line.partition(" ")
        if not _is_number(index) or not name.strip():
            raise UserError(f"{path} line {number} does not read 'index name' (an index of the "
                            f"digits 0-9, a space, a name): {line!r}")
        if int(index) in names:
            raise UserError(f"{path} line {number} gives index {int(index)} a second name "
                            f"({name.strip()!r}; it is already {names[int(index)]!r})")
        names[int(index)] = name.strip()
    _distinct([names[i] for i in sorted(names)], _nfc,
              lambda a, b: f"{path} gives two classes one name: {a!r} and {b!r}"
                           + ("" if a == b else " (the same after Unicode normalisation, NFC)"))
    if sorted(names) != list(range(num_classes)):
        raise UserError(f"{path} names classes {min(names)}..{max(names)} ({len(names)} of "
                        f"them); model.num_classes={num_classes} needs each of 0.."
                        f"{num_classes - 1} once")
    return [names[i] for i in range(num_classes)]
