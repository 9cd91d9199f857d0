"""Mixed precision (``train.amp``, ``train.amp_level``): ``paddle.amp.auto_cast`` around the
forward pass and, for fp16, dynamic loss scaling.

O1 keeps the weights and optimizer state in float32 and runs matmuls and convolutions in
the half type, softmax and norms in float32. O2 also stores the weights in the half type
(LayerNorm's stay float32 under fp16 only: Paddle casts them under bf16) and runs softmax
and norms in it, with float32 master copies in the optimizer (``multi_precision``).
The R-Drop loss casts the logits to float32 itself. Paddle applies AMP on GPUs only:
elsewhere, or on a GPU without the type (bf16 before Ampere), the run says so in one line
and trains in float32.
"""

from __future__ import annotations

import contextlib
import copy
from typing import ContextManager

import numpy as np
import paddle

DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# The first loss scale (Paddle's and PyTorch's default); it adapts from there.
INIT_LOSS_SCALE = 2.0 ** 15
# Updates in a row without an overflow after which the scale doubles (Paddle's default).
GROWTH_INTERVAL = 1000
# The smallest scale: a non-finite loss or gradient at it is not an fp16 overflow that a
# lower scale could cure, and train.nan_policy decides.
MIN_LOSS_SCALE = 1.0


def _supported(mode, device):
    if not str(device).startswith("gpu"):
        return False
    return (paddle.amp.is_float16_supported() if mode == "fp16"
            else paddle.amp.is_bfloat16_supported())


class LossScaler:
    """Dynamic loss scaling for fp16: the loss is multiplied by ``scale`` before the backward
    pass so that small gradients survive in float16; an update whose loss or gradients
    overflowed is skipped and halves the scale (down to ``MIN_LOSS_SCALE``),
    ``GROWTH_INTERVAL`` updates in a row without one double it. The scale stays a power of
    two, so unscaling float32 gradients (O1) is exact; O2's half-precision gradients are
    unscaled in their own type, where values below its normal range lose bits.

    Paddle's ``paddle.amp.GradScaler`` does the same but does not tell whether it skipped
    an update (the LR schedule, the EMA and the step count must know), and in Paddle
    3.3.1 with NumPy >= 2.4 it raises a ``TypeError`` at its first overflow (its log line
    calls ``float()`` on a one-element tensor).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.scale = INIT_LOSS_SCALE if enabled else 1.0
        self.good_steps = 0

    def update(self, finite: bool) -> bool:
        """Adapt the scale after an update whose loss and gradients were ``finite`` or not.
        Returns whether a non-finite one is an overflow, skipped as such: the scale was
        above its minimum and is halved (False when finite, without scaling, or at the
        minimum, where a non-finite value is a divergence for ``train.nan_policy``)."""
        if not self.enabled:
            return False
        if not finite:
            self.good_steps = 0
            if self.scale <= MIN_LOSS_SCALE:
                return False
            self.scale = max(self.scale / 2.0, MIN_LOSS_SCALE)
            return True
        self.good_steps += 1
        if self.good_steps == GROWTH_INTERVAL:
            self.scale, self.good_steps = self.scale * 2.0, 0
        return False

    def state_dict(self) -> dict:
        """The scale and the count of updates since it last changed."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; also reads ``paddle.amp.GradScaler``'s (``incr_count``)."""
        self.scale = float(np.asarray(state["scale"]).reshape(-1)[0])
        self.good_steps = int(np.asarray(state.get("good_steps", state.get("incr_count", 0))))


class Precision:
    """The forward pass's precision and the loss scaler that goes with it."""

    def __init__(self, mode: str = "off", device: str = "cpu", level: str = "O1") -> None:
        if mode != "off" and not _supported(mode, device):
            print(f"warning: train.amp={mode} is not available on {device} (Paddle applies "
                  f"{DTYPES[mode]} AMP on GPUs that support it); using float32", flush=True)
            mode = "off"
        self.mode = mode
        self.level = level
        self.scaler = LossScaler(enabled=mode == "fp16")

    def scratch(self) -> Precision:
        """A copy with a loss scaler of its own (at the same scale): for trial steps that
        must leave the run's scaler as it is."""
        other = copy.copy(self)
        other.scaler = LossScaler(self.scaler.enabled)
        other.scaler.load_state_dict(self.scaler.state_dict())
        return other

    def autocast(self) -> ContextManager:
        """The context for forward passes."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(dtype=DTYPES[self.mode], level=self.level)

    @property
    def half_weights(self) -> bool:
        """Whether weights are stored in the half type (O2) and optimizers need master copies."""
        return self.mode != "off" and self.level == "O2"

    def prepare(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        """Cast the weights to the half type for O2 (LayerNorm's stay float32 under fp16); no-op
        otherwise.
        Call before ``paddle.DataParallel`` wraps the model, which groups weights by dtype."""
        if self.half_weights:
            paddle.amp.decorate(models=model, level="O2", dtype=DTYPES[self.mode])
        return model

    @property
    def scaling(self) -> bool:
        """Whether fp16 loss scaling is active (an update with overflowed gradients is then an
        expected skip, not a divergence)."""
        return self.scaler.enabled

    def scaled(self, loss: paddle.Tensor) -> paddle.Tensor:
        """``loss`` multiplied by the current loss scale, for ``backward``."""
        return loss * self.scaler.scale if self.scaling else loss
