"""Batched, device-side training augmentations of UNIC (DINO-style) and the deterministic evaluation transform.

UNIC (Sariyildiz et al., "UNIC: Universal Classification Models via Multi-teacher Distillation", ECCV 2024) trains
with the standard DINO augmentations (Caron et al., 2021, `DataAugmentationDINO` in facebookresearch/dino
`main_dino.py`): random resized crop with horizontal flip, color jitter, random grayscale, Gaussian blur and
solarization. The reference implementations are `torchvision.transforms.RandomResizedCrop`,
`RandomHorizontalFlip`, `ColorJitter`, `RandomGrayscale`, `GaussianBlur` and `RandomSolarize`, which transform one
PIL image or tensor at a time on the host.

Here every op works on a whole batch `[B, 3, H, W]` of float images in [0, 1] on any device:

- each sample gets its own random parameters, drawn in one tensor call per op from an explicit `torch.Generator`
  (which must live on the same device as the images); the global RNG is never used;
- there is no Python loop over the batch and no host synchronisation: "apply with probability p" is a per-sample
  boolean mask combined with `torch.where`, never a host-side branch on per-sample data;
- an op whose probability is 0 (or whose strength is 0) is skipped entirely, so it is an exact identity and draws
  nothing from the generator.

Every public function takes `images` as `[B, 3, H, W]` floats in [0, 1] or `uint8` (converted to float with `/ 255`
first), and the random ones a `generator` on the images' device, the source of all their randomness.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "UnicAugmentation",
    "color_jitter",
    "crop_boxes",
    "gaussian_blur",
    "hsv_to_rgb",
    "random_grayscale",
    "random_resized_crop",
    "resize_center",
    "resized_crop",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "solarize",
]

# ITU-R 601-2 luma weights, as in torchvision's `rgb_to_grayscale` and PIL's `convert("L")`.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """Check that `images` is `[B, 3, H, W]` and return it as floats in [0, 1] (`uint8` is divided by 255)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape [B, 3, H, W], got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"Expected uint8 or floating-point images, got {images.dtype}.")
    return images


def _uniform(shape: tuple[int, ...], low, high, generator: torch.Generator, images: torch.Tensor) -> torch.Tensor:
    """`U(low, high)` samples of `shape` (float32, on the images' device) drawn from `generator` only."""
    if generator is None or not isinstance(generator, torch.Generator):
        raise TypeError("An explicit torch.Generator is required (the global RNG is never used).")
    if generator.device.type != images.device.type:
        raise ValueError(
            f"The generator is on {generator.device} but the images are on {images.device}; create the generator "
            "on the images' device, e.g. torch.Generator(device=images.device)."
        )
    u = torch.rand(shape, generator=generator, device=images.device, dtype=torch.float32)
    return low + (high - low) * u


def _sample_mask(p: float, generator: torch.Generator, images: torch.Tensor) -> torch.Tensor:
    """Per-sample boolean mask of shape `[B, 1, 1, 1]`, each entry True with probability `p`."""
    return (_uniform((images.shape[0],), 0.0, 1.0, generator, images) < p).view(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma `0.299 R + 0.587 G + 0.114 B` of `[..., 3, H, W]` images, returned as `[..., 1, H, W]`.

    Same weights as `torchvision.transforms.functional.rgb_to_grayscale` (ITU-R 601-2).
    """
    r, g, b = images.unbind(dim=-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """Vectorized RGB -> HSV of `[..., 3, H, W]` images in [0, 1]; returns `[..., 3, H, W]` with H, S, V in [0, 1].

    Follows torchvision's `_rgb2hsv` (hue in turns, 0 for gray pixels, no division by zero).
    """
    r, g, b = images.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    gray = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(gray, ones, maxc)
    divisor = torch.where(gray, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.remainder(hue / 6.0, 1.0)
    return torch.stack((hue, saturation, maxc), dim=-3)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Vectorized HSV -> RGB of `[..., 3, H, W]` images (H in turns, S and V in [0, 1]); inverse of `rgb_to_hsv`.

    Uses the closed form `c_n = V - V S clamp(min(k, 4 - k), 0, 1)` with `k = (n + 6 H) mod 6` and `n = 5, 3, 1`
    for R, G, B, which equals the usual six-sector formula (torchvision's `_hsv2rgb`) without any gather.
    """
    hue, saturation, value = images.unbind(dim=-3)
    n = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(-3), 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return value.unsqueeze(-3) * (1.0 - saturation.unsqueeze(-3) * ramp)


def _adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of `[B, 3, H, W]` images by `shift` turns (`[B, 1, 1, 1]`, torchvision's `hue_factor`)."""
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0:1] + shift, 1.0)
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Random resized crop plus random horizontal flip, one affine resampling for the whole batch.

    Batched version of `torchvision.transforms.RandomResizedCrop(size, scale, ratio, interpolation=BICUBIC)`
    followed by `RandomHorizontalFlip(flip_prob)` (the DINO/UNIC global and local crops). For each sample, the crop
    area is `U(scale) * H * W`, the aspect ratio `w / h` is `exp(U(log ratio))`, and the crop is placed uniformly at
    random inside the image.

    Differences from torchvision, all to stay vectorized and sync-free: torchvision re-draws up to 10 times when the
    crop does not fit and then falls back to a center crop; here the crop width and height are instead clamped to
    the image size (so a clamped crop is less extreme in aspect ratio than drawn). Crop sizes and positions are
    continuous (sub-pixel) rather than integers, and the resampling is a single bicubic `F.grid_sample` (border
    padding, no antialiasing when the crop is shrunk) with the flip folded into the same affine transform.

    Args:
        images (`torch.Tensor`), generator (`torch.Generator`):
            The batch and the source of all its randomness (see the module docstring).
        size (`int`):
            Output side length.
        scale (`tuple[float, float]`):
            Range of the crop area as a fraction of the image area.
        ratio (`tuple[float, float]`):
            Range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_prob (`float`):
            Probability of a horizontal flip, per sample.

    Returns:
        `torch.Tensor`: `[B, 3, size, size]` images clamped to [0, 1]. With `scale=(1, 1)`, a ratio that makes the crop
        the full image, `flip_prob=0` and `size == H == W` this is the identity (up to float rounding).
    """
    images = _to_float(images)
    batch, _, height, width = images.shape
    boxes = crop_boxes(_uniform((batch, 5), 0.0, 1.0, generator, images), height, width, scale, ratio, flip_prob)
    return resized_crop(images, boxes, size)


def crop_boxes(
    uniforms: torch.Tensor,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """The crop boxes of [`random_resized_crop`] from `U(0, 1)` draws `uniforms` `[..., 5]`: `[..., 5]` rows
    `(left, top, crop_w, crop_h, flip)` in pixels of a `height x width` image, `flip` 1.0 or 0.0. Separate from the
    resampling so that the boxes can be drawn once and stored (teacher-output cache of random crops)."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * uniforms[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniforms[..., 1])
    crop_w = torch.sqrt(area * aspect).clamp(min=1.0, max=float(width))
    crop_h = torch.sqrt(area / aspect).clamp(min=1.0, max=float(height))
    left = (width - crop_w) * uniforms[..., 2]
    top = (height - crop_h) * uniforms[..., 3]
    flip = (uniforms[..., 4] < flip_prob).to(crop_w.dtype)
    return torch.stack((left, top, crop_w, crop_h, flip), dim=-1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop every image to its box `(left, top, crop_w, crop_h, flip)` (pixels, `[B, 5]`, see [`crop_boxes`]),
    flipped horizontally where `flip` is 1, and resample it to `size x size`: one bicubic `F.grid_sample` (border
    padding, no antialiasing) for the whole batch. Returns `[B, 3, size, size]` floats clamped to [0, 1]."""
    images = _to_float(images)
    batch, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32)
    left, top, crop_w, crop_h, flip = boxes.unbind(-1)
    # Normalized coordinates (align_corners=False): -1 and +1 are the outer edges of the first and last pixels, so
    # the crop [left, left + crop_w] maps to center `(left + crop_w / 2) / W * 2 - 1` and half-extent `crop_w / W`.
    scale_x = crop_w / width
    scale_x = torch.where(flip > 0.5, -scale_x, scale_x)
    scale_y = crop_h / height
    center_x = (2.0 * left + crop_w) / width - 1.0
    center_y = (2.0 * top + crop_h) / height - 1.0
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack(
        (torch.stack((scale_x, zeros, center_x), dim=-1), torch.stack((zeros, scale_y, center_y), dim=-1)), dim=1
    ).to(images.dtype)
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp(0.0, 1.0)


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    p: float = 0.8,
) -> torch.Tensor:
    """Random color jitter applied to each sample with probability `p` (DINO: `RandomApply([ColorJitter], p=0.8)`).

    Batched version of `torchvision.transforms.ColorJitter(brightness, contrast, saturation, hue)`: factors are
    drawn per sample, brightness/contrast/saturation from `U(max(0, 1 - x), 1 + x)` and the hue shift (in turns)
    from `U(-hue, hue)`. Brightness scales the image, contrast blends it with the per-image mean of its grayscale,
    saturation blends it with its grayscale, hue rotates the H channel (vectorized RGB -> HSV -> RGB); the result is
    clamped to [0, 1] after each step, as in torchvision. Unlike torchvision, which shuffles the order of the four
    adjustments on every call, the order here is fixed: brightness, contrast, saturation, hue. A strength of 0
    skips that adjustment exactly.

    Args:
        images (`torch.Tensor`), generator (`torch.Generator`):
            The batch and the source of all its randomness (see the module docstring).
        brightness, contrast, saturation (`float`):
            Jitter strengths `x` (non-negative).
        hue (`float`):
            Maximum hue shift in turns, in [0, 0.5].
        p (`float`):
            Probability of jittering each sample.

    Returns:
        `torch.Tensor`: `[B, 3, H, W]` images in [0, 1]; samples not selected are returned unchanged.
    """
    images = _to_float(images)
    if p <= 0 or (brightness == 0 and contrast == 0 and saturation == 0 and hue == 0):
        return images
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {hue}.")
    batch = images.shape[0]
    mask = _sample_mask(p, generator, images)
    out = images
    if brightness != 0:
        factor = _uniform((batch, 1, 1, 1), max(0.0, 1 - brightness), 1 + brightness, generator, images)
        out = (out * factor.to(out.dtype)).clamp(0.0, 1.0)
    if contrast != 0:
        factor = _uniform((batch, 1, 1, 1), max(0.0, 1 - contrast), 1 + contrast, generator, images).to(out.dtype)
        mean = rgb_to_grayscale(out).mean(dim=(-3, -2, -1), keepdim=True)
        out = (factor * out + (1 - factor) * mean).clamp(0.0, 1.0)
    if saturation != 0:
        factor = _uniform((batch, 1, 1, 1), max(0.0, 1 - saturation), 1 + saturation, generator, images)
        factor = factor.to(out.dtype)
        out = (factor * out + (1 - factor) * rgb_to_grayscale(out)).clamp(0.0, 1.0)
    if hue != 0:
        shift = _uniform((batch, 1, 1, 1), -hue, hue, generator, images).to(out.dtype)
        out = _adjust_hue(out, shift).clamp(0.0, 1.0)
    return torch.where(mask, out, images)


def random_grayscale(images: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Convert each sample to 3-channel grayscale with probability `p` (`torchvision.transforms.RandomGrayscale`).

    Args:
        images (`torch.Tensor`), generator (`torch.Generator`):
            The batch and the source of all its randomness (see the module docstring).
        p (`float`):
            Probability of converting each sample.

    Returns:
        `torch.Tensor`: `[B, 3, H, W]`; selected samples have three equal channels `0.299 R + 0.587 G + 0.114 B`.
    """
    images = _to_float(images)
    if p <= 0:
        return images
    mask = _sample_mask(p, generator, images)
    gray = rgb_to_grayscale(images).expand_as(images)
    return torch.where(mask, gray, images)


def gaussian_blur(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.2,
    sigma: tuple[float, float] = (0.1, 2.0),
) -> torch.Tensor:
    """Gaussian blur with a per-sample random sigma, applied to each sample with probability `p`.

    Batched version of DINO's `GaussianBlur` (PIL `ImageFilter.GaussianBlur(radius=U(0.1, 2.0))`) and of
    `torchvision.transforms.GaussianBlur(kernel_size, sigma)`: sigma (in pixels) is drawn per sample from
    `U(sigma)`; the kernel size is fixed for the whole batch from the largest possible sigma,
    `2 * ceil(3 * sigma[1]) + 1` (capped so that its radius stays below the image side), and the image is padded
    with reflection as in torchvision. The whole batch is blurred with one separable pair of grouped convolutions
    (`[1, B * 3, H, W]` input, `groups=B * 3`, one normalized 1-D kernel per sample and channel).

    Args:
        images (`torch.Tensor`), generator (`torch.Generator`):
            The batch and the source of all its randomness (see the module docstring).
        p (`float`):
            Probability of blurring each sample.
        sigma (`tuple[float, float]`):
            Range of the Gaussian standard deviation, in pixels (positive).

    Returns:
        `torch.Tensor`: `[B, 3, H, W]` images in [0, 1]; samples not selected are returned unchanged.
    """
    images = _to_float(images)
    if p <= 0:
        return images
    batch, channels, height, width = images.shape
    mask = _sample_mask(p, generator, images)
    sigmas = _uniform((batch,), sigma[0], sigma[1], generator, images)
    radius = min(math.ceil(3 * sigma[1]), height - 1, width - 1)
    if radius < 1:
        return images
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigmas[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.dtype)
    kernel = kernel.repeat_interleave(channels, dim=0)  # [B * 3, K], sample-major like the reshaped images
    size = 2 * radius + 1
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(batch * channels, 1, 1, size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(batch * channels, 1, size, 1), groups=batch * channels)
    blurred = flat.view(batch, channels, height, width).clamp(0.0, 1.0)
    return torch.where(mask, blurred, images)


def solarize(images: torch.Tensor, generator: torch.Generator, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    """Solarize each sample with probability `p`: pixels `x >= threshold` become `1 - x`.

    Batched version of `torchvision.transforms.RandomSolarize(threshold, p)` for images in [0, 1] (DINO uses PIL's
    `ImageOps.solarize` with threshold 128 of 255).

    Args:
        images (`torch.Tensor`), generator (`torch.Generator`):
            The batch and the source of all its randomness (see the module docstring).
        p (`float`):
            Probability of solarizing each sample.
        threshold (`float`):
            Values at or above it are inverted.

    Returns:
        `torch.Tensor`: `[B, 3, H, W]` images in [0, 1]; samples not selected are returned unchanged.
    """
    images = _to_float(images)
    if p <= 0:
        return images
    mask = _sample_mask(p, generator, images)
    solarized = torch.where(images >= threshold, 1.0 - images, images)
    return torch.where(mask, solarized, images)


@dataclass
class UnicAugmentation:
    """The UNIC / DINO training augmentation pipeline on batched tensors.

    Calling it applies, in this order: `random_resized_crop` (with horizontal flip), `color_jitter`,
    `random_grayscale`, `gaussian_blur` and `solarize`, each with its own per-sample random parameters drawn from the
    given generator. The defaults follow DINO's global-crop recipe (`main_dino.py`, `DataAugmentationDINO`) with
    blur and solarization probabilities of 0.2. A probability of 0 skips that op exactly.

    Example:

    ```python
    >>> augment = UnicAugmentation()
    >>> generator = torch.Generator().manual_seed(0)
    >>> augment(torch.rand(4, 3, 64, 64), 32, generator).shape
    torch.Size([4, 3, 32, 32])
    ```
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5

    def __call__(self, images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch.

        Args:
            images (`torch.Tensor`), generator (`torch.Generator`):
                The batch and the source of all its randomness (see the module docstring).
            size (`int`):
                Output side length.

        Returns:
            `torch.Tensor`: `[B, 3, size, size]` float images in [0, 1].
        """
        images = _to_float(images)
        images = random_resized_crop(images, size, generator, self.scale, self.ratio, self.flip_prob)
        images = color_jitter(
            images, generator, self.brightness, self.contrast, self.saturation, self.hue, self.color_jitter_p
        )
        images = random_grayscale(images, generator, self.grayscale_p)
        images = gaussian_blur(images, generator, self.blur_p, self.blur_sigma)
        return solarize(images, generator, self.solarize_p, self.solarize_threshold)


def resize_center(images: torch.Tensor, size: int) -> torch.Tensor:
    """Deterministic evaluation transform: resize the shorter side to `size`, then center-crop `size x size`.

    Tensor equivalent of `torchvision.transforms.Compose([Resize(size, BICUBIC, antialias=True), CenterCrop(size)])`
    (and of `_to_square_uint8` in `image_datasets.py`), using `F.interpolate(mode="bicubic", antialias=True)`.

    Args:
        images (`torch.Tensor`):
            `[B, 3, H, W]` float images in [0, 1] or `uint8` images.
        size (`int`):
            Output side length.

    Returns:
        `torch.Tensor`: `[B, 3, size, size]` float images clamped to [0, 1].
    """
    images = _to_float(images)
    height, width = images.shape[-2:]
    factor = size / min(height, width)
    new_height, new_width = max(size, round(height * factor)), max(size, round(width * factor))
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return images[:, :, top : top + size, left : left + size].clamp(0.0, 1.0)
