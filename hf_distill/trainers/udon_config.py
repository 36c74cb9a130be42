"""Training arguments of the UDON trainer."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.domain_sampler import STRATEGIES
from ..data.image_verification import ImageCheckArguments
from ..hub.push import HubTokenNotPickled
from .nonfinite import NonFiniteArguments
from .view_config import ViewArguments


@dataclass
class UdonConfig(HubTokenNotPickled, TrainingArguments, ViewArguments, ImageCheckArguments, NonFiniteArguments):
    r"""
    Configuration of [`UdonTrainer`]: all [`~transformers.TrainingArguments`] plus the UDON settings below. Defaults
    follow the UDON code: heads and classifiers at `learning_rate` 1e-3, backbone at 1e-5 and frozen for the first 2
    epochs, weight decay 1e-6, batch 128, 10 epochs, resize 256 + random crop 224 + flip.

    Parameters:
        sampling (`str`, defaults to `"dynamic"`): domain sampling strategy, one of `round_robin`, `proportional`,
            `balanced`, `dynamic` (UDON).
        sampler_update_every (`int`, defaults to 1000): optimizer steps between updates of the dynamic weights.
        backbone_learning_rate (`float`, defaults to 1e-5): learning rate of the shared backbone.
        freeze_backbone_epochs (`float`, defaults to 2): epochs during which the backbone gets no gradient.
        image_size (`int`, defaults to 224): side of the training crops.
        load_size (`int`, *optional*): side the images are resized (and center-cropped) to before cropping;
            defaults to `image_size * 8 // 7` (256 for 224).
        flip_prob (`float`, defaults to 0.5): horizontal flip probability.
        Also the options of [`ViewArguments`], [`~hf_distill.data.image_verification.ImageCheckArguments`]
            (`verify_images`, `skip_bad_images`) and [`~hf_distill.trainers.nonfinite.NonFiniteArguments`]
            (`max_nonfinite_fraction`, `max_skipped_steps`).
    """

    sampling: str = field(default="dynamic", metadata={"help": f"Domain sampling strategy, one of {STRATEGIES}."})
    sampler_update_every: int = field(default=1000, metadata={"help": "Steps between dynamic sampler updates."})
    backbone_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the backbone."})
    freeze_backbone_epochs: float = field(default=2.0, metadata={"help": "Epochs with a frozen backbone."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the heads and classifiers."})
    weight_decay: float = field(default=1e-6, metadata={"help": "Weight decay."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Images per batch (one domain)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image/label/domain columns."})
    ddp_find_unused_parameters: bool | None = field(
        default=True, metadata={"help": "Each batch uses one domain's heads, so DDP must expect unused parameters."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sampling not in STRATEGIES:
            raise ValueError(f"--sampling must be one of {STRATEGIES}, got {self.sampling!r}.")
        self.check_views()
        if self.sampler_update_every < 1:
            raise ValueError("--sampler_update_every must be >= 1.")
