"""scikit-learn's handwritten digits (1,797 8×8 scans, 10 classes) as 32×32 RGB images: the
CPU demo's data, shipped with scikit-learn (:mod:`data.digits`)."""

from __future__ import annotations

from typing import Optional

from data.digits import digits_class_names, load_digits
from data.formats import DataFormat
from data.sources import Split, as_source
from utils.schema import DataConfig


def read_split(data_cfg: DataConfig, mode: str,
               num_classes: Optional[int] = None) -> tuple[Optional[Split], list[str]]:
    """The digits' fixed train (1,437) or test (360) split; no validation split of its own."""
    if mode == "val":
        return None, []
    images, labels = load_digits(mode)
    return Split(as_source(images), labels), digits_class_names()


FORMAT = DataFormat(
    name="digits", read_split=read_split,
    class_names=lambda data_cfg, num_classes: digits_class_names(),
    files=lambda data_cfg, num_classes: None,  # in scikit-learn's package
    source=lambda data_cfg: "scikit-learn's handwritten digits (bundled with scikit-learn)",
    reads="data.name=digits reads scikit-learn's bundled digits; data.path is not used",
    split_sizes=(1437, 360))
