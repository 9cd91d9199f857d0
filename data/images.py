"""Image files given on a command line: files, folders and globs, read as uint8 RGB."""

import glob
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError

# What PIL can open, by extension (a folder is searched for these).
IMAGE_EXTENSIONS = tuple(ext for ext, fmt in Image.registered_extensions().items()
                         if fmt in Image.OPEN)


def find_images(inputs):
    """The image paths that ``inputs`` name, in order: files as given, folders searched
    (recursively, sorted), glob patterns expanded (sorted)."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(os.path.join(root, name) for root, _, names in os.walk(item)
                            for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found.append(item)
        elif glob.has_magic(item) and glob.glob(item, recursive=True):
            found += sorted(path for path in glob.glob(item, recursive=True) if os.path.isfile(path))
        else:
            raise UserError(f"{item} is not an image file, a folder or a pattern that matches "
                            f"files")
    if not found:
        raise UserError(f"no image files in {', '.join(inputs)}")
    return found


def read_rgb(path):
    """A uint8 ``[H, W, 3]`` RGB array of any image PIL reads (grey, RGBA, palette converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path} is not an image PIL can read ({exc})") from None
