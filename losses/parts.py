"""The parts of the training loss a criterion returns, declared once: the epoch's sums, the
``train_<part>`` fields of ``metrics.jsonl``, the checkpoints, the epoch line and the charts
all go through this list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LossPart:
    """A part of the loss: its ``name`` (the criterion's key, ``train_<name>`` in the
    records), what it is, and whether every criterion returns it (``always``; a checkpoint's
    sums must hold those)."""

    name: str
    meaning: str
    always: bool = True


PARTS = (
    LossPart("loss", "the objective the optimizer minimises"),
    LossPart("ce", "cross-entropy with the labels (R-Drop: of both dropout copies)"),
    LossPart("kl", "R-Drop's symmetric KL between the two copies' predictions (0 without)"),
    LossPart("distill", "the distillation head's loss against the teacher", always=False),
)
NAMES = tuple(part.name for part in PARTS)
ALWAYS = tuple(part.name for part in PARTS if part.always)


def value_text(value: Optional[float]) -> str:
    """A part's mean as the epoch line prints it."""
    return "n/a" if value is None else f"{value:.4f}"
