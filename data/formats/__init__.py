"""The data formats a config may name (``data.name``): one module of this package each,
declaring a :class:`DataFormat` (or a tuple of them) as ``FORMAT``. How a format reads its
splits, lists its files, names its classes and what it needs is declared there and nowhere
else; see docs/architecture.md for adding one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from utils.registry import entries_of

if TYPE_CHECKING:
    from data.sources import Split
    from utils.schema import DataConfig


def _no_download(data_cfg: DataConfig) -> None:
    return None


def _no_own_validation(data_cfg: DataConfig) -> bool:
    return False


@dataclass(frozen=True)
class DataFormat:
    """A data format of the recipe.

    ``read_split(data_cfg, mode, num_classes)`` is split ``mode`` (train, val or test) as
    ``(Split, class names)``, the split ``None`` where the data has no such split (``val``:
    only a format with ``own_validation``); ``class_names(data_cfg, num_classes)`` names the
    classes without downloading or decoding anything (fewer names, or none, where it cannot);
    ``files(data_cfg, num_classes)`` lists ``(name, path)`` of every file a run reads, as the
    reader lists them (``None``: nothing on disk to list, e.g. data a package ships);
    ``source(data_cfg)`` says where the data is found now, in words (``None``: not here yet);
    ``reads`` says what ``data.path`` must hold; ``needs_path``: ``data.path`` is required;
    ``own_validation(data_cfg)``: the data brings its own validation split; ``split_sizes``:
    ``(train, test)`` images, known without reading (the cost plan); ``download(data_cfg)``:
    ``(what, url, option)`` of what a run would download, or ``None``.
    """

    name: str
    read_split: Callable[[DataConfig, str, Optional[int]], tuple[Optional[Split], list[str]]]
    class_names: Callable[[DataConfig, int], list[str]]
    files: Callable[[DataConfig, int], Optional[list[tuple[str, str]]]]
    source: Callable[[DataConfig], Optional[str]]
    reads: str
    needs_path: bool = False
    own_validation: Callable[[DataConfig], bool] = _no_own_validation
    split_sizes: Optional[tuple[int, int]] = None
    download: Callable[[DataConfig], Optional[tuple[str, str, str]]] = _no_download


FORMATS: dict[str, DataFormat] = entries_of(__name__, "FORMAT")
