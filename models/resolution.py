"""Run a PPIM ViT/DeiT at another input resolution (the FixRes idea: test at a higher one).

Only the position embedding depends on the resolution: its patch-grid part is resampled
bicubically to the new grid, the class and distillation tokens' entries are kept.
"""

import numpy as np
import paddle
import paddle.nn.functional as F

from utils.errors import UserError


def backbone_of(model):
    """The PPIM network of ``model``: the model itself, or the one the MLP-head wrapper holds."""
    return getattr(model, "backbone", model)


def patch_size(model):
    """The side of the model's square patches."""
    return backbone_of(model).patch_embed.patch_size[0]


def extra_tokens(model):
    """Entries of the position embedding that are not patches (class, distillation tokens)."""
    backbone = backbone_of(model)
    return backbone.pos_embed.shape[1] - backbone.patch_embed.num_patches


def resample_pos_embed(pos_embed, tokens, grid):
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


def set_resolution(model, size):
    """Make ``model`` take ``size × size`` images: patch embedding size and position embedding."""
    backbone = backbone_of(model)
    patch = patch_size(model)
    if size % patch:
        raise UserError(f"data.image_size={size} must be a multiple of the patch size {patch}")
    grid = size // patch
    if backbone.patch_embed.img_size[0] == size:
        return
    resampled = resample_pos_embed(backbone.pos_embed.numpy(), extra_tokens(model), grid)
    backbone.pos_embed = backbone.create_parameter(
        shape=list(resampled.shape), dtype=backbone.pos_embed.dtype,
        default_initializer=paddle.nn.initializer.Assign(resampled))
    backbone.patch_embed.img_size = (size, size)
    backbone.patch_embed.num_patches = grid * grid
