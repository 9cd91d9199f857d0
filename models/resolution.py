"""Run a PPIM ViT/DeiT at another input resolution (the FixRes idea: test at a higher one).

Only the position embedding depends on the resolution: its patch-grid part is resampled
bicubically to the new grid, the class and distillation tokens' entries are kept.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from utils.errors import UserError


def backbone_of(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The PPIM network of ``model``: the model itself, or the one the MLP-head wrapper holds."""
    return getattr(model, "backbone", model)


def patch_size(model: paddle.nn.Layer) -> int:
    """The side of the model's square patches."""
    return backbone_of(model).patch_embed.patch_size[0]


def extra_tokens(model: paddle.nn.Layer) -> int:
    """Entries of the position embedding that are not patches (class, distillation tokens)."""
    backbone = backbone_of(model)
    return backbone.pos_embed.shape[1] - backbone.patch_embed.num_patches


def resample_pos_embed(pos_embed: np.ndarray, tokens: int, grid: int) -> np.ndarray:
    """A ``[1, tokens + g*g, D]`` position embedding (array) resampled to ``grid × grid``
    patches; the first ``tokens`` entries are kept as they are."""
    pos_embed = np.asarray(pos_embed, dtype=np.float32)
    dim, old = pos_embed.shape[-1], int(round((pos_embed.shape[1] - tokens) ** 0.5))
    if old * old != pos_embed.shape[1] - tokens:
        raise UserError(f"a position embedding of {pos_embed.shape[1]} entries is not "
                        f"{tokens} tokens plus a square grid of patches")
    if old == grid:
        return pos_embed
    patches = paddle.to_tensor(pos_embed[:, tokens:]).reshape([1, old, old, dim])
    patches = F.interpolate(patches.transpose([0, 3, 1, 2]), size=(grid, grid), mode="bicubic",
                            align_corners=False)
    patches = patches.transpose([0, 2, 3, 1]).reshape([1, grid * grid, dim]).numpy()
    return np.concatenate([pos_embed[:, :tokens], patches], axis=1)


def set_resolution(model: paddle.nn.Layer, size: int,
                   source: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """Make ``model`` take ``size × size`` images: patch embedding size and position embedding
    (resampled from ``source``, float32 values of it such as AMP O2's master copy, if given).
    Returns the resampled float32 embedding, or ``None`` when the size was already ``size``."""
    backbone = backbone_of(model)
    patch = patch_size(model)
    if size % patch:
        raise UserError(f"data.image_size={size} must be a multiple of the patch size {patch}")
    grid = size // patch
    if backbone.patch_embed.img_size[0] == size:
        return None
    if source is None:
        source = backbone.pos_embed.astype("float32").numpy()
    resampled = resample_pos_embed(source, extra_tokens(model), grid)
    dtype = backbone.pos_embed.dtype
    backbone.pos_embed = backbone.create_parameter(shape=list(resampled.shape), dtype=dtype)
    # Set, not an Assign initializer: that reads a bfloat16 tensor's bits as numbers.
    backbone.pos_embed.set_value(paddle.to_tensor(resampled).astype(dtype))
    backbone.patch_embed.img_size = (size, size)
    backbone.patch_embed.num_patches = grid * grid
    return resampled


def _pos_embed_key(model):
    """The state-dict path of the position embedding."""
    return "backbone.pos_embed" if backbone_of(model) is not model else "pos_embed"


def resolution_of(weights: dict, model: paddle.nn.Layer) -> int:
    """The image side the position embedding in ``weights`` (a state dict of ``model``'s
    kind) was made for."""
    tokens = np.asarray(weights[_pos_embed_key(model)]).shape[1] - extra_tokens(model)
    return int(round(tokens ** 0.5)) * patch_size(model)


def fit_resolution(weights: dict, model: paddle.nn.Layer) -> dict:
    """``weights`` (state dict: path -> tensor or array) with a position embedding of
    another resolution resampled to ``model``'s (a new dict; other entries shared)."""
    key = _pos_embed_key(model)
    target = backbone_of(model).pos_embed
    value = weights.get(key)
    if value is None or list(value.shape) == list(target.shape):
        return weights
    array = value.astype("float32").numpy() if isinstance(value, paddle.Tensor) else value
    grid = backbone_of(model).patch_embed.img_size[0] // patch_size(model)
    resampled = resample_pos_embed(array, extra_tokens(model), grid)
    if isinstance(value, paddle.Tensor):
        resampled = paddle.to_tensor(resampled).astype(value.dtype)
    return dict(weights, **{key: resampled})
