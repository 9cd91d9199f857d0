"""Activation recompute (``model.recompute``): each transformer block keeps only its input
during the forward pass and recomputes the rest in the backward pass.

That trades about a third more compute for most of the activation memory, which grows with
the micro-batch: the [x; x] batch of R-Drop doubles it. Paddle's ``recompute`` saves the
random state before the block and restores it for the second forward, so each R-Drop copy
keeps its own dropout masks and the gradients are those of the plain model.
"""

from paddle.distributed.fleet.utils import recompute
from ppim.models.vit import Block


class RecomputedBlock(Block):
    """PPIM's ``Block`` (same parameters and names), recomputed in the backward pass while
    training."""

    def forward(self, x):
        if self.training and not x.stop_gradient:
            return recompute(super().forward, x)
        return super().forward(x)

