"""The view settings the three training configurations share (one rule for the decoded size), and the augmentation
settings of the two that use the DINO / UNIC augmentations (one type for the crop scale)."""

from dataclasses import dataclass, field

from ..data.augmentations import UnicAugmentation


def default_load_size(image_size: int) -> int:
    """Side of the decoded images for training views of side `image_size`: the 8/7 resize of ImageNet evaluation
    (256 for 224), rounded down."""
    return image_size * 8 // 7


def changed_default(owner: type, name: str, default):
    """The dataclass field `name` of `owner` with another default, its help kept: a configuration that inherits the
    field changes its default with `name: type = changed_default(Owner, "name", value)`."""
    metadata = owner.__dataclass_fields__[name].metadata
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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


@dataclass
class AugmentationArguments(ViewArguments):
    r"""
    Training-view settings plus those of the batched DINO / UNIC augmentations ([`UnicAugmentation`]): a random resized
    crop with flip, then color jitter, grayscale, Gaussian blur and solarization. The defaults are UNIC's (DINO's global
    crops); a configuration changes them with [`changed_default`].

    Parameters:
        crop_scale (`list[float]`, defaults to `[0.08, 1.0]`):
            Area range `[min, max]` of the random resized crops, `0 < min <= max <= 1`.
        color_jitter_prob, grayscale_prob, blur_prob, solarize_prob (`float`, default to 0.8, 0.2, 0.2, 0.2):
            Probabilities, in `[0, 1]`, of color jitter (0.4, 0.4, 0.2, 0.1), grayscale, blur and solarization; 0 skips
            the op exactly.
    """

    crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "RandomResizedCrop area range.", "nargs": 2}
    )
    color_jitter_prob: float = field(default=0.8, metadata={"help": "ColorJitter(0.4, 0.4, 0.2, 0.1) probability."})
    grayscale_prob: float = field(default=0.2, metadata={"help": "Grayscale probability."})
    blur_prob: float = field(default=0.2, metadata={"help": "Gaussian blur probability."})
    solarize_prob: float = field(default=0.2, metadata={"help": "Solarization probability."})

    def check_views(self) -> None:
        """The checks of [`ViewArguments`], then `crop_scale` (made a list of floats) and the probabilities."""
        super().check_views()
        self.crop_scale = check_crop_scale(self.crop_scale)
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}.")

    def augmentation(self) -> UnicAugmentation:
        """The batched training augmentation of these settings."""
        return UnicAugmentation(
            scale=tuple(self.crop_scale),
            flip_prob=self.flip_prob,
            color_jitter_p=self.color_jitter_prob,
            grayscale_p=self.grayscale_prob,
            blur_p=self.blur_prob,
            solarize_p=self.solarize_prob,
        )
