"""A constant learning rate (the default)."""

from training.schedules import ScheduleKind
from utils.schema import Node, Section


class ConstantConfig(Node):
    """``stages.N.lr_schedule`` with ``name: constant`` (no keys of its own)."""

    name: str


SCHEDULE = ScheduleKind(
    name="constant",
    section=Section.of(ConstantConfig),
    build=lambda cfg, lr, steps, scale: lr,
    describe=lambda cfg: "constant LR")
