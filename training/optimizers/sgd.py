"""Plain SGD with L2 decay on the gradients: no state per weight, the least memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from training.optimizers import OptimizerKind
from utils.schema import Node, Section, key

if TYPE_CHECKING:
    import paddle
    from paddle.optimizer.lr import LRScheduler


class SGDConfig(Node):
    """``stages.N.optimizer`` with ``name: SGD``."""

    name: str
    lr: float = key(minimum=0.0)
    l2_decay: float = key(0.0, minimum=0.0)


def build(cfg: SGDConfig, lr: Union[float, LRScheduler], groups: list,
          master_weights: bool) -> paddle.optimizer.SGD:
    """Paddle's SGD over ``groups``; the L2 decay is a regularizer of the gradients."""
    import paddle  # here: a config is read before Paddle is imported (its flags)

    return paddle.optimizer.SGD(
        learning_rate=lr, parameters=groups, multi_precision=master_weights,
        weight_decay=paddle.regularizer.L2Decay(cfg.l2_decay) if cfg.l2_decay else None)


def describe(cfg: SGDConfig) -> str:
    """``SGD lr=... l2_decay=...``."""
    return f"SGD lr={cfg.lr:g} l2_decay={cfg.l2_decay:g}"


OPTIMIZER = OptimizerKind(
    name="SGD",
    section=Section.of(SGDConfig),
    build=build, describe=describe,
    moments=0)
