"""Your own images: class folders (``data.name: folder``) and PaddleClas list files
(``data.name: list``), read as lists of files; nothing is decoded here.

Folder layout: ``data.path/{train,test}[/val]/<class>/.../<image>``; the classes are the
sorted names of the training split's class folders. List layout: lines of
``relative/path label`` under the root ``data.path`` (PaddleClas's ``train_list.txt``),
and optionally a label-names file of ``index name`` lines (PaddleClas's
``class_id_map_file``). Hidden files and folders (``.ipynb_checkpoints``, macOS ``._x.jpg``)
are passed over, and only regular files with a raster-image extension are listed.
"""

import os

import numpy as np

from data.images import IMAGE_EXTENSIONS, is_image_name
from data.sources import FileImages
from utils.errors import UserError

SPLIT_FOLDERS = ("train", "val", "test")
FOLDER_LAYOUT = "PATH/train/<class>/<image> and PATH/test/<class>/<image> (optionally PATH/val/)"


def split_folder(data_cfg, split):
    """The folder of ``split`` under ``data.path``, or ``None`` for an absent ``val``."""
    folder = os.path.join(data_cfg.path, split)
    if os.path.isdir(folder):
        return folder
    if split == "val":
        return None
    raise UserError(f"data.path {data_cfg.path} has no {split}/ folder; data.name=folder reads "
                    f"{FOLDER_LAYOUT.replace('PATH', data_cfg.path)}")


def class_folders(folder):
    """The sorted names of the class folders in ``folder`` (hidden ones passed over)."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries
                           if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UserError(f"cannot list {folder} ({exc.strerror})") from None
    if not names:
        raise UserError(f"{folder} has no class folders; data.name=folder reads "
                        f"{FOLDER_LAYOUT}")
    return names


def _identity(path):
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _image_files(folder, prefix, ignored, seen):
    """Paths (``prefix/...``) of the image files under ``folder``, recursively, sorted;
    ``ignored`` counts the regular files that are not images. Folders in ``seen`` (device
    and inode: the split and class folders, those already read) are not entered, so a
    symbolic link up the tree or into another class reads nothing twice."""
    found = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot list {folder} ({exc.strerror})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relative = f"{prefix}/{entry.name}"
        if entry.is_dir():
            if _identity(entry.path) not in seen:
                seen.add(_identity(entry.path))
                found += _image_files(entry.path, relative, ignored, seen)
        elif entry.is_file():  # regular files only (a pipe named x.png would block)
            if is_image_name(entry.name):
                found.append(relative)
            else:
                ignored[0] += 1
    return found


def folder_split(data_cfg, split, classes):
    """``(FileImages, labels)`` of a split folder, or ``None`` for an absent ``val``. Class
    folders with no images, and class folders that the training split does not have, are
    one error each."""
    folder = split_folder(data_cfg, split)
    if folder is None:
        return None
    index, present = {name: i for i, name in enumerate(classes)}, class_folders(folder)
    unknown = [name for name in present if name not in index]
    if unknown:
        raise UserError(f"{folder} has class folders that {data_cfg.path}/train lacks: "
                        f"{', '.join(unknown[:5])}; every class needs training images")
    paths, labels, empty, ignored = [], [], [], [0]
    seen = {_identity(folder)} | {_identity(os.path.join(folder, name)) for name in present}
    for name in present:
        files = _image_files(os.path.join(folder, name), name, ignored, seen)
        if not files:
            empty.append(name)
        paths += files
        labels.append(np.full(len(files), index[name], dtype=np.int64))
    if empty:
        raise UserError(f"class folders with no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{folder}: {', '.join(empty[:10])}; add images or remove them")
    if ignored[0]:
        print(f"{folder}: {ignored[0]} files that are not images passed over", flush=True)
    return FileImages(folder, paths), np.concatenate(labels)


def list_path(data_cfg, key):
    """The list file of ``data.<key>`` (relative to ``data.path``), or ``None`` if unset."""
    name = getattr(data_cfg, key)
    return None if name is None else os.path.join(data_cfg.path, name)


def list_split(data_cfg, key, num_classes):
    """``(FileImages, labels)`` of the list file of ``data.<key>``, or ``None`` if unset. A
    line that does not read ``path label``, names a file that is missing or not an image, or
    has a label outside ``[0, num_classes)`` is one error naming the file and line."""
    path = list_path(data_cfg, key)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"data.{key}: {path} is not a file; data.name=list reads lines of "
                        f"'relative/path label' from files under data.path")
    paths, labels = [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{where} does not read 'relative/path label': {line.strip()!r}")
            name, label = parts[0], int(parts[1])
            if not 0 <= label < num_classes:
                raise UserError(f"{where} has label {label}, outside [0, {num_classes}); fix the "
                                f"line or set model.num_classes")
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


def label_names(data_cfg, num_classes):
    """The class names of ``data.label_names`` (lines of ``index name``, every index of
    ``[0, num_classes)`` once), or the indices when it is unset."""
    if data_cfg.label_names is None:
        return [str(i) for i in range(num_classes)]
    path = os.path.join(data_cfg.path or "", data_cfg.label_names)
    names = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [(n, line.strip()) for n, line in enumerate(handle, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"data.label_names: cannot read {path} ({exc})") from None
    for number, line in lines:
        index, _, name = line.partition(" ")
        if not index.isdigit() or not name.strip() or int(index) in names:
            raise UserError(f"{path} line {number} does not read 'index name' with a new "
                            f"index: {line!r}")
        names[int(index)] = name.strip()
    if sorted(names) != list(range(num_classes)):
        raise UserError(f"{path} names classes {min(names)}..{max(names)} ({len(names)} of "
                        f"them); model.num_classes={num_classes} needs each of 0.."
                        f"{num_classes - 1} once")
    return [names[i] for i in range(num_classes)]
