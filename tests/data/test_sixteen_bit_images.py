"""16-bit grayscale images (`I;16` modes) are scaled to 8 bits, not clipped, wherever images are decoded."""

import io

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from hf_distill.data.image_datasets import ImageCollator, to_rgb

# 16-bit values and their 8-bit values round(v * 255 / 65535) = round(v / 257), by hand
SIXTEEN = [0, 128, 129, 257, 32767, 32768, 65278, 65534, 65535]
EIGHT = [0, 0, 1, 1, 127, 128, 254, 255, 255]


def test_sixteen_bit_values_become_the_right_eight_bit_values():
    image = Image.fromarray(np.array([SIXTEEN], dtype=np.uint16))
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, len(SIXTEEN), 3)
    for channel in range(3):
        assert rgb[0, :, channel].tolist() == EIGHT


def test_sixteen_bit_gradient_spans_the_eight_bit_range():
    gradient = Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16))  # 0, 257, ..., 65535
    rgb = np.asarray(to_rgb(gradient))
    assert rgb[..., 0].ravel().tolist() == list(range(256))  # not 99.6% of the pixels at 255


def test_big_endian_sixteen_bit_images():
    values = np.array(SIXTEEN, dtype=">u2")
    image = Image.frombytes("I;16B", (len(SIXTEEN), 1), values.tobytes())
    assert np.asarray(to_rgb(image))[0, :, 1].tolist() == EIGHT


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_eight_bit_images_are_unchanged(mode):
    array = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    image = Image.fromarray(array).convert(mode)
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_collator_scales_sixteen_bit_png_images_from_a_dataset():
    """The training / caching / evaluation path: a 16-bit PNG stored in a `datasets` Image column."""
    values = np.array(SIXTEEN * 9, dtype=np.uint16)[:81].reshape(9, 9)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    dataset = Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}]}).cast_column(
        "image", ImageFeature()
    )
    assert dataset[0]["image"].mode == "I;16"
    batch = ImageCollator(9)([dataset[0]])
    pixels = batch["pixel_values"][0].numpy()  # [3, 9, 9]; size 9 = the image size: no resampling
    expected = np.array(EIGHT * 9, dtype=np.uint8)[:81].reshape(9, 9)
    for channel in range(3):
        assert np.array_equal(pixels[channel], expected)
