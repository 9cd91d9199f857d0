"""The learning-rate schedules a stage may name (``stages.N.lr_schedule.name``): one module
of this package each, declaring a :class:`ScheduleKind` as ``SCHEDULE``. A linear warmup
(``stages.N.warmup``) wraps whichever one a stage has (:func:`training.optim.build_schedule`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from utils.registry import entries_of
from utils.schema import Node, Section, Tagged

if TYPE_CHECKING:  # Paddle is imported where a schedule is built, not with the config
    from paddle.optimizer.lr import LRScheduler


@dataclass(frozen=True)
class ScheduleKind:
    """A learning-rate schedule of the recipe.

    ``section`` holds its keys besides ``name``; ``build(config, lr, steps, scale)`` is the
    stage's learning rate from ``lr`` over ``steps`` optimizer updates (those after the
    warmup), a float for a constant one, ``scale`` multiplying the rates the config gives
    (``train.lr_scaling``); ``describe(config)`` is its part of the stage plan's line.
    """

    name: str
    section: Section
    build: Callable[[Node, float, int, float], Union[float, LRScheduler]]
    describe: Callable[[Node], str]


SCHEDULES: dict[str, ScheduleKind] = entries_of(__name__, "SCHEDULE")
# The ``stages.N.lr_schedule`` section: constant unless a stage names one.
SCHEDULE_SECTION = Tagged({name: kind.section for name, kind in SCHEDULES.items()},
                          default_name="constant")
