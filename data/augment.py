"""Random-resized crops drawn on the host, per sample, from the sample's seeded generator.

The box follows ``torchvision.transforms.RandomResizedCrop.get_params`` (what the R-Drop
authors' ViT code trains with): up to ten draws of an area fraction (uniform in ``scale``)
and an aspect ratio (log-uniform in ``ratio``) until the box fits, else the largest
centred box within ``ratio``. The crop is resized back to the stored image size with
bilinear interpolation on the uint8 image; the device then resizes to the model's
resolution as it does for every image.
"""

import math

import numpy as np
from PIL import Image

ATTEMPTS = 10


def random_resized_box(rng, height, width, scale, ratio):
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


def resized_crop(image, box):
    """The ``box`` of a uint8 ``[H, W, 3]`` image, resized (bilinear) back to ``[H, W, 3]``."""
    top, left, box_h, box_w = box
    height, width = image.shape[:2]
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + box_h, left:left + box_w]))
    return np.asarray(crop.resize((width, height), Image.BILINEAR))
