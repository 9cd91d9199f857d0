"""Cosine decay from the stage's learning rate to ``end_lr`` over the stage (the R-Drop
authors' ViT fine-tuning)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.schedules import ScheduleKind
from utils.schema import Node, Section, key

if TYPE_CHECKING:
    import paddle


class CosineConfig(Node):
    """``stages.N.lr_schedule`` with ``name: cosine``."""

    name: str
    end_lr: float = key(0.0, minimum=0.0)


def build(cfg: CosineConfig, lr: float, steps: int,
          scale: float) -> paddle.optimizer.lr.CosineAnnealingDecay:
    """Paddle's CosineAnnealingDecay over ``steps``."""
    import paddle  # here: a config is read before Paddle is imported (its flags)

    return paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=lr, T_max=steps,
                                                    eta_min=cfg.end_lr * scale)


SCHEDULE = ScheduleKind(
    name="cosine",
    section=Section.of(CosineConfig),
    build=build,
    describe=lambda cfg: f"cosine decay to {cfg.end_lr:g} over the stage")
