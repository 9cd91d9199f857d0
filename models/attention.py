"""PPIM's ViT/DeiT attention computed by Paddle's fused ``scaled_dot_product_attention``,
and a count of which computation every attention call really took.

The fused kernel (flash attention on GPUs in fp16/bf16) never materialises the N×N
attention matrix. :class:`FusedAttention` is PPIM's ``Attention`` with only ``forward``
replaced: same parameters, same names, so PPIM's weights load unchanged. Every PPIM
attention layer of a built model is one; those that may not take the kernel (no GPU, no
AMP, ``model.fused_attention=off``, a failed probe, a non-default ``qk_scale``) compute
PPIM's attention exactly, and say why in :class:`AttentionTally`.

Whether the kernel exists depends on the user's machine: Paddle 2.6 – 3.2 always call flash
attention, which needs fp16/bf16, compute capability >= 8.0 and CUDA >= 11.4, so on a
V100 or T4 it fails at the first call. The kernel is therefore probed once per run, on
the run's device and dtype, before any layer is switched to it.

Under AMP O1 the kernel still gets half-precision inputs: before Paddle 3.2.2 an O1
``nn.Linear`` returns float32 (a half matmul, then the float32 bias added and promoted),
so the qkv projection's output is cast to the autocast dtype, as the matmuls of PPIM's
path would cast it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import paddle
import paddle.nn.functional as F
from ppim.models.vit import Attention

from utils.errors import UserError
from utils.runtime.device import paddle_version

AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "off": "float32"}
KERNEL, PPIM = "fused kernel", "PPIM's"


@dataclass
class AttentionTally:
    """Attention calls counted while :func:`tallying_attention` is open: per path (the fused
    kernel or PPIM's computation), the dtype of q/k/v and, for PPIM's path, why."""

    calls: collections.Counter = field(default_factory=collections.Counter)

    def add(self, path: str, dtype: str, reason: str = "") -> None:
        """Count one call."""
        self.calls[path, dtype, reason] += 1

    @property
    def fused(self) -> int:
        """Calls that took the fused kernel."""
        return sum(n for (path, _, _), n in self.calls.items() if path == KERNEL)

    @property
    def total(self) -> int:
        """Attention calls counted."""
        return sum(self.calls.values())

    def unfused_reasons(self) -> list[str]:
        """Why calls took PPIM's path, most calls first."""
        reasons = collections.Counter()
        for (path, _, reason), n in self.calls.items():
            if path == PPIM:
                reasons[reason] += n
        return [reason for reason, _ in reasons.most_common()]

    def to_json(self) -> dict:
        """The counts, JSON-ready."""
        dtypes = collections.Counter()
        for (_, dtype, _), n in self.calls.items():
            dtypes[dtype] += n
        return {"calls": self.total, "fused_calls": self.fused,
                "dtypes": dict(dtypes), "unfused_reasons": self.unfused_reasons()}

    def describe(self) -> str:
        """One phrase: ``fused: 24 of 24 calls in float16`` or ``not fused: CPU``."""
        if not self.total:
            return "no attention call counted"
        dtypes = "/".join(sorted({dtype for (path, dtype, _) in self.calls if path == KERNEL}))
        if self.fused == self.total:
            return f"fused: {self.fused} of {self.total} calls in {dtypes}"
        reasons = "; ".join(self.unfused_reasons())
        if self.fused:
            return f"partly fused: {self.fused} of {self.total} calls in {dtypes} ({reasons})"
        return f"not fused: {reasons}"


_TALLIES: list[AttentionTally] = []


@contextlib.contextmanager
def tallying_attention() -> Iterator[AttentionTally]:
    """Count every attention call of every model inside the block."""
    tally = AttentionTally()
    _TALLIES.append(tally)
    try:
        yield tally
    finally:
        _TALLIES.remove(tally)


def _count(path: str, dtype: str, reason: str = "") -> None:
    for tally in _TALLIES:
        tally.add(path, dtype, reason)


def autocast_dtype() -> Optional[str]:
    """The dtype AMP's autocast computes matmuls in here (``float16``, ``bfloat16``), or
    ``None`` outside autocast (and while a graph is traced for export)."""
    tracer = paddle.framework._dygraph_tracer()
    if tracer is None or str(tracer._amp_level).endswith("O0"):
        return None
    return str(tracer._amp_dtype)


def dtype_name(dtype: paddle.dtype) -> str:
    """``paddle.float16`` → ``float16`` (Paddle 2.6 and 3 print dtypes differently)."""
    return str(dtype).split(".")[-1]


class FusedAttention(Attention):
    """PPIM's attention (qkv → softmax(q kᵀ/√d) v → proj): through the fused kernel for
    q/k/v in a dtype the kernel was probed for (``kernel_dtypes``), by PPIM's computation otherwise
    (``unfused_reason`` says why the layer has no kernel dtype). Under autocast, a float32
    qkv projection is cast to the autocast dtype when that dtype has the kernel.

    Attention dropout is applied by the kernel at the layer's own rate.
    """

    kernel_dtypes = ()
    unfused_reason = "not switched to the fused kernel"

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        tokens, channels = x.shape[1:]
        qkv = self.qkv(x).reshape((-1, tokens, 3, self.num_heads, channels // self.num_heads))
        dtype, half = dtype_name(qkv.dtype), autocast_dtype()
        if dtype not in self.kernel_dtypes and half in self.kernel_dtypes:
            qkv, dtype = qkv.astype(half), half  # O1's float32 Linear output (see the module)
        if dtype not in self.kernel_dtypes:
            _count(PPIM, dtype, self.unfused_reason if not self.kernel_dtypes
                   else f"{dtype} inputs outside autocast")
            return self._ppim_attention(qkv, tokens, channels)
        _count(KERNEL, dtype)
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
    """PPIM's attention layers of ``model`` (a :class:`FusedAttention` is one too)."""
    return [layer for layer in model.sublayers() if isinstance(layer, Attention)]


def _default_scale(layer):
    """Whether the layer scales by 1/√head_dim, as the kernel does."""
    return abs(layer.scale - (layer.qkv.weight.shape[0] // layer.num_heads) ** -0.5) < 1e-12


def use_fused_attention(model: paddle.nn.Layer, mode: str, device: str, amp: str,
                        tokens: int) -> Optional[str]:
    """Make every PPIM attention layer a :class:`FusedAttention` that takes the fused kernel
    per ``model.fused_attention`` (and counts its calls); return one line saying which
    attention the model uses and why (``None`` when it keeps PPIM's computation as
    configured: ``off``, or ``auto`` without a GPU and AMP).

    ``auto`` fuses where it pays and works: on a GPU with fp16/bf16 AMP, if the kernel
    passes a probe there in that dtype (otherwise one ``warning:`` line, PPIM's
    attention). ``on`` fuses in the run's dtype on any device and is an error where the
    probe fails; ``off`` never fuses. Layers with a non-default ``qk_scale`` keep PPIM's
    computation (the kernel scales by 1/√head_dim). ``tokens`` is the sequence length.
    """
    layers = _attention_layers(model)
    gpu_amp = str(device).startswith("gpu") and amp != "off"
    for layer in layers:
        layer.__class__ = FusedAttention
        layer.kernel_dtypes = ()
        layer.unfused_reason = (
            "model.fused_attention=off" if mode == "off"
            else "qk_scale is not 1/sqrt(head_dim)" if not _default_scale(layer)
            else "CPU" if mode == "auto" and not str(device).startswith("gpu")
            else "float32 (auto fuses under AMP only)" if mode == "auto" and not gpu_amp
            else "")
    kernel_layers = [layer for layer in layers if not layer.unfused_reason]
    if not kernel_layers:
        return None  # PPIM's attention, as configured: nothing to say
    dtype, first = AMP_DTYPES[amp], kernel_layers[0]
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
        for layer in kernel_layers:
            layer.unfused_reason = f"the fused kernel failed its probe on {device}"
        return f"attention: PPIM's (the fused kernel failed its probe on {device})"
    for layer in kernel_layers:
        layer.kernel_dtypes = (dtype,)
    return (f"attention: {len(kernel_layers)} layers use paddle.nn.functional."
            f"scaled_dot_product_attention in {dtype}, {sdpa_kernel(str(device), dtype)} "
            f"by Paddle's rule (probed on {device})")


FLASH, MEMORY_EFFICIENT, MATH = "flash attention", "memory-efficient attention", "math (unfused)"
# Flash attention's least compute capability; the Paddle from which scaled_dot_product_attention
# without a mask chooses its kernel by the card (2.6 - 3.2 call flash attention on any GPU).
FLASH_CAPABILITY, CARD_AWARE_PADDLE = 8, (3, 3, 0)


def kernel_by_rule(capability: Optional[int], dtype: str, version: tuple[int, int, int]) -> str:
    """The kernel ``scaled_dot_product_attention`` (no mask) calls on a GPU of compute
    capability ``capability`` (``None``: a CPU) in ``dtype`` with Paddle ``version``, by
    Paddle's rule: on a CPU plain operators ("math", with the attention matrix); from Paddle
    3.3 (``nn/functional/sdpa.py``, ``select_sdp_for_sdpa``) flash attention in fp16/bf16
    from compute capability 8.0 (an A100), the memory-efficient kernel on older GPUs (a V100)
    or in float32; before 3.3 (``flash_attention.py``) flash attention on every GPU."""
    if capability is None:
        return MATH
    if version < CARD_AWARE_PADDLE:
        return FLASH
    half = dtype in ("float16", "bfloat16")
    return FLASH if half and capability >= FLASH_CAPABILITY else MEMORY_EFFICIENT


def kernel_runs(capability: Optional[int], dtype: str, version: tuple[int, int, int]) -> bool:
    """Whether the kernel of :func:`kernel_by_rule` exists there: flash attention needs
    fp16/bf16 on compute capability 8.0 or newer; the memory-efficient kernel runs on any
    GPU."""
    kernel = kernel_by_rule(capability, dtype, version)
    return kernel == MEMORY_EFFICIENT or (kernel == FLASH and capability >= FLASH_CAPABILITY
                                          and dtype in ("float16", "bfloat16"))


def sdpa_kernel(device: str, dtype: str) -> str:
    """The kernel :func:`kernel_by_rule` names for ``device`` with this Paddle."""
    if not device.startswith("gpu"):
        return MATH
    major, _ = paddle.device.cuda.get_device_capability()
    return kernel_by_rule(major, dtype, paddle_version())


def fused_on_capability(capability: Optional[int], precision: str, setting: str,
                        paddle_version: tuple[int, int, int]) -> bool:
    """Whether PPIM's attention runs through Paddle's fused kernel on a GPU of compute
    capability ``capability`` (``None``: a CPU, where attention is never fused) training in
    ``precision`` (``off``, ``fp16``, ``bf16``) with ``model.fused_attention = setting``."""
    if setting == "off" or precision == "off" or capability is None:
        return False
    return kernel_runs(capability, AMP_DTYPES[precision], paddle_version)
