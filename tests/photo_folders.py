"""Folders of photos for the tests of your own images: crops of scikit-learn's sample photos
in every format and mode a user's folder may hold, with what a reader should give for each,
and the things a careless user leaves in such a folder."""

import os

import numpy as np
from PIL import Image

from training.config import load_config
from utils.config import path_override
from utils.schema import Node

CLASSES = ["flower", "temple_left", "temple_right"]
COUNTS = {"train": 12, "val": 3, "test": 4}
# How each image is stored, in turn: what a folder of downloaded photos holds.
FORMATS = ("rgb.jpg", "grey.png", "rgba.png", "palette.png", "wide16.png", "cmyk.tif",
           "rotated.jpg", "rgb.bmp", "rgb.webp", "palette.gif")


def photo_halves():
    """scikit-learn's two sample photos as three classes: the flower and the temple's halves."""
    from sklearn.datasets import load_sample_images

    temple, flower = load_sample_images().images
    middle = temple.shape[1] // 2
    return {"flower": flower, "temple_left": temple[:, :middle], "temple_right": temple[:, middle:]}


def _write(path, crop, kind):
    """Save ``crop`` (uint8 RGB) as ``kind``; return the uint8 RGB array a reader should give,
    computed here in NumPy (None for lossy formats, compared with a tolerance elsewhere)."""
    image = Image.fromarray(crop)
    if kind == "grey.png":
        grey = crop[..., 1]
        Image.fromarray(grey).save(path)
        return np.repeat(grey[..., None], 3, -1)
    if kind == "rgba.png":
        alpha = np.full(crop.shape[:2], 7, np.uint8)  # nearly transparent: alpha is dropped
        Image.fromarray(np.dstack([crop, alpha])).save(path)
        return crop
    if kind in ("palette.png", "palette.gif"):
        palette = image.quantize(16)
        palette.info["transparency"] = 0
        palette.save(path, transparency=0)
        table = np.array(palette.getpalette()[:48], np.uint8).reshape(16, 3)
        return table[np.asarray(palette)]
    if kind == "wide16.png":
        wide = crop[..., 0].astype(np.uint16) * 257 + crop[..., 2]  # 16 significant bits
        Image.fromarray(wide).save(path)
        return np.repeat(np.round(wide / 65535 * 255).astype(np.uint8)[..., None], 3, -1)
    if kind == "cmyk.tif":
        cmyk = np.dstack([255 - crop, np.zeros(crop.shape[:2], np.uint8)])
        Image.fromarray(cmyk, "CMYK").save(path)
        return crop
    if kind == "rotated.jpg":  # stored on its side, EXIF orientation 6: shown turned clockwise
        exif = image.getexif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(crop, 1))).save(path, exif=exif.tobytes(),
                                                                      quality=95)
        return None
    if kind.endswith(".jpg"):
        image.save(path, quality=95)
        return None
    image.save(path, **({"lossless": True} if kind.endswith(".webp") else {}))
    return crop


def write_photo_folder(root, counts=COUNTS, seed=0):
    """``root/<split>/<class>/<n>-<kind>`` crops of random size and shape, every format in
    turn; returns {relative path: expected RGB or None}."""
    rng, halves, expected, number = np.random.default_rng(seed), photo_halves(), {}, 0
    for split, count in counts.items():
        for name in CLASSES:
            os.makedirs(os.path.join(root, split, name))
            half = halves[name]
            for _ in range(count):
                height, width = int(rng.integers(40, 200)), int(rng.integers(40, 200))
                top = int(rng.integers(0, half.shape[0] - height))
                left = int(rng.integers(0, half.shape[1] - width))
                kind = FORMATS[number % len(FORMATS)]
                relative = f"{split}/{name}/{number:03d}-{kind}"
                crop = np.ascontiguousarray(half[top:top + height, left:left + width])
                expected[relative] = (_write(os.path.join(root, relative), crop, kind), crop)
                number += 1
    return expected


def careless_photo_folder(root):
    """:func:`write_photo_folder` at ``root``, plus what a careless user leaves in one: a
    notebook's checkpoint folder, macOS metadata, notes, a pipe with an image name, a link
    back up the tree. Returns ``(root, expected)``."""
    expected = write_photo_folder(root)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    with open(os.path.join(root, "train", "flower", "._000-rgb.jpg"), "wb") as handle:
        handle.write(b"\x00\x05\x16\x07 AppleDouble")
    with open(os.path.join(root, "train", "flower", "notes.txt"), "w") as handle:
        handle.write("where these came from")
    os.mkfifo(os.path.join(root, "train", "temple_left", "blocked.png"))
    os.symlink("..", os.path.join(root, "train", "temple_right", "loop"))
    return root, expected


def folder_data_cfg(root, **fields):
    """The ``data`` section of ``configs/demo_folder.yaml`` reading ``root``, with ``fields``."""
    base = load_config("configs/demo_folder.yaml", [path_override("data.path", str(root))]).data
    return Node(base, **fields)
