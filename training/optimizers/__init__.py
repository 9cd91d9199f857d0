"""The optimizers a stage may name (``stages.N.optimizer.name``): one module of this package
each, declaring an :class:`OptimizerKind` as ``OPTIMIZER``. Its config keys, its builder, the
line the stage plan prints and what the memory plan and the stage check need are declared
there and nowhere else; see docs/architecture.md for adding one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

from utils.registry import entries_of
from utils.schema import Node, Section, Tagged

if TYPE_CHECKING:  # Paddle is imported where an optimizer is built, not with the config
    import paddle
    from paddle.optimizer.lr import LRScheduler


@dataclass(frozen=True)
class OptimizerKind:
    """An optimizer of the recipe.

    ``section`` holds its keys besides ``name`` (``lr`` among them) and their typed view;
    ``build(config, lr, groups, master_weights)`` makes the Paddle optimizer over the
    parameter ``groups`` (decayed, and not decayed: ``weight_decay`` 0) at learning rate
    ``lr`` (a float or a scheduler), with float32 master copies of half-precision weights
    when ``master_weights``; ``describe(config)`` is its part of the stage plan's line;
    ``moments`` is the float32 tensors it keeps per trained weight (the memory plan);
    ``gpu_bfloat16`` is False where Paddle's GPU kernel lacks bfloat16 in some releases
    (the stage check's advice for a failed bf16 O2 step).
    """

    name: str
    section: Section
    build: Callable[[Node, Union[float, LRScheduler], list, bool], paddle.optimizer.Optimizer]
    describe: Callable[[Node], str]
    moments: int
    gpu_bfloat16: bool = True


OPTIMIZERS: dict[str, OptimizerKind] = entries_of(__name__, "OPTIMIZER")
# The ``stages.N.optimizer`` section: the keys of the optimizer its ``name`` selects.
OPTIMIZER_SECTION = Tagged({name: kind.section for name, kind in OPTIMIZERS.items()})
