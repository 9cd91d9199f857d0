"""PPIM's ViT/DeiT attention computed by Paddle's fused ``scaled_dot_product_attention``.

The fused kernel (flash attention on GPUs in fp16/bf16) never materialises the N×N
attention matrix. :class:`FusedAttention` is PPIM's ``Attention`` with only ``forward``
replaced: same parameters, same names, so PPIM's weights load unchanged.
"""

import paddle.nn.functional as F
from ppim.models.vit import Attention


class FusedAttention(Attention):
    """PPIM's attention (qkv → softmax(q kᵀ/√d) v → proj) through the fused kernel.

    Attention dropout is applied by the kernel at the layer's own rate.
    """

    def forward(self, x):
        tokens, channels = x.shape[1:]
        qkv = self.qkv(x).reshape((-1, tokens, 3, self.num_heads, channels // self.num_heads))
        q, k, v = qkv.unbind(axis=2)  # [B, N, heads, head_dim]: the kernel's layout
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, training=self.training)
        return self.proj_drop(self.proj(x.reshape((-1, tokens, channels))))


def use_fused_attention(model, mode, device, amp):
    """Switch PPIM attention layers to :class:`FusedAttention` per ``model.fused_attention``.

    ``auto`` fuses where it pays: on a GPU with fp16/bf16 AMP, where the kernel is flash
    attention. ``on`` fuses everywhere (on a CPU Paddle runs a reference implementation),
    ``off`` never. Layers with a non-default ``qk_scale`` keep PPIM's path (the kernel
    scales by 1/√head_dim). Returns the number of layers switched.
    """
    if mode == "off" or (mode == "auto" and not (str(device).startswith("gpu") and amp != "off")):
        return 0
    switched = 0
    for layer in model.sublayers():
        if type(layer) is not Attention:
            continue
        head_dim = layer.qkv.weight.shape[0] // layer.num_heads
        if abs(layer.scale - head_dim ** -0.5) < 1e-12:
            layer.__class__ = FusedAttention
            switched += 1
    return switched
