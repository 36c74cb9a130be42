"""Training arguments of the UDON trainer."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.domain_sampler import STRATEGIES
from ..hub.push import HubTokenNotPickled
from .nonfinite import NonFiniteArguments
from .view_config import ViewArguments


@dataclass
class UdonConfig(HubTokenNotPickled, TrainingArguments, ViewArguments, NonFiniteArguments):
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
        max_nonfinite_fraction (`float`, defaults to 0.25), max_skipped_steps (`int`, defaults to 10):
            Limits of the non-finite guard ([`~hf_distill.trainers.nonfinite.NonFiniteArguments`]): training stops
            when more of a teacher's samples in a logging window, or more consecutive steps, are non-finite.
        verify_images (`bool`, defaults to `True`): decode every image once before training (in parallel, cached
            by dataset fingerprint) and stop with the list of unreadable files; `False` skips the check.
        skip_bad_images (`bool`, defaults to `False`): train without the unreadable images found by the check
            (each one is logged) instead of stopping.
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

    verify_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once before training (parallel, cached by dataset fingerprint) and stop with "
            "the list of unreadable files. False skips the check."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Train without the unreadable images found by --verify_images (each one logged)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sampling not in STRATEGIES:
            raise ValueError(f"--sampling must be one of {STRATEGIES}, got {self.sampling!r}.")
        self.check_views()
        if self.sampler_update_every < 1:
            raise ValueError("--sampler_update_every must be >= 1.")
