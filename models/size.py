"""Whether a model the config describes fits this machine, told before it is built: a
``model.kwargs`` whose sizes are each within their bounds can still multiply into terabytes
(or abort Paddle), which a build would find out the hard way."""

import inspect
import os

from utils.errors import UserError

# What an unnamed size defaults to in the estimate (a named model's: DeiT-B at 384 px).
DEFAULT_SIZES = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                 "img_size": 384, "patch_size": 16, "in_chans": 3, "class_dim": 1000}


def estimate_bytes(name: str, kwargs: dict) -> tuple[int, int]:
    """``(weights_and_state, attention_per_image)`` in bytes of training PPIM's ``name``
    built with ``kwargs``, counted from its sizes (the constructor's defaults where it has
    them): float32 weights, gradients and two optimizer moments; the attention scores one
    image keeps for the backward pass (scores, softmax, dropout mask, per block and head, for
    both R-Drop copies)."""
    from models.build import ppim_constructor

    defaults = {key: param.default for key, param in
                inspect.signature(ppim_constructor(name)).parameters.items()
                if param.default is not inspect.Parameter.empty}
    size = {key: kwargs.get(key, defaults.get(key, value)) for key, value in DEFAULT_SIZES.items()}
    dim, depth = size["embed_dim"], size["depth"]
    tokens = (size["img_size"] // max(size["patch_size"], 1)) ** 2 + 2
    params = (depth * (4 + 2 * size["mlp_ratio"]) * dim * dim
              + size["patch_size"] ** 2 * size["in_chans"] * dim + tokens * dim
              + 2 * dim * size["class_dim"])
    attention = 2 * 3 * depth * size["num_heads"] * tokens * tokens * 4
    return int(params * 16), int(attention)


def check_model_size(name: str, kwargs: dict) -> None:
    """One :class:`UserError` with the estimate when training the model ``kwargs`` describe
    (each size within its bound, their product not) would take more than this machine's
    memory: ``embed_dim: 8192, mlp_ratio: 64`` is 2 TB of state, ``patch_size: 1,
    img_size: 1024`` a million tokens (Paddle aborted the process on them)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such figure here
        return
    state, attention = estimate_bytes(name, kwargs)
    if state + attention > memory:
        raise UserError(f"model.kwargs {kwargs} ask for about {state / 1e9:.1f} GB of weights, "
                        f"gradients and optimizer state and {attention / 1e9:.1f} GB of "
                        f"attention per training image, more than this machine's "
                        f"{memory / 1e9:.0f} GB; lower embed_dim, depth, mlp_ratio or the "
                        f"tokens (img_size / patch_size)")
