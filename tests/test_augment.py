"""Random-resized crops: the box distribution against its closed form, one crop's pixels
against a float64 bilinear resize written here, and the dataset's seeded draws."""

import math

import numpy as np
import pytest
from scipy import stats

from data.augment import random_resized_box, resized_crop
from data.digits import load_digits
from data.samples import ImageDataset
from utils.schema import Node


def _boxes(count, size, scale, ratio):
    return np.array([random_resized_box(np.random.default_rng((7, i)), size, size, scale, ratio)
                     for i in range(count)])


def _chi_square_p(observed_values, probabilities):
    """p-value of the counts of values 0..len(probabilities)-1 against ``probabilities``."""
    counts = np.bincount(observed_values, minlength=len(probabilities))
    expected = np.asarray(probabilities) * len(observed_values)
    keep = expected >= 5  # merge the sparse tail into one bin
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue


def test_square_boxes_have_the_closed_form_side_and_uniform_position():
    # ratio 1: side = round(64 sqrt(u)), u uniform in [0.25, 1]; every draw fits.
    boxes = _boxes(20000, 64, (0.25, 1.0), (1.0, 1.0))
    tops, lefts, heights, widths = boxes.T
    assert np.array_equal(heights, widths) and heights.min() >= 32 and heights.max() <= 64
    side = np.arange(65)
    upper = np.minimum(((side + 0.5) / 64) ** 2, 1.0)
    lower = np.maximum(((side - 0.5) / 64) ** 2, 0.25)
    probabilities = np.clip(upper - lower, 0, None) / 0.75
    assert probabilities.sum() == pytest.approx(1.0)
    assert _chi_square_p(widths, probabilities) > 1e-3
    for side_length in (40, 56):  # the position: uniform over the places that fit
        chosen = heights == side_length
        places = 64 - side_length + 1
        assert _chi_square_p(tops[chosen], np.full(places, 1 / places)) > 1e-3
        assert _chi_square_p(lefts[chosen], np.full(places, 1 / places)) > 1e-3


def test_aspect_ratios_are_log_uniform():
    # Area fixed at half the image, log aspect uniform in [ln 1/2, ln 2]: w = round(sqrt(2048 a)).
    widths = _boxes(20000, 64, (0.5, 0.5), (0.5, 2.0))[:, 3]
    edges = np.log(np.clip(((np.arange(65) + 0.5) ** 2) / 2048, 0.5, 2.0))
    cdf = (edges - math.log(0.5)) / math.log(4.0)
    probabilities = np.diff(np.concatenate([[0.0], cdf]))
    assert _chi_square_p(widths, probabilities) > 1e-3


def test_a_ratio_no_box_fits_falls_back_to_the_centred_box():
    # An aspect of at least 4 at 90 % of a square never fits: the centred 32 x 8 box.
    box = random_resized_box(np.random.default_rng(0), 32, 32, (0.9, 1.0), (4.0, 5.0))
    assert box == (12, 0, 8, 32)
    assert random_resized_box(np.random.default_rng(0), 32, 32, (0.9, 1.0), (0.2, 0.25)) == \
        (0, 12, 32, 8)


def _bilinear(image, height, width):
    """float64 bilinear resize with pixel centres at half-integers, edges clamped."""
    src_h, src_w = image.shape[:2]
    ys = np.clip((np.arange(height) + 0.5) * src_h / height - 0.5, 0, src_h - 1)
    xs = np.clip((np.arange(width) + 0.5) * src_w / width - 0.5, 0, src_w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, src_h - 1), np.minimum(x0 + 1, src_w - 1)
    wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy) + bottom * wy


def test_one_crop_is_that_box_resized_bilinearly_to_the_stored_size():
    images, _ = load_digits("test")
    image = images[3]
    box = (5, 9, 11, 14)  # top, left, height, width
    out = resized_crop(image, box)
    assert out.shape == image.shape and out.dtype == np.uint8
    expected = _bilinear(image[5:16, 9:23], 32, 32)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1.0  # uint8 rounding


def test_the_dataset_draws_crops_from_seed_epoch_and_index_only():
    images, labels = load_digits("test")
    crop = {"scale": [0.05, 1.0], "ratio": [0.75, 4 / 3]}
    data_cfg = Node(crop_fraction=1.0, skip_bad_images=False)
    dataset = ImageDataset((images, labels), 32, data_cfg, seed=3, augment={"crop": crop})
    dataset.set_epoch(1)
    first = [dataset[i][0] for i in range(6)]
    again = ImageDataset((images, labels), 32, data_cfg, seed=3, augment={"crop": crop})
    again.set_epoch(1)
    assert all(np.array_equal(a, again[i][0]) for i, a in enumerate(first))
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in first)
    assert not any(np.array_equal(a, images[i]) for i, a in enumerate(first))
    dataset.set_epoch(2)
    assert not all(np.array_equal(a, dataset[i][0]) for i, a in enumerate(first))
    box = random_resized_box(np.random.default_rng((3, 1, 4)), 32, 32, crop["scale"],
                             crop["ratio"])
    assert np.array_equal(first[4], resized_crop(images[4], box))  # drawn first, from (3, 1, 4)
