"""Training arguments of the task-specific distillation trainer."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.image_verification import ImageCheckArguments
from ..hub.push import HubTokenNotPickled
from .nonfinite import NonFiniteArguments
from .view_config import AugmentationArguments, changed_default


@dataclass
class KDConfig(HubTokenNotPickled, TrainingArguments, AugmentationArguments, ImageCheckArguments, NonFiniteArguments):
    r"""
    Configuration of [`KDTrainer`]: all [`~transformers.TrainingArguments`] plus the distillation settings below.
    The loss is `(1 - alpha) * CE + alpha * temperature^2 * KL` on real images and the KL term alone on synthetic ones
    ([`kd_loss`]). The paper's exact alpha, temperature and synthetic-set size are not known here: they are settings.

    Parameters:
        alpha (`float`, defaults to 0.5): weight of the distillation term, in `[0, 1]` (0: plain supervised training).
        temperature (`float`, defaults to 2.0): softmax temperature of the distillation term, `> 0`.
        synthetic_ratio (`float`, defaults to 0.0): fraction of every batch taken from the synthetic images, in
            `[0, 1)`; needs a synthetic dataset when `> 0`.
        image_size (`int`, defaults to 224): side of the training crops (student input).
        load_size (`int`, *optional*): side the images are resized (shorter side) and center-cropped to before the
            random crop; defaults to `image_size * 8 // 7` (256 for 224).
        crop_scale (`list[float]`, defaults to `[0.35, 1.0]`): area range of the random resized crops.
        flip_prob (`float`, defaults to 0.5): horizontal flip probability.
        color_jitter_prob, grayscale_prob, blur_prob, solarize_prob (`float`, default to 0): probabilities of the
            other DINO / UNIC augmentations ([`UnicAugmentation`]), applied after the crop; 0 skips the op exactly.
            Real and synthetic images get the same augmentations; the teacher sees the student's view.
        Also the options of [`AugmentationArguments`], [`~hf_distill.data.image_verification.ImageCheckArguments`]
            (`verify_images`, `skip_bad_images`) and [`~hf_distill.trainers.nonfinite.NonFiniteArguments`]
            (`max_nonfinite_fraction`, `max_skipped_steps`).
    """

    alpha: float = field(default=0.5, metadata={"help": "Weight of the KL term, in [0, 1]."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    synthetic_ratio: float = field(default=0.0, metadata={"help": "Fraction of each batch from synthetic images."})
    # milder than UNIC's: crops of at least 35% of the image, no color jitter, grayscale, blur or solarization
    crop_scale: list[float] = changed_default(AugmentationArguments, "crop_scale", [0.35, 1.0])
    color_jitter_prob: float = changed_default(AugmentationArguments, "color_jitter_prob", 0.0)
    grayscale_prob: float = changed_default(AugmentationArguments, "grayscale_prob", 0.0)
    blur_prob: float = changed_default(AugmentationArguments, "blur_prob", 0.0)
    solarize_prob: float = changed_default(AugmentationArguments, "solarize_prob", 0.0)
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image/label columns."})

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}.")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.synthetic_ratio < 1.0:
            raise ValueError(f"--synthetic_ratio must be in [0, 1), got {self.synthetic_ratio}.")
        self.check_views()
