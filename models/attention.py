"""PPIM's ViT/DeiT attention computed by Paddle's fused ``scaled_dot_product_attention``.

The fused kernel (flash attention on GPUs in fp16/bf16) never materialises the N×N
attention matrix. :class:`FusedAttention` is PPIM's ``Attention`` with only ``forward``
replaced: same parameters, same names, so PPIM's weights load unchanged.

Whether the kernel exists depends on the user's machine: Paddle 2.6 always calls flash
attention, which needs fp16/bf16, compute capability >= 8.0 and CUDA >= 11.4, so on a
V100 or T4 it fails at the first call. The kernel is therefore probed once per run, on
the run's device and dtype, before any layer is switched to it.
"""

from __future__ import annotations

import functools
from typing import Optional

import paddle
import paddle.nn.functional as F
from ppim.models.vit import Attention

from utils.errors import UserError

AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "off": "float32"}


class FusedAttention(Attention):
    """PPIM's attention (qkv → softmax(q kᵀ/√d) v → proj) through the fused kernel.

    Attention dropout is applied by the kernel at the layer's own rate. Only queries in
    a dtype the kernel was probed for (``kernel_dtypes``) take it; others (e.g. float32
    outside autocast, in a run that probed float16) take PPIM's own computation.
    """

    kernel_dtypes = ()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        tokens, channels = x.shape[1:]
        qkv = self.qkv(x).reshape((-1, tokens, 3, self.num_heads, channels // self.num_heads))
        if str(qkv.dtype).split(".")[-1] not in self.kernel_dtypes:
            return self._ppim_attention(qkv, tokens, channels)
        q, k, v = qkv.unbind(axis=2)  # [B, N, heads, head_dim]: the kernel's layout
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, training=self.training)
        return self.proj_drop(self.proj(x.reshape((-1, tokens, channels))))

    def _ppim_attention(self, qkv, tokens, channels):
        """PPIM's ``Attention.forward`` from its qkv projection on."""
        q, k, v = qkv.transpose((2, 0, 3, 1, 4)).unbind(axis=0)  # [B, heads, N, head_dim]
        attn = F.softmax(q.matmul(k.transpose((0, 1, 3, 2))) * self.scale, axis=-1)
        x = self.attn_drop(attn).matmul(v).transpose((0, 2, 1, 3)).reshape((-1, tokens, channels))
        return self.proj_drop(self.proj(x))


@functools.lru_cache(maxsize=None)
def probe_kernel(device: str, dtype: str, tokens: int, heads: int, head_dim: int,
                 dropout: float) -> Optional[str]:
    """Why ``scaled_dot_product_attention`` cannot run a forward and backward pass on
    ``device`` in ``dtype`` at these sizes (one line), or ``None`` when it can.

    The inputs are constant and the random state is restored afterwards, so a probe
    changes nothing a seeded run draws.
    """
    state = paddle.get_rng_state()
    try:
        shape = [1, tokens, heads, head_dim]
        q = paddle.full(shape, 0.1, dtype=dtype)
        q.stop_gradient = False
        out = F.scaled_dot_product_attention(q, q, q, dropout_p=dropout, training=True)
        out.astype("float32").sum().backward()
        float(q.grad.astype("float32").sum())  # waits for the device: errors surface here
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernel
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    finally:
        paddle.set_rng_state(state)


def _attention_layers(model):
    """PPIM attention layers whose scale the kernel reproduces (1/√head_dim)."""
    layers = []
    for layer in model.sublayers():
        if type(layer) is Attention:
            head_dim = layer.qkv.weight.shape[0] // layer.num_heads
            if abs(layer.scale - head_dim ** -0.5) < 1e-12:
                layers.append(layer)
    return layers


def use_fused_attention(model: paddle.nn.Layer, mode: str, device: str, amp: str,
                        tokens: int) -> Optional[str]:
    """Switch PPIM attention layers to :class:`FusedAttention` per ``model.fused_attention``;
    return one line saying which attention the model uses and why (``None`` when it keeps
    PPIM's attention as configured: ``off``, or ``auto`` without a GPU and AMP).

    ``auto`` fuses where it pays and works: on a GPU with fp16/bf16 AMP, if the kernel
    passes a probe there in that dtype (otherwise one ``warning:`` line, PPIM's
    attention). ``on`` fuses in the run's dtype on any device and is an error where the
    probe fails; ``off`` never fuses. Layers with a non-default ``qk_scale`` keep PPIM's
    path (the kernel scales by 1/√head_dim). ``tokens`` is the sequence length.
    """
    layers = _attention_layers(model)
    gpu_amp = str(device).startswith("gpu") and amp != "off"
    if mode == "off" or not layers or (mode == "auto" and not gpu_amp):
        return None  # PPIM's attention, as configured: nothing to say
    dtype, first = AMP_DTYPES[amp], layers[0]
    heads = first.num_heads
    reason = probe_kernel(str(device), dtype, tokens, heads, first.qkv.weight.shape[0] // heads,
                          first.attn_drop.p)
    if reason:
        where = f"scaled_dot_product_attention fails on {device} in {dtype} ({reason})"
        if mode == "on":
            raise UserError(f"model.fused_attention=on, but {where}; set model.fused_attention"
                            f"=auto (falls back to PPIM's attention) or off")
        print(f"warning: model.fused_attention=auto: {where}; using PPIM's attention",
              flush=True)
        return f"attention: PPIM's (the fused kernel failed its probe on {device})"
    for layer in layers:
        layer.__class__ = FusedAttention
        layer.kernel_dtypes = (dtype,)
    return (f"attention: {len(layers)} layers use paddle.nn.functional."
            f"scaled_dot_product_attention in {dtype}, {sdpa_kernel(str(device), dtype)} "
            f"(probed on {device})")


def sdpa_kernel(device: str, dtype: str) -> str:
    """The kernel ``scaled_dot_product_attention`` runs on ``device`` in ``dtype``, by
    Paddle's rule (``nn/functional/sdpa.py``, ``select_sdp_for_sdpa``): Paddle 2.6 has only
    flash attention; Paddle 3 takes flash attention in fp16/bf16 on compute capability 8.0
    or newer (an A100), the memory-efficient kernel on older GPUs (a V100) or in float32,
    and composes it of plain operators ("math", with the attention matrix) on a CPU."""
    if not device.startswith("gpu"):
        return "math (unfused)"
    if int(paddle.__version__.split(".")[0]) == 2:
        return "flash attention"
    major, _ = paddle.device.cuda.get_device_capability()
    half = dtype in ("float16", "bfloat16")
    return "flash attention" if half and major >= 8 else "memory-efficient attention"
