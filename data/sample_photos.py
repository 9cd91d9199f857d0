"""Write a small image-folder data set from the two photos scikit-learn ships (a temple in
China, a flower), for trying ``data.name: folder`` without data of your own.

Four classes, the left and right halves of each photo: every image is a random crop of its
half (a quarter to all of the half's area), mirrored or not, resized to a 500x375 JPEG (the
size of a typical web photo). The files are the same for the same arguments.

    python -m data.sample_photos output/photos [--train 40 --val 10 --test 20]
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import numpy as np
from PIL import Image

CLASSES = ("flower_left", "flower_right", "temple_left", "temple_right")
PHOTO_SIZE = (500, 375)  # width, height
JPEG_QUALITY = 90


def _halves():
    """Class name -> the uint8 half photo its images are cropped from."""
    from sklearn.datasets import load_sample_images

    photos = dict(zip(("temple", "flower"), load_sample_images().images))
    halves = {}
    for name in CLASSES:
        photo, side = name.split("_")
        image = photos[photo]
        middle = image.shape[1] // 2
        halves[name] = image[:, :middle] if side == "left" else image[:, middle:]
    return halves


def crop_of(half: np.ndarray, rng: np.random.Generator, size: int = PHOTO_SIZE) -> np.ndarray:
    """One random crop of ``half`` (area fraction 1/4..1, its aspect ratio kept), mirrored
    with probability 1/2, resized (bicubic) to ``size``."""
    height, width = half.shape[:2]
    scale = np.sqrt(rng.uniform(0.25, 1.0))
    box_h, box_w = int(height * scale), int(width * scale)
    top, left = int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1))
    crop = half[top:top + box_h, left:left + box_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC)


def write_sample_folder(out: str, counts: dict[str, int], seed: int = 0) -> str:
    """Write ``out/<split>/<class>/<n>.jpg`` for ``counts`` (split -> images per class);
    return the number of files written."""
    rng, written = np.random.default_rng(seed), 0
    halves = _halves()
    for split, count in counts.items():
        for name in CLASSES:
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for number in range(count):
                crop_of(halves[name], rng).save(os.path.join(folder, f"{number:04d}.jpg"),
                                                quality=JPEG_QUALITY)
                written += 1
    return written


def main(argv: Optional[list[str]] = None) -> int:
    """Write the folder and say how to train on it."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder to write (train/, val/, test/ inside)")
    for split, default in (("train", 40), ("val", 10), ("test", 20)):
        parser.add_argument(f"--{split}", type=int, default=default, metavar="N",
                            help=f"{split} images per class (default {default}; 0: no {split}/)")
    args = parser.parse_args(argv)
    counts = {s: getattr(args, s) for s in ("train", "val", "test") if getattr(args, s) > 0}
    if "train" not in counts or "test" not in counts:
        parser.error("--train and --test must be at least 1")
    written = write_sample_folder(args.out, counts)
    print(f"wrote {written} photos of {len(CLASSES)} classes to {args.out}; train on them with "
          f"python main.py -c configs/demo_folder.yaml -o data.path={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
