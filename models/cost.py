"""The cost of a PPIM ViT from its sizes, one model for the plan (:mod:`planning.plan`),
preflight, the benches and the size check a model passes before it is built: FLOPs of a
forward pass, activation bytes an image keeps for the backward pass, bytes of weights,
gradients and optimizer state, and the sizes a model's constructor arguments declare.

A shape is a dict: ``dim`` (width D), ``depth`` (L), ``heads`` (H), ``hidden`` (MLP width),
``patch``, ``channels``, ``tokens`` (T: patches plus the class and distillation tokens),
``classes``, ``class_heads`` and ``params``; :func:`planning.plan.model_shape` reads it from
PPIM's constructor under ``paddle.LazyGuard``, :func:`declared_shape` from the arguments
alone (PPIM allocates its position embedding even under ``LazyGuard``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from utils.schema import ModelConfig

# Per block: 19 T·D token values, 4 of them the two norms' inputs and outputs.
TOKEN_VALUES, NORM_VALUES = 19, 4
# Bytes per attention value (H·T² per block and copy) in float32 (None) and under AMP O1
# and O2: the softmax's output, its half copy that attention·v keeps, the gradient of the
# same size the backward pass holds beside them at its peak, attention dropout's output (and
# its one-byte mask).
ATTENTION_BYTES = {None: (4, 0, 4, 4), "O1": (4, 2, 4, 4), "O2": (2, 0, 2, 2)}
# What an unnamed size defaults to in a declared shape (a named model's: DeiT-B at 384 px).
DEFAULT_SIZES = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                 "img_size": 384, "patch_size": 16, "in_chans": 3, "class_dim": 1000}


def forward_flops(shape: dict) -> int:
    """FLOPs of one image's forward pass."""
    dim, tokens, patches = shape["dim"], shape["tokens"], shape["tokens"] - shape["class_heads"]
    block = 2 * (3 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * dim * dim
                 + 2 * tokens * dim * shape["hidden"])
    embed = 2 * patches * shape["patch"] ** 2 * shape["channels"] * dim
    return embed + shape["depth"] * block + 2 * dim * shape["classes"] * shape["class_heads"]


def activation_bytes(shape: dict, model_cfg: ModelConfig, amp_level: Optional[str],
                     fused: bool) -> int:
    """Bytes one copy of one image keeps for the backward pass: in float32 (``amp_level``
    ``None``) or under AMP ``O1``/``O2``, with attention through the fused kernel or not."""
    dim, tokens, heads = shape["dim"], shape["tokens"], shape["heads"]
    if amp_level == "O1":  # the norms in float32, half copies of their outputs for the matmuls
        token = NORM_VALUES * 4 + 2 * 2 + (TOKEN_VALUES - NORM_VALUES) * 2
    else:
        token = TOKEN_VALUES * (2 if amp_level else 4)
    if fused:  # no attention matrix: the kernel keeps one float32 log-sum-exp per query
        attention = heads * tokens * 4
    else:
        softmax, copy, gradient, dropped = ATTENTION_BYTES[amp_level]
        dropout = dropped + 1 if model_cfg.attn_drop_rate > 0 else 0  # p = 0 runs no dropout
        attention = (softmax + copy + gradient + dropout) * heads * tokens ** 2
    block = token * tokens * dim + attention
    if model_cfg.recompute:  # each block's input (the residual stream: float32 unless O2)
        return int(shape["depth"] * tokens * dim * (2 if amp_level == "O2" else 4) + block)
    return int(shape["depth"] * block)


def state_bytes(params: int, moments: int, averages: int = 0, half: bool = False) -> int:
    """Bytes of ``params`` trained parameters: weights (AMP O2, ``half``: half-precision ones
    and float32 masters), gradients, ``moments`` float32 optimizer tensors each and
    ``averages`` float32 weight averages (EMA, SWA)."""
    weights = params * (2 + 4 if half else 4)
    return weights + params * (2 if half else 4) + params * 4 * (moments + averages)


def declared_shape(constructor: Callable, kwargs: dict) -> dict:
    """The shape of the model ``constructor(**kwargs)`` would build, from the arguments (the
    constructor's defaults where they are not given), before it is built: two extra tokens
    and heads (a distilled DeiT's) and every parameter of the blocks, embeddings, tokens, final
    norm and heads, counted from the sizes."""
    defaults = {key: param.default for key, param in
                inspect.signature(constructor).parameters.items()
                if param.default is not inspect.Parameter.empty}
    size = {key: kwargs.get(key, defaults.get(key, value)) for key, value in DEFAULT_SIZES.items()}
    dim, depth, patch = size["embed_dim"], size["depth"], max(size["patch_size"], 1)
    hidden = int(dim * size["mlp_ratio"])
    tokens = (size["img_size"] // patch) ** 2 + 2
    block = 4 * dim * dim + 2 * dim * hidden + 9 * dim + hidden  # with its biases and norms
    params = (depth * block + (patch ** 2 * size["in_chans"] + 1) * dim  # the patch embedding
              + (tokens + 2 + 2) * dim  # position embedding, class and distillation tokens, norm
              + 2 * (dim + 1) * size["class_dim"])  # the two heads
    return {"dim": dim, "depth": depth, "heads": size["num_heads"], "hidden": hidden,
            "patch": patch, "channels": size["in_chans"], "tokens": tokens,
            "classes": size["class_dim"], "class_heads": 2, "params": int(params)}
