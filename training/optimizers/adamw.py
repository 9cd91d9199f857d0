"""AdamW: Adam with decoupled weight decay (the recipe's first stage)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from training.optimizers import OptimizerKind
from utils.schema import Node, Section, key

if TYPE_CHECKING:
    import paddle
    from paddle.optimizer.lr import LRScheduler


class AdamWConfig(Node):
    """``stages.N.optimizer`` with ``name: AdamW``."""

    name: str
    lr: float = key(minimum=0.0)
    betas: list[float] = key([0.9, 0.999], length=2, minimum=0.0, maximum=1.0)
    epsilon: float = key(1e-8, minimum=0.0)
    weight_decay: float = key(0.01, minimum=0.0)


def build(cfg: AdamWConfig, lr: Union[float, LRScheduler], groups: list,
          master_weights: bool) -> paddle.optimizer.AdamW:
    """Paddle's AdamW over ``groups``."""
    import paddle  # here: a config is read before Paddle is imported (its flags)

    return paddle.optimizer.AdamW(learning_rate=lr, beta1=cfg.betas[0], beta2=cfg.betas[1],
                                  epsilon=cfg.epsilon, weight_decay=cfg.weight_decay,
                                  parameters=groups, multi_precision=master_weights)


def describe(cfg: AdamWConfig) -> str:
    """``AdamW lr=... betas=(...) eps=... weight_decay=...``."""
    return (f"AdamW lr={cfg.lr:g} betas=({cfg.betas[0]:g}, {cfg.betas[1]:g}) "
            f"eps={cfg.epsilon:g} weight_decay={cfg.weight_decay:g}")


OPTIMIZER = OptimizerKind(
    name="AdamW",
    section=Section.of(AdamWConfig),
    build=build, describe=describe,
    moments=2)  # the first and second moments
