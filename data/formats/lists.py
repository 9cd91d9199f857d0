"""Your images named in PaddleClas list files: lines of ``relative/path label`` under
``data.path``, an optional label-names file (:mod:`data.folders`)."""

from __future__ import annotations

from typing import Optional

from data import folders
from data.formats import DataFormat
from data.sources import Split
from utils.schema import DataConfig


def read_split(data_cfg: DataConfig, mode: str,
               num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
    """The images and labels of ``data.<mode>_list`` (``None`` for an unset ``val_list``)."""
    found = folders.list_split(data_cfg, f"{mode}_list", num_classes)
    return (None if found is None else Split(*found)), folders.label_names(data_cfg, num_classes)


FORMAT = DataFormat(
    name="list", read_split=read_split, class_names=folders.label_names,
    files=folders.list_files,
    source=lambda data_cfg: data_cfg.path,
    reads="data.name=list reads lines of 'relative/path label' from files under it",
    needs_path=True,
    own_validation=lambda data_cfg: data_cfg.val_list is not None)
