"""Stochastic depth (``model.drop_path_rate``) that runs on Paddle 2.6 and 3.x.

PPIM's ``drop_path`` divides the activations by ``paddle.to_tensor(1 - p)``, a float64
tensor on Paddle 2.6, which refuses to mix it with float32 activations: any
``drop_path_rate > 0`` stopped the first step there. :class:`DropPath` is PPIM's layer with
the same computation in the activations' own dtype.
"""

import paddle
from ppim.models.common import DropPath as PPIMDropPath


class DropPath(PPIMDropPath):
    """Zero a sample's residual branch with probability ``drop_prob``, scale the rest by
    ``1 / (1 - drop_prob)`` (in training)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.drop_prob or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = paddle.floor(paddle.rand(shape, dtype=x.dtype) + keep)
        return x / keep * mask

