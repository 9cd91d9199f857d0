"""Host-side views of one image: what training and evaluation send to the device.

Training draws, from the sample's seeded generator, a random-resized crop (or a resize of the
shorter side and a random crop), a flip and a rotation; evaluation resizes the shorter side
to ``size / crop_fraction`` and takes the centre (PPIM's DeiT evaluation transform: bicubic,
fraction 1 at 384). An image already of the right size is left as it is, so the in-memory
32x32 data sets go through the same code unchanged.

The random-resized box follows ``torchvision.transforms.RandomResizedCrop.get_params`` (what the R-Drop
authors' ViT code trains with): up to ten draws of an area fraction (uniform in ``scale``)
and an aspect ratio (log-uniform in ``ratio``) until the box fits, else the largest
centred box within ``ratio``. The crop is resized to the output size with bilinear
interpolation (torchvision's default, which the R-Drop authors train with).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from paddle.vision.transforms import functional as F
from PIL import Image

if TYPE_CHECKING:
    from utils.schema import CropConfig

ATTEMPTS = 10


def random_resized_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                       ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """``(top, left, box_height, box_width)`` of one random-resized crop of a
    ``height`` x ``width`` image, drawn from ``rng`` (a NumPy generator)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        box_w = int(round(math.sqrt(target * aspect)))
        box_h = int(round(math.sqrt(target / aspect)))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(rng.integers(0, height - box_h + 1))
            left = int(rng.integers(0, width - box_w + 1))
            return top, left, box_h, box_w
    shape = width / height
    if shape < min(ratio):
        box_w, box_h = width, int(round(width / min(ratio)))
    elif shape > max(ratio):
        box_w, box_h = int(round(height * max(ratio))), height
    else:
        box_w, box_h = width, height
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int],
                 size: Optional[int] = None) -> np.ndarray:
    """The ``box`` of a uint8 ``[H, W, 3]`` image, resized (bilinear) to ``size`` x ``size``
    (default: back to ``H`` x ``W``)."""
    top, left, box_h, box_w = box
    height, width = image.shape[:2] if size is None else (size, size)
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + box_h, left:left + box_w]))
    return np.asarray(crop.resize((width, height), Image.BILINEAR))


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` with its shorter side resized (bicubic) to ``side``, the aspect ratio kept
    (the longer side truncated, as paddle.vision's ``resize`` does)."""
    height, width = image.shape[:2]
    if min(height, width) == side:
        return image
    if width <= height:
        new_w, new_h = side, int(side * height / width)
    else:
        new_w, new_h = int(side * width / height), side
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h),
                                                                          Image.BICUBIC))


def eval_view(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """The evaluation view: the shorter side resized to ``round(size / crop_fraction)``, then
    the centre ``size`` x ``size`` (offsets rounded as paddle.vision's ``center_crop``)."""
    image = resize_shorter(image, round(size / crop_fraction))
    height, width = image.shape[:2]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return np.ascontiguousarray(image[top:top + size, left:left + size])


def train_view(image: np.ndarray, rng: np.random.Generator, size: int,
               crop: Optional[CropConfig] = None, crop_fraction: float = 1.0,
               hflip_prob: float = 0.0, rotation: float = 0.0) -> np.ndarray:
    """A training view drawn from ``rng``, in this order: a random-resized crop (``crop``:
    ``{scale, ratio}``) or, without one, the shorter side resized as :func:`eval_view` does
    and a random ``size`` x ``size`` crop (drawn only where there is room); a horizontal flip
    with probability ``hflip_prob``; a rotation uniform in +-``rotation`` degrees."""
    if crop:
        image = resized_crop(image, random_resized_box(rng, *image.shape[:2], crop["scale"],
                                                       crop["ratio"]), size)
    else:
        image = resize_shorter(image, round(size / crop_fraction))
        top, left = (int(rng.integers(0, extent - size + 1)) if extent > size else 0
                     for extent in image.shape[:2])
        image = image[top:top + size, left:left + size]
    if rng.random() < hflip_prob:
        image = image[:, ::-1]
    if rotation > 0:
        angle = rng.uniform(-rotation, rotation)
        image = np.asarray(F.rotate(Image.fromarray(np.ascontiguousarray(image)), angle,
                                    interpolation="bilinear"))
    return np.ascontiguousarray(image)
