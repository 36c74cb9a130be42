"""Batched UNIC/DINO augmentations: shapes, ranges, determinism, per-sample randomness and exact special cases."""

import pytest
import torch

from hf_distill.data.augmentations import (
    UnicAugmentation,
    _adjust_hue,
    color_jitter,
    gaussian_blur,
    hsv_to_rgb,
    random_grayscale,
    random_resized_crop,
    resize_center,
    rgb_to_hsv,
    solarize,
)

B = 8


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_images(batch=B, height=32, width=32, seed=123):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def identical_images(batch=16, size=32):
    return rand_images(1, size, size).expand(batch, -1, -1, -1).contiguous()


def checkerboard(batch=2, size=32):
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((x + y) % 2).float()
    return board.expand(batch, 3, size, size).contiguous()


# Each op as `f(images, generator) -> images`, with its output side for shape checks (None: same as input).
OPS = {
    "crop": (lambda x, g: random_resized_crop(x, 24, g), 24),
    "jitter": (lambda x, g: color_jitter(x, g, p=0.5), None),
    "grayscale": (lambda x, g: random_grayscale(x, g, p=0.5), None),
    "blur": (lambda x, g: gaussian_blur(x, g, p=0.5), None),
    "solarize": (lambda x, g: solarize(x, g, p=0.5), None),
    "pipeline": (lambda x, g: UnicAugmentation()(x, 24, g), 24),
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_shapes_range_and_dtype(name, dtype):
    op, side = OPS[name]
    images = rand_images(height=32, width=40)
    if dtype == torch.uint8:
        images = (images * 255).round().to(torch.uint8)
    out = op(images, gen())
    side_h, side_w = (side, side) if side else (32, 40)
    assert out.shape == (B, 3, side_h, side_w)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(OPS))
def test_determinism_and_global_rng_untouched(name):
    op, _ = OPS[name]
    images = rand_images()
    state = torch.get_rng_state()
    first, again, other = op(images, gen(0)), op(images, gen(0)), op(images, gen(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", list(OPS))
def test_per_sample_randomness(name):
    op, _ = OPS[name]
    images = identical_images()
    out = op(images, gen(3))
    assert not all(torch.equal(out[0], out[i]) for i in range(1, len(out)))


@pytest.mark.parametrize("name", ["jitter", "grayscale", "blur", "solarize"])
def test_probability_half_selects_a_subset(name):
    op, _ = OPS[name]
    images = identical_images()
    changed = (op(images, gen(5)) - images).abs().flatten(1).amax(1) > 1e-6
    assert 0 < changed.sum() < len(images)


def test_crop_identity_and_exact_flip():
    images = rand_images()
    kwargs = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    same = random_resized_crop(images, 32, gen(), flip_prob=0.0, **kwargs)
    torch.testing.assert_close(same, images, atol=1e-5, rtol=0)
    flipped = random_resized_crop(images, 32, gen(), flip_prob=1.0, **kwargs)
    torch.testing.assert_close(flipped, images.flip(-1), atol=1e-5, rtol=0)
    # Non-square 32 x 48 input with ratio 3 / 2: the crop is the full image, squeezed to 32 x 32, so output pixel
    # centers sit at input x = 0.25, 1.75, ..., 46.75.
    ramp = (torch.arange(48, dtype=torch.float32) / 47).expand(B, 3, 32, 48)
    full = random_resized_crop(ramp, 32, gen(), scale=(1.0, 1.0), ratio=(1.5, 1.5), flip_prob=0.0)
    expected = ((0.25 + 1.5 * torch.arange(32)) / 47).expand_as(full)
    torch.testing.assert_close(full, expected, atol=2e-3, rtol=0)  # PyTorch's bicubic (a=-0.75) is near-linear


def test_crop_covers_quarter_area():
    size = 64
    ramp = torch.arange(size, dtype=torch.float32) / (size - 1)  # pixel value encodes x
    images = ramp.expand(B, 3, size, size).contiguous()
    out = random_resized_crop(images, 32, gen(7), scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_prob=0.0)
    span = out[..., -1] - out[..., 0]
    # A 32 x 32 crop of a 64-wide ramp spans 31 / 63 of the x range; every row is increasing (no flip).
    torch.testing.assert_close(span, torch.full_like(span, 31 / 63), atol=0.02, rtol=0)
    assert (out.diff(dim=-1) > 0).all()
    # Positions are random per sample.
    assert out[:, 0, 0, 0].std() > 0.05
    # With flip_prob=1 every row decreases.
    flipped = random_resized_crop(images, 32, gen(7), scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_prob=1.0)
    assert (flipped.diff(dim=-1) < 0).all()


def test_crop_aspect_ratio_is_respected():
    size = 64
    y = torch.arange(size, dtype=torch.float32) / (size - 1)
    images = y[:, None].expand(B, 3, size, size).contiguous()  # pixel value encodes y
    out = random_resized_crop(images, 32, gen(), scale=(0.25, 0.25), ratio=(4.0, 4.0), flip_prob=0.0)
    # w / h = 4 with area 1024: w = 64, h = 16 pixels, so the output spans 15.5 / 63 of the y range.
    span = out[..., -1, :] - out[..., 0, :]
    torch.testing.assert_close(span, torch.full_like(span, 15.5 / 63), atol=0.02, rtol=0)


def test_grayscale_formula():
    images = rand_images()
    out = random_grayscale(images, gen(), p=1.0)
    expected = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], expected)


def test_probability_zero_is_exact_identity():
    images = rand_images()
    g = gen()
    state = g.get_state()
    assert torch.equal(color_jitter(images, g, p=0.0), images)
    assert torch.equal(random_grayscale(images, g, p=0.0), images)
    assert torch.equal(gaussian_blur(images, g, p=0.0), images)
    assert torch.equal(solarize(images, g, p=0.0), images)
    assert torch.equal(g.get_state(), state)
    crop_only = random_resized_crop(images, 32, gen(1), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    nothing = UnicAugmentation(
        scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0, color_jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0
    )
    assert torch.equal(nothing(images, 32, gen(1)), crop_only)
    torch.testing.assert_close(crop_only, images, atol=1e-5, rtol=0)


def test_solarize_formula():
    images = rand_images()
    out = solarize(images, gen(), p=1.0, threshold=0.5)
    expected = torch.where(images >= 0.5, 1 - images, images)
    assert torch.equal(out, expected)
    assert (out <= 0.5).all()


def test_blur_smooths_and_preserves_constants():
    board = checkerboard()
    blurred = gaussian_blur(board, gen(), p=1.0, sigma=(1.0, 2.0))
    assert blurred.var() < 0.1 * board.var()
    constant = torch.full((B, 3, 32, 32), 0.3)
    torch.testing.assert_close(gaussian_blur(constant, gen(), p=1.0), constant)
    # A tiny sigma is (almost) the identity; the kernel is normalized so the mean of any image is kept closely.
    sharp = gaussian_blur(board, gen(), p=1.0, sigma=(0.1, 0.1))
    torch.testing.assert_close(sharp, board, atol=1e-4, rtol=0)
    images = rand_images()
    torch.testing.assert_close(
        gaussian_blur(images, gen(), p=1.0).mean(dim=(1, 2, 3)), images.mean(dim=(1, 2, 3)), atol=5e-3, rtol=0
    )


def test_blur_per_sample_sigma():
    board = checkerboard(batch=16)
    variances = gaussian_blur(board, gen(2), p=1.0).var(dim=(1, 2, 3))
    assert variances.max() > 2 * variances.min()


def test_jitter_zero_strength_is_identity():
    images = rand_images()
    out = color_jitter(images, gen(), brightness=0, contrast=0, saturation=0, hue=0, p=1.0)
    assert torch.equal(out, images)
    # Brightness/contrast/saturation of 0 draw factors of exactly 1; only a hue of 0 goes through HSV and back.
    out = color_jitter(images, gen(), brightness=0, contrast=0, saturation=0, hue=1e-12, p=1.0)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_jitter_brightness_and_contrast():
    images = rand_images() * 0.5 + 0.25
    brighter = color_jitter(images, gen(), brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0)
    ratios = brighter / images
    per_sample = ratios.flatten(1)
    # Brightness multiplies each image by one factor in [0.6, 1.4] (no clamping here since values are <= 0.75 * 1.4).
    assert ((per_sample.amax(1) - per_sample.amin(1)) < 1e-5).all()
    assert (per_sample >= 0.6 - 1e-6).all() and (per_sample <= 1.4 + 1e-6).all()
    contrasted = color_jitter(images, gen(), brightness=0, contrast=0.4, saturation=0, hue=0, p=1.0)
    gray_mean = lambda x: (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))  # noqa: E731
    torch.testing.assert_close(gray_mean(contrasted), gray_mean(images), atol=1e-5, rtol=0)
    assert not torch.allclose(contrasted, images)


def test_jitter_saturation_keeps_gray_pixels():
    gray = rand_images()[:, :1].expand(B, 3, 32, 32).contiguous()
    out = color_jitter(gray, gen(), brightness=0, contrast=0, saturation=0.9, hue=0.5, p=1.0)
    torch.testing.assert_close(out, gray, atol=1e-5, rtol=0)


def test_hsv_round_trip_and_hue_shift():
    colors = rand_images(seed=9)
    hsv = rgb_to_hsv(colors)
    assert hsv.min() >= 0 and hsv.max() <= 1
    torch.testing.assert_close(hsv_to_rgb(hsv), colors, atol=1e-5, rtol=0)
    # Known colors: pure red, green, blue, and a gray with zero saturation.
    known = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1)
    expected = torch.tensor([[0.0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5]]).view(4, 3, 1, 1)
    torch.testing.assert_close(rgb_to_hsv(known), expected)
    # A hue shift of a third of a turn maps red -> green -> blue -> red.
    rgb = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    shifted = rgb_to_hsv(rgb)
    shifted[:, 0] = (shifted[:, 0] + 1 / 3) % 1
    torch.testing.assert_close(hsv_to_rgb(shifted), torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1))


def test_zero_hue_shift_is_identity():
    colors = rand_images(seed=11)
    out = _adjust_hue(colors, torch.zeros(B, 1, 1, 1))
    torch.testing.assert_close(out, colors, atol=1e-5, rtol=0)
    # A full turn is also the identity, a half turn is not.
    torch.testing.assert_close(_adjust_hue(colors, torch.ones(B, 1, 1, 1)), colors, atol=1e-5, rtol=0)
    assert not torch.allclose(_adjust_hue(colors, torch.full((B, 1, 1, 1), 0.5)), colors, atol=0.1)


def test_uint8_equals_float_input():
    uint8 = (rand_images() * 255).round().to(torch.uint8)
    as_float = uint8.float() / 255
    augment = UnicAugmentation()
    assert torch.equal(augment(uint8, 24, gen(4)), augment(as_float, 24, gen(4)))


def test_generator_required():
    with pytest.raises(TypeError):
        random_grayscale(rand_images(), None, p=1.0)


def test_resize_center():
    images = rand_images(height=32, width=48)
    out = resize_center(images, 16)
    assert out.shape == (B, 3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1
    # Shorter side already at `size`: a pure center crop.
    torch.testing.assert_close(resize_center(images, 32), images[..., 8:40])
    uint8 = (images * 255).round().to(torch.uint8)
    assert resize_center(uint8, 16).dtype == torch.float32
    # A horizontal ramp keeps its center and spans two thirds of the range after the center crop.
    ramp = (torch.arange(48, dtype=torch.float32) / 47).expand(1, 3, 32, 48)
    row = resize_center(ramp, 16)[0, 0, 8]
    assert abs(row.mean().item() - 0.5) < 0.01
    assert abs((row[-1] - row[0]).item() - 2 / 3 * 15 / 16) < 0.03
