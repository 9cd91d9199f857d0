"""The optimizer update: unscale (fp16), measure the global gradient norm, clip by it, step.

Paddle's optimizers call their ``grad_clip`` once per parameter group, so a
``ClipGradByGlobalNorm`` given to an optimizer with decay / no-decay groups clips
each group to the limit on its own (an update of up to √2 × the limit, the
no-decay group boosted). Here the norm is taken once over every trainable
parameter, after fp16 unscaling and before the update, and the same norm is
what the logs report.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import paddle

if TYPE_CHECKING:
    from training.amp import Precision


def trainable(model: paddle.nn.Layer) -> list[paddle.Tensor]:
    """The parameters an optimizer updates (those that take gradients)."""
    return [param for param in model.parameters() if not param.stop_gradient]


@paddle.no_grad()
def global_grad_norm(params: list[paddle.Tensor]) -> float:
    """The 2-norm of all gradients of ``params`` as one vector (a Python float).

    Squares are summed in float64, so finite float32 or half-precision gradients never
    overflow the sum: the norm is not finite exactly when some gradient value is not.
    """
    squares = [paddle.square(param.grad.astype("float64")).sum()
               for param in params if param.grad is not None]
    return math.sqrt(float(paddle.add_n(squares))) if squares else 0.0


@paddle.no_grad()
def scale_grads_(params: list[paddle.Tensor], factor: float) -> None:
    """Multiply every gradient of ``params`` by ``factor`` in place."""
    for param in params:
        if param.grad is not None:
            param.grad.scale_(factor)


def apply_update(optimizer: paddle.optimizer.Optimizer, params: list[paddle.Tensor],
                 precision: Precision, clip_norm: Optional[float] = None) -> tuple[float, str]:
    """Unscale, measure, clip and step; return ``(grad_norm, status)``.

    ``grad_norm`` is the global norm of the unscaled gradients before clipping; above
    ``clip_norm`` every gradient is scaled by ``clip_norm / grad_norm`` (the rule of
    ``paddle.nn.ClipGradByGlobalNorm``), in the same pass that removes the fp16 loss
    scale. ``status`` is ``"applied"``, or the update is not applied (the optimizer is not
    stepped) because the gradients are not finite: ``"overflow"`` under fp16 loss scaling
    (the scale is halved), ``"nonfinite"`` otherwise or at the minimum scale.
    """
    loss_scale = precision.scaler.scale
    norm = global_grad_norm(params) / loss_scale  # a power of two: exact
    finite = math.isfinite(norm)
    if finite:
        factor = 1.0 / loss_scale
        if clip_norm and norm > clip_norm:
            factor *= clip_norm / norm
        if factor != 1.0:
            scale_grads_(params, factor)
        # Paddle names the state an optimizer creates at its first step "<param>_moment1_<n>",
        # n counting the optimizers the process built before. A second AdamW stage would save
        # "_1" names, which a process resumed inside that stage (it built one optimizer) does
        # not make, and Paddle refuses the checkpoint. A fresh name scope: the same names in
        # every process.
        with paddle.utils.unique_name.guard():
            optimizer.step()
    if finite:
        precision.scaler.update(True)
        return norm, "applied"
    return norm, "overflow" if precision.scaler.update(False) else "nonfinite"
