"""Mixed precision (``train.amp``, ``train.amp_level``): ``paddle.amp.auto_cast`` around the
forward pass and, for fp16, ``paddle.amp.GradScaler`` dynamic loss scaling.

O1 keeps the weights and optimizer state in float32 and runs matmuls and convolutions in
the half type, softmax and norms in float32. O2 also stores the weights (norms excepted)
in the half type, with float32 master copies in the optimizer (``multi_precision``).
The R-Drop loss casts the logits to float32 itself. Paddle applies AMP on GPUs only:
elsewhere, or on a GPU without the type (bf16 before Ampere), the run says so in one line
and trains in float32.
"""

import contextlib

import paddle

DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
# GradScaler's first loss scale (Paddle's default); it adapts from there.
INIT_LOSS_SCALE = 2.0 ** 15


def _supported(mode, device):
    if not str(device).startswith("gpu"):
        return False
    return (paddle.amp.is_float16_supported() if mode == "fp16"
            else paddle.amp.is_bfloat16_supported())


class Precision:
    """The forward pass's precision and the loss scaler that goes with it."""

    def __init__(self, mode="off", device="cpu", level="O1"):
        if mode != "off" and not _supported(mode, device):
            print(f"warning: train.amp={mode} is not available on {device} (Paddle applies "
                  f"{DTYPES[mode]} AMP on GPUs that support it); using float32", flush=True)
            mode = "off"
        self.mode = mode
        self.level = level
        self.scaler = paddle.amp.GradScaler(enable=mode == "fp16",
                                            init_loss_scaling=INIT_LOSS_SCALE)

    def autocast(self):
        """The context for forward passes."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(dtype=DTYPES[self.mode], level=self.level)

    @property
    def half_weights(self):
        """Whether weights are stored in the half type (O2) and optimizers need master copies."""
        return self.mode != "off" and self.level == "O2"

    def prepare(self, model):
        """Cast the weights to the half type for O2 (norms stay float32); no-op otherwise.
        Call before ``paddle.DataParallel`` wraps the model, which groups weights by dtype."""
        if self.half_weights:
            paddle.amp.decorate(models=model, level="O2", dtype=DTYPES[self.mode])
        return model

    def scaled(self, loss):
        """``loss`` multiplied by the current loss scale (fp16), for ``backward``."""
        return self.scaler.scale(loss)

    def step(self, optimizer):
        """Unscale the gradients, skip the update if they overflowed (fp16), step."""
        self.scaler.step(optimizer)
        self.scaler.update()
