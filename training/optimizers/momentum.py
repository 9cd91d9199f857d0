"""Momentum SGD with L2 decay on the gradients (the recipe's later stages)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from training.optimizers import OptimizerKind
from utils.schema import Node, Section, key

if TYPE_CHECKING:
    import paddle
    from paddle.optimizer.lr import LRScheduler


class MomentumConfig(Node):
    """``stages.N.optimizer`` with ``name: Momentum`` (L2 decay on the gradients)."""

    name: str
    lr: float = key(minimum=0.0)
    momentum: float = key(0.9, minimum=0.0, maximum=1.0)
    l2_decay: float = key(0.0, minimum=0.0)
    use_nesterov: bool = key(False)


def build(cfg: MomentumConfig, lr: Union[float, LRScheduler], groups: list,
          master_weights: bool) -> paddle.optimizer.Momentum:
    """Paddle's Momentum over ``groups``; the L2 decay is a regularizer of the gradients."""
    import paddle  # here: a config is read before Paddle is imported (its flags)

    return paddle.optimizer.Momentum(
        learning_rate=lr, momentum=cfg.momentum, use_nesterov=cfg.use_nesterov,
        weight_decay=paddle.regularizer.L2Decay(cfg.l2_decay) if cfg.l2_decay else None,
        parameters=groups, multi_precision=master_weights)


def describe(cfg: MomentumConfig) -> str:
    """``Momentum lr=... momentum=... l2_decay=...[ nesterov]``."""
    return (f"Momentum lr={cfg.lr:g} momentum={cfg.momentum:g} l2_decay={cfg.l2_decay:g}"
            + (" nesterov" if cfg.use_nesterov else ""))


OPTIMIZER = OptimizerKind(
    name="Momentum",
    section=Section.of(MomentumConfig),
    build=build, describe=describe,
    moments=1,  # the velocity
    gpu_bfloat16=False)  # Paddle's GPU momentum kernel, in some releases
