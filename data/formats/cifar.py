"""CIFAR-100 and CIFAR-10 in their Python pickle archives (:mod:`data.cifar`): ``data.path``
(the archive or its folder), else a mounted AI Studio dataset, else Paddle's cache, where a
run downloads it when it is nowhere."""

from __future__ import annotations

from typing import Optional

from data.cifar import (
    CIFAR10,
    CIFAR100,
    Cifar,
    archive_here,
    cifar_class_names,
    cifar_files,
    load_cifar,
    locate_cifar,
)
from data.formats import DataFormat
from data.sources import Split, as_source
from utils.schema import DataConfig


def cifar_format(name: str, cifar: Cifar) -> DataFormat:
    """The format ``name`` of the archive ``cifar``."""

    def read_split(data_cfg: DataConfig, mode: str,
                   num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
        if mode == "val":
            return None, []
        path = locate_cifar(cifar, data_cfg.path)
        images, labels = load_cifar(cifar, path, mode)
        return Split(as_source(images), labels), cifar_class_names(cifar, path)

    def class_names(data_cfg: DataConfig, num_classes: int) -> list[str]:
        archive = archive_here(cifar, data_cfg.path)  # the one a run reads
        return [] if archive is None else cifar_class_names(cifar, archive)

    def source(data_cfg: DataConfig) -> Optional[str]:
        return archive_here(cifar, data_cfg.path)

    def download(data_cfg: DataConfig) -> Optional[tuple[str, str, str]]:
        if data_cfg.path is not None or archive_here(cifar) is not None:
            return None
        return cifar.title, cifar.url, "-o data.path=/path/to/"

    return DataFormat(
        name=name, read_split=read_split, class_names=class_names,
        files=lambda data_cfg, num_classes: cifar_files(cifar, data_cfg.path),
        source=source, reads=cifar.fetch_advice, split_sizes=(50_000, 10_000),
        download=download)


FORMAT = (cifar_format("cifar100", CIFAR100), cifar_format("cifar10", CIFAR10))
