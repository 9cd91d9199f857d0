"""A constant learning rate (the default)."""

from training.schedules import ScheduleKind
from utils.schema import LRScheduleConfig, Section

SCHEDULE = ScheduleKind(
    name="constant",
    section=Section({}, LRScheduleConfig),
    build=lambda cfg, lr, steps, scale: lr,
    describe=lambda cfg: "constant LR")
