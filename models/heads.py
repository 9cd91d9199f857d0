"""DeiT's two heads kept apart in training, for a loss that teaches them different targets."""

import paddle
from ppim.models.deit import DistilledVisionTransformer

from utils.errors import UserError


class SeparateHeads(DistilledVisionTransformer):
    """PPIM's distilled DeiT whose training forward returns both heads side by side:
    ``[N, 2C]``, the class head's logits then the distillation head's. In eval mode it is
    PPIM's model: the average of the two (what validation, the test and export see)."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not self.training:
            return super().forward(x)
        cls, dist = self.forward_features(x)
        return paddle.concat([self.head(cls), self.head_dist(dist)], axis=-1)


def separate_heads(backbone: paddle.nn.Layer, name: str) -> None:
    """Turn ``backbone`` (PPIM's model ``name``) into a :class:`SeparateHeads`; one error
    when it has no distillation head."""
    if type(backbone) is not DistilledVisionTransformer:
        raise UserError(f"distill needs a DeiT distilled model (one with a distillation head, "
                        f"e.g. deit_b_distilled_384 or DistilledVisionTransformer); model.name "
                        f"{name} is a {type(backbone).__name__}")
    backbone.__class__ = SeparateHeads
