"""data/images.py: image files read as upright 8-bit RGB, and the ones refused before they
are decoded (sizes that would explode, float and 32-bit images, a folder in a file's place)."""

import os

import numpy as np
import pytest
from conftest import png_file
from PIL import Image

from data.images import MAX_ASPECT, read_rgb
from utils.errors import UserError


def test_an_image_whose_resize_would_explode_is_refused_from_its_header(tmp_path):
    wide = png_file(tmp_path / "wide.png", width=MAX_ASPECT * 10 + 1, height=10)
    with pytest.raises(UserError, match=f"a ratio beyond {MAX_ASPECT}:1"):
        read_rgb(str(wide))
    tall = png_file(tmp_path / "tall.png", width=1, height=3000)
    with pytest.raises(UserError, match="1 x 3000 pixels"):
        read_rgb(str(tall))
    assert read_rgb(str(png_file(tmp_path / "ok.png", width=MAX_ASPECT * 10, height=10))).shape == \
        (10, MAX_ASPECT * 10, 3)


def test_float_and_32_bit_integer_images_are_refused_not_read_black(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    with pytest.raises(UserError, match="32-bit floating-point pixels"):
        read_rgb(str(tmp_path / "float.tif"))
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(UserError, match="32-bit integer pixels from 0 to 1000000"):
        read_rgb(str(tmp_path / "int32.tif"))
    small = (ramp * 65535).astype(np.int32)  # 32-bit storage of 16-bit values: scaled
    Image.fromarray(small).save(tmp_path / "int16in32.tif")
    got = read_rgb(str(tmp_path / "int16in32.tif"))
    np.testing.assert_array_equal(got[..., 0], np.round(small * (255 / 65535)).astype(np.uint8))


def test_an_image_replaced_by_a_folder_is_an_unreadable_image(tmp_path):
    image = png_file(tmp_path / "x.png")
    os.remove(image)
    image.mkdir()
    with pytest.raises(UserError, match="is not a regular file"):
        read_rgb(str(image))
