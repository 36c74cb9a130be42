"""JPEG draft decoding in the training collator: reduced-scale decode for large downscales, close to the full one."""

import io
import os

import matplotlib
import numpy as np
import pytest
from datasets import Image as ImageFeature
from PIL import Image

from hf_distill.data.image_datasets import ImageCollator, decode_image, resize_center_crop

PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")  # a real 512 x 600 JPEG photo


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def full_decode_reference(value: dict, size: int) -> np.ndarray:
    """The collator's output before draft decoding: datasets' own decoder, bicubic resize, center crop."""
    image = ImageFeature().decode_example(value).convert("RGB")
    return np.asarray(resize_center_crop(image, size)).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photo_bytes():
    with open(PHOTO, "rb") as handle:
        return handle.read()


def test_draft_decodes_at_the_smallest_scale_that_keeps_the_size(photo_bytes):
    original = Image.open(io.BytesIO(photo_bytes)).size
    assert original == (512, 600)
    # libjpeg scales 1/2, 1/4, 1/8: the smallest keeping both sides >= the size
    for size, scale in ((64, 8), (100, 4), (128, 4), (200, 2), (300, 1)):
        image = decode_image({"bytes": photo_bytes, "path": None}, draft_size=size)
        assert image.size == (512 // scale, 600 // scale), size
        assert min(image.size) >= size


def test_collator_with_draft_stays_close_to_the_full_decode_and_can_be_turned_off(photo_bytes, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_bytes)
    for value in ({"bytes": photo_bytes, "path": None}, {"bytes": None, "path": str(path)}):
        expected = full_decode_reference(value, 128)
        drafted = ImageCollator(128)([{"image": value}])["pixel_values"][0].numpy()
        exact = ImageCollator(128, jpeg_draft=False)([{"image": value}])["pixel_values"][0].numpy()
        assert np.array_equal(exact, expected)  # opt-out: the previous decoder, bit for bit
        assert not np.array_equal(drafted, expected)  # the reduced-scale decode really ran
        assert psnr(expected, drafted) > 30


def test_png_and_exif_orientation_are_decoded_like_datasets(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    value = {"bytes": png.getvalue(), "path": None}
    assert np.array_equal(np.asarray(decode_image(value, draft_size=8)), pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", exif=exif)
    value = {"bytes": jpeg.getvalue(), "path": None}
    assert decode_image(value).size == ImageFeature().decode_example(value).size == (40, 60)
    assert np.array_equal(np.asarray(decode_image(value)), np.asarray(ImageFeature().decode_example(value)))


def test_unic_trainer_passes_the_opt_out_to_its_collator(tiny_teachers, image_dataset_dir, tmp_path):
    from ..trainers.test_unic_trainer import build

    assert build(tiny_teachers, image_dataset_dir, tmp_path, max_steps=1).data_collator.jpeg_draft is True
    trainer = build(tiny_teachers, image_dataset_dir, tmp_path / "full", max_steps=1, jpeg_draft=False)
    assert trainer.data_collator.jpeg_draft is False
