"""Mixed precision (``train.amp``): ``paddle.amp.auto_cast`` (O1) around the forward pass and,
for fp16, ``paddle.amp.GradScaler`` dynamic loss scaling.

O1 keeps the weights and optimizer state in float32 and runs matmuls and convolutions in
the half type, softmax and norms in float32; the R-Drop loss casts the logits to float32
itself. Paddle applies AMP on GPUs only: elsewhere, or on a GPU without the type (bf16
before Ampere), the run says so in one line and trains in float32.
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

    def __init__(self, mode="off", device="cpu"):
        if mode != "off" and not _supported(mode, device):
            print(f"warning: train.amp={mode} is not available on {device} (Paddle applies "
                  f"{DTYPES[mode]} AMP on GPUs that support it); using float32", flush=True)
            mode = "off"
        self.mode = mode
        self.scaler = paddle.amp.GradScaler(enable=mode == "fp16",
                                            init_loss_scaling=INIT_LOSS_SCALE)

    def autocast(self):
        """The context for forward passes."""
        if self.mode == "off":
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(dtype=DTYPES[self.mode], level="O1")

    def scaled(self, loss):
        """``loss`` multiplied by the current loss scale (fp16), for ``backward``."""
        return self.scaler.scale(loss)

    def step(self, optimizer):
        """Unscale the gradients, skip the update if they overflowed (fp16), step."""
        self.scaler.step(optimizer)
        self.scaler.update()
