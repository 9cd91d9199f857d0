"""Polynomial decay from the stage's learning rate to ``end_lr`` over the stage (the
original's Momentum stages)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.schedules import ScheduleKind
from utils.schema import Node, Section, key

if TYPE_CHECKING:
    import paddle


class PolynomialConfig(Node):
    """``stages.N.lr_schedule`` with ``name: polynomial``."""

    name: str
    end_lr: float = key(0.0, minimum=0.0)
    power: float = key(1.0, minimum=0.0)


def build(cfg: PolynomialConfig, lr: float, steps: int,
          scale: float) -> paddle.optimizer.lr.PolynomialDecay:
    """Paddle's PolynomialDecay over ``steps``."""
    import paddle  # here: a config is read before Paddle is imported (its flags)

    return paddle.optimizer.lr.PolynomialDecay(learning_rate=lr, decay_steps=steps,
                                               end_lr=cfg.end_lr * scale, power=cfg.power)


SCHEDULE = ScheduleKind(
    name="polynomial",
    section=Section.of(PolynomialConfig),
    build=build,
    describe=lambda cfg: f"polynomial decay to {cfg.end_lr:g} (power {cfg.power:g}) over the stage")
