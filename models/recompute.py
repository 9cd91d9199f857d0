"""Activation recompute (``model.recompute``): each transformer block keeps only its input
during the forward pass and recomputes the rest in the backward pass.

That trades about a third more compute for most of the activation memory, which grows with
the micro-batch: the [x; x] batch of R-Drop doubles it. Paddle's ``recompute`` saves the
random state before the block and restores it for the second forward, so each R-Drop copy
keeps its own dropout masks and the gradients are those of the plain model.

The hook-based form (``use_reentrant=False``) is used: the default re-entrant form is a
PyLayer whose backward runs a second autograd pass, and ``paddle.DataParallel``'s reducer,
which counts each parameter's gradient once per backward, then fails at the first step
with "parameter ... has been ready before" on two or more ranks. Paddle 2.6's hook-based
form cannot keep the random state on a CPU ("Recompute with RNG perserve is not support
current device: cpu"), so there, and only there, the re-entrant form runs: one CPU process
is right, several CPU ranks fail in the start-of-run stage check.
"""

import paddle
from paddle.distributed.fleet.utils import recompute
from ppim.models.vit import Block


def hooks_keep_random_state() -> bool:
    """Whether Paddle's hook-based recompute can restore the random state on this device
    (Paddle 3.x everywhere; 2.6 on GPUs and other accelerators, not on a CPU)."""
    major = int(paddle.__version__.split(".")[0])
    return major >= 3 or major == 0 or not paddle.get_device().startswith("cpu")  # 0: develop


class RecomputedBlock(Block):
    """PPIM's ``Block`` (same parameters and names), recomputed in the backward pass while
    training."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.training and not x.stop_gradient:
            return recompute(super().forward, x, use_reentrant=not hooks_keep_random_state())
        return super().forward(x)
