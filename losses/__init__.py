"""Losses: the R-Drop objective, the plain cross-entropy baseline, and distillation beside them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from losses.distill import DistillationLoss
from losses.rdrop import CrossEntropyLoss, RDropLoss

if TYPE_CHECKING:
    import paddle

    from utils.schema import DistillConfig, LossConfig

__all__ = ["RDropLoss", "CrossEntropyLoss", "DistillationLoss", "build_loss"]


def build_loss(loss_cfg: LossConfig,
               distill_cfg: Optional[DistillConfig] = None) -> paddle.nn.Layer:
    """The loss named by the config's ``loss`` section, with the ``distill`` section's
    distillation (a teacher's logits for the distillation head) when one is given."""
    if loss_cfg.rdrop:
        loss = RDropLoss(alpha=loss_cfg.alpha, kl_reduction=loss_cfg.kl_reduction,
                         form=loss_cfg.form)
    else:
        loss = CrossEntropyLoss()
    if distill_cfg is None:
        return loss
    return DistillationLoss(loss, distill_cfg.type, distill_cfg.tau, distill_cfg.alpha)
