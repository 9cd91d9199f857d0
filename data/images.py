"""Image files: the listing of image folders, the files, folders and globs of a command line,
and each image read as uint8 RGB.

Only raster formats are opened, by content as well as by name: Pillow would hand an EPS or
PostScript file (whatever its name) to Ghostscript, an external program. Only regular
files are opened (a pipe named ``x.png`` would block forever), and an image that declares
more pixels than any photo is refused before it is decoded. Every mode comes out as 8-bit RGB,
the right way up: EXIF orientation applied, 16-bit scaled (Pillow's own conversion clips it),
alpha dropped (as PaddleClas's OpenCV decoder does), CMYK, grey and palette converted.
"""

import glob
import os
import stat
import warnings
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.errors import UserError
from utils.io.files import path_problem

# Pillow format names of the raster images read here, and the file names searched for.
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm", ".pnm")
# 40 megapixels (e.g. 7,746 x 5,164): decoding more from a small file is a bomb, not a photo.
# Pillow checks it from the header, before decoding (and refuses twice as many outright).
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow modes of integers wider than 8 bits: 16-bit PNG and TIFF, and 32-bit ones.
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The most the sides of an image may differ (panoramas are about 4:1 to 10:1).
MAX_ASPECT = 16
# Folders nested deeper than this under an image folder are refused (far above any data set;
# walking thousands of levels recursed past Python's limit).
MAX_FOLDER_DEPTH = 32


def find_images(inputs: list[str]) -> list[str]:
    """The image paths that ``inputs`` name, in order: files as given, folders searched
    (recursively, sorted, regular files with a raster image extension), glob patterns
    expanded (sorted)."""
    found = []
    for item in inputs:
        if os.path.isdir(item):
            found += sorted(image_files(item))
        elif not path_problem(item):
            found.append(item)
        elif glob.has_magic(item) and glob.glob(item, recursive=True):
            found += sorted(path for path in glob.glob(item, recursive=True)
                            if not path_problem(path))
        else:
            problem = path_problem(item)
            if problem == "does not exist":
                problem = "is not an image file, a folder or a pattern that matches files"
            raise UserError(f"{item} {problem}")
    if not found:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(inputs)}")
    return found


def file_identity(path: str) -> tuple[int, int]:
    """The device and inode of ``path`` (links followed): one folder however it is reached."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def image_files(folder: str, prefix: str = "", ignored: Optional[list] = None,
                seen: Optional[set] = None, depth: int = 0) -> list[str]:
    """Paths (``prefix/...``; ``folder/...`` without one) of the image files under
    ``folder``, recursively, each folder's entries sorted by name: the one listing of image
    folders that training, the data's fingerprint, prediction and the benches read. Hidden
    files and folders (``.ipynb_checkpoints``, macOS ``._x.jpg``) are passed over, only
    regular files with a raster-image extension are listed (``ignored[0]`` counts the other
    regular files), symbolic links are followed and a folder in ``seen`` (device and inode:
    those already read) is not entered again, so a link up the tree or into another class
    reads nothing twice; folders nested deeper than ``MAX_FOLDER_DEPTH`` are one error."""
    if depth > MAX_FOLDER_DEPTH:
        raise UserError(f"{folder} lies more than {MAX_FOLDER_DEPTH} folders deep in the image "
                        f"folder; no data set nests so deep: flatten it")
    prefix, ignored = prefix or folder, [0] if ignored is None else ignored
    seen = {file_identity(folder)} if seen is None else seen
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise UserError(f"cannot list {folder} ({exc.strerror})") from None
    found = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        relative = f"{prefix}/{entry.name}"
        if entry.is_dir():
            if file_identity(entry.path) not in seen:
                seen.add(file_identity(entry.path))
                found += image_files(entry.path, relative, ignored, seen, depth + 1)
        elif entry.is_file():  # regular files only (a pipe named x.png would block)
            if is_image_name(entry.name):
                found.append(relative)
            else:
                ignored[0] += 1
    return found


def is_image_name(name: str) -> bool:
    """Whether a file name has a raster image extension (and is not hidden: ``._x.jpg`` files
    are macOS metadata, not images)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (unchanged when the tag is damaged)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the pixels wrong
        return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` RGB array of a Pillow image of any mode.

    Integers wider than 8 bits are read as 16-bit values and scaled by 255/65535 (rounded);
    alpha is dropped.
    """
    if image.mode == "F" or image.mode.startswith("F;"):
        raise UnsupportedPixels("it holds 32-bit floating-point pixels, whose range (0-1? 0-255? "
                         "physical units?) the file does not say; save it as an 8- or 16-bit "
                         "image")
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image).astype(np.float64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise UnsupportedPixels(f"it holds 32-bit integer pixels from {wide.min():.0f} to "
                             f"{wide.max():.0f}, beyond 16 bits; save it as an 8- or 16-bit "
                             f"image")
        grey = np.round(wide * (255 / 65535)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA")  # a palette's transparency needs this step first
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class UnsupportedPixels(ValueError):
    """Pixels whose meaning as 8-bit RGB the file does not say."""


def _check_shape(path, width, height):
    """Refuse an image whose sides differ more than ``MAX_ASPECT`` times, from its header:
    resizing its shorter side to the model's would make the longer one explode (a 1 x
    1,000,000 image is 3 GB at 32 px and 450 GB at 384 px)."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(f"{path} is {width} x {height} pixels, a ratio beyond {MAX_ASPECT}:1 "
                        f"between its sides; crop it to its subject first")


def read_rgb(path: str) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` RGB array of a raster image file, upright (:func:`to_rgb`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe must not block the open
    except OSError as exc:
        raise UserError(f"{path} cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # e.g. replaced by a folder since listed
        os.close(fd)
        raise UserError(f"{path} is not a regular file (a folder, device or pipe)")
    with os.fdopen(fd, "rb") as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle, formats=RASTER_FORMATS) as image:
                    _check_shape(path, *image.size)
                    return to_rgb(upright(image))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise UserError(f"{path} declares more than {MAX_PIXELS:,} pixels ({exc}); resize "
                            f"it first") from None
        except UnidentifiedImageError:
            raise UserError(f"{path} is not a {'/'.join(RASTER_FORMATS)} image") from None
        except UserError:
            raise
        except UnsupportedPixels as exc:
            raise UserError(f"{path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for bad files
            message = " ".join(str(exc).split())[:200]
            raise UserError(f"{path} cannot be decoded ({type(exc).__name__}: {message})") from None
