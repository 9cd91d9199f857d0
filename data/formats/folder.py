"""Your images in class folders: ``data.path/{train,test}[/val]/<class>/.../<image>``
(:mod:`data.folders`)."""

from __future__ import annotations

import os
from typing import Optional

from data import folders
from data.formats import DataFormat
from data.sources import Split
from utils.errors import UserError
from utils.schema import DataConfig


def read_split(data_cfg: DataConfig, mode: str,
               num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
    """Split ``mode``'s images, labelled by the training split's sorted class folders."""
    classes = folders.class_folders(folders.split_folder(data_cfg, "train"))
    found = folders.folder_split(data_cfg, mode, classes)
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(f"{data_cfg.path}/train has {len(classes)} class folders "
                        f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                        f"but model.num_classes={num_classes}; set model.num_classes="
                        f"{len(classes)}")
    return (None if found is None else Split(*found)), classes


def class_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
    """The training split's class folders, when it is here."""
    train = os.path.join(data_cfg.path, "train")
    return folders.class_folders(train) if os.path.isdir(train) else []


FORMAT = DataFormat(
    name="folder", read_split=read_split, class_names=class_names,
    files=lambda data_cfg, num_classes: folders.folder_files(data_cfg),
    source=lambda data_cfg: data_cfg.path,
    reads="data.name=folder reads " + folders.FOLDER_LAYOUT,
    needs_path=True,
    own_validation=lambda data_cfg: os.path.isdir(os.path.join(data_cfg.path, "val")))
