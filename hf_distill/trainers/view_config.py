"""The view settings the three training configurations share: one rule for the decoded size, one type for the crop
scale."""

from dataclasses import dataclass, field


def default_load_size(image_size: int) -> int:
    """Side of the decoded images for training views of side `image_size`: the 8/7 resize of ImageNet evaluation
    (256 for 224), rounded down."""
    return image_size * 8 // 7


def check_crop_scale(crop_scale) -> list[float]:
    """`[min, max]` area fractions of random resized crops, `0 < min <= max <= 1`, as floats."""
    values = [float(value) for value in crop_scale]
    if len(values) != 2 or not 0.0 < values[0] <= values[1] <= 1.0:
        raise ValueError(f"--crop_scale takes two area fractions MIN MAX with 0 < MIN <= MAX <= 1, got {crop_scale}.")
    return values


@dataclass
class ViewArguments:
    r"""
    Training-view settings shared by the UNIC, UDON and task-specific configurations.

    Parameters:
        image_size (`int`, defaults to 224):
            Side of the square training views (student input).
        load_size (`int`, *optional*):
            Side the images are decoded at (shorter side resized, then center-cropped) before the random crop; defaults
            to `image_size * 8 // 7` (256 for 224). Must be >= `image_size`.
        flip_prob (`float`, defaults to 0.5):
            Horizontal flip probability.
        jpeg_draft (`bool`, defaults to `True`):
            Decode JPEGs at 1/2, 1/4 or 1/8 scale when that still gives `load_size` pixels on both sides (PIL draft
            mode, [`~hf_distill.data.image_datasets.decode_image`]): 1.3-2.3x faster decoding of ~600 px photos to
            256-64 px, at least 36 dB PSNR from the full decode (`make bench-decode`). `False` decodes in full.
    """

    image_size: int = field(default=224, metadata={"help": "Side of the square training views."})
    load_size: int | None = field(
        default=None,
        metadata={"help": "Side of the decoded images the training views are cropped from (image_size * 8 // 7)."},
    )
    flip_prob: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    jpeg_draft: bool = field(
        default=True,
        metadata={"help": "Decode large JPEGs at reduced scale (PIL draft mode) when that still gives load_size."},
    )

    def check_views(self) -> None:
        """Fill the default `load_size` and check the sizes and the flip probability (call in `__post_init__`)."""
        if self.image_size < 1:
            raise ValueError(f"--image_size must be >= 1, got {self.image_size}.")
        if self.load_size is None:
            self.load_size = default_load_size(self.image_size)
        if self.load_size < self.image_size:
            raise ValueError(f"--load_size ({self.load_size}) must be >= --image_size ({self.image_size}).")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"--flip_prob must be in [0, 1], got {self.flip_prob}.")
