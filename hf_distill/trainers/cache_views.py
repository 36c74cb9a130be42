"""The views a teacher-output cache stores the teachers' outputs of: fixed views (the center crop and its flip) or
random resized crops (+ flips) drawn once per (image, view) with their boxes stored, so that cached training still
sees UNIC's crop augmentation (as fast knowledge distillation stores its crops with the soft labels)."""

from dataclasses import asdict, dataclass

import torch

from ..data.augmentations import crop_boxes, resize_center


def fixed_views(pixel_values: torch.Tensor, size: int, views: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, 3, S, S]` -> float `[B, 3, size, size]` in [0, 1]: center view, horizontally flipped where
    `views == 1`."""
    images = resize_center(pixel_values, size)
    return torch.where((views == 1).view(-1, 1, 1, 1), images.flip(-1), images)


@dataclass(frozen=True)
class CropViews:
    """Random resized crops (+ horizontal flips) of a teacher-output cache, drawn once per (image, view).

    Args:
        seed (`int`): seed of the generator the boxes are drawn from (part of the cache key).
        scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): area range of the crops (UNIC's RandomResizedCrop).
        ratio (`tuple[float, float]`, defaults to `(3 / 4, 4 / 3)`): aspect ratio range.
        flip_prob (`float`, defaults to 0.5): probability of a horizontal flip.
    """

    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def describe(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def boxes(
        self, num_images: int, num_views: int, load_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`[num_images, num_views, 5]` boxes (see [`~hf_distill.data.augmentations.crop_boxes`]) in pixels of the
        `load_size` square images: a function of the seed and these sizes only (image `i` gets the same boxes whatever
        the shard or batch it is built in). Images read as a stream pass one `generator` (seeded with `seed`) to the
        calls for consecutive runs of images: the draws continue, and image `i` gets the same boxes as in one call."""
        generator = generator if generator is not None else torch.Generator().manual_seed(self.seed)
        uniforms = torch.rand((num_images, num_views, 5), generator=generator, dtype=torch.float32)
        return crop_boxes(uniforms, load_size, load_size, tuple(self.scale), tuple(self.ratio), self.flip_prob)
