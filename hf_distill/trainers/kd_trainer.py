"""`KDTrainer`: a small image classifier distilled from a probed teacher, on real and synthetic images."""

import logging
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerCallback

from ..data.augmentations import UnicAugmentation, resize_center
from ..data.image_datasets import ImageCollator
from ..data.mixed_batch_sampler import MixedBatchSampler
from ..hub.push import PushExportMixin
from ..losses.kd import kd_loss
from ..models.probed_teacher import ProbedTeacher
from .kd_config import KDConfig

logger = logging.getLogger(__name__)


class _SamplerEpoch(TrainerCallback):
    def __init__(self, sampler: MixedBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


class KDTrainer(PushExportMixin, Trainer):
    """Trains `model` (any transformers image classification model) against a [`ProbedTeacher`].

    Args:
        model ([`~transformers.PreTrainedModel`]): the student; `model(pixel_values=...).logits` is `(B, C)`.
        teacher ([`ProbedTeacher`]): frozen, run in inference mode on the same augmented views as the student.
        args ([`KDConfig`]): training arguments.
        train_dataset: real rows then synthetic rows, with the columns `image` and `label` (-100 on synthetic rows).
        num_synthetic (`int`): number of synthetic rows at the end of `train_dataset`.
        image_mean, image_std (`list[float]`): the student's input normalization.
        Other arguments are those of [`~transformers.Trainer`].
    """

    _tag_names = ["hf_distill", "distillation", "image-classification"]
    # `compute_loss` returns a per-batch mean: the Trainer must divide it by the gradient accumulation steps (stock
    # classifiers accept loss kwargs, which would otherwise make it count the loss as already scaled)
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel,
        teacher: ProbedTeacher,
        args: KDConfig,
        train_dataset,
        num_synthetic: int = 0,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        callbacks=None,
        **kwargs,
    ):
        if teacher.num_labels != model.config.num_labels:
            raise ValueError(
                f"The probed teacher predicts {teacher.num_labels} classes but the student has "
                f"{model.config.num_labels}: build the student with num_labels={teacher.num_labels}."
            )
        self.batch_sampler = MixedBatchSampler(
            len(train_dataset) - num_synthetic,
            num_synthetic,
            args.per_device_train_batch_size,
            args.synthetic_ratio,
            args.seed,
        )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=ImageCollator(args.load_size, int_columns={"labels": "label"}),
            callbacks=callbacks,
            **kwargs,
        )
        self.add_callback(_SamplerEpoch(self.batch_sampler))
        self.teacher = self._prepare_teacher(teacher)
        self.augmentation = UnicAugmentation(
            scale=(args.crop_scale, 1.0),
            flip_prob=args.flip_prob,
            color_jitter_p=args.color_jitter_prob,
            grayscale_p=args.grayscale_prob,
            blur_p=args.blur_prob,
            solarize_p=args.solarize_prob,
        )
        self._mean = torch.tensor(image_mean, device=args.device).view(1, -1, 1, 1)
        self._std = torch.tensor(image_std, device=args.device).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=args.device)
        self._rng_position = (-1, 0)  # (global step, call within the step) of the last augmentation draw
        self._metrics = defaultdict(list)

    def _prepare_teacher(self, teacher: ProbedTeacher) -> torch.nn.Module:
        """The frozen probed teacher on this process's device, never wrapped by DDP. Without DeepSpeed / FSDP,
        `prepare_model(evaluation_mode=True)` also runs it under the run's mixed precision; with them, every process
        keeps a full frozen copy (one backbone and a linear head)."""
        teacher = teacher.eval().to(self.args.device)
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        return teacher.eval()

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _generator_for_step(self) -> torch.Generator:
        """A generator seeded from (seed, global step, call within the step, process): stateless, so a resumed run
        draws exactly the augmentations of an uninterrupted one, and the micro-batches of one optimizer step
        (gradient accumulation) get different ones."""
        step = self.state.global_step
        call = self._rng_position[1] + 1 if self._rng_position[0] == step else 0
        self._rng_position = (step, call)
        seed = hash((self.args.seed, step, call, self.args.process_index)) & 0x7FFF_FFFF_FFFF_FFFF
        return self._generator.manual_seed(seed)

    def views(self, pixel_values: torch.Tensor, training: bool) -> torch.Tensor:
        """uint8 images -> normalized student inputs: the training augmentations (random resized crop + flip, and the
        optional color ops of [`KDConfig`]) in training, resize + center crop otherwise."""
        size = self.args.image_size
        if training:
            views = self.augmentation(pixel_values, size, self._generator_for_step())
        else:
            views = resize_center(pixel_values, size)
        return (views - self._mean) / self._std

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        views = self.views(inputs["pixel_values"], model.training)
        labels = inputs["labels"]
        outputs = model(pixel_values=views)
        if self.args.alpha > 0:
            with torch.inference_mode():
                teacher_logits = self.teacher(views, self._mean.flatten(), self._std.flatten()).clone()
        else:  # plain supervised training: the teacher is not run (the logged KL is 0)
            teacher_logits = outputs.logits.detach()
        terms = kd_loss(
            outputs.logits, teacher_logits, labels, alpha=self.args.alpha, temperature=self.args.temperature
        )
        self._metrics["cross_entropy"].append(terms.cross_entropy)
        self._metrics["kl"].append(terms.kl)
        self._metrics["synthetic_fraction"].append((labels == -100).float().mean())
        return (terms.loss, outputs) if return_outputs else terms.loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the model's live parameter names (`save_original_format=False`): transformers 5's Trainer
        resume loads them without the legacy-name conversion. The final save is a standard `save_pretrained`."""
        if not _internal_call or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call=_internal_call)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir, save_original_format=False, is_main_process=self.args.should_save)
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Loss terms averaged since the last log (one host sync)."""
        if self._metrics and "loss" in logs:
            names = sorted(self._metrics)
            values = torch.stack([torch.stack(self._metrics[name]).mean() for name in names]).tolist()
            logs.update(dict(zip(names, values)))
            self._metrics.clear()
        super().log(logs, start_time)


@torch.inference_mode()
def classification_accuracy(
    model: torch.nn.Module, dataset, image_size: int, image_mean, image_std, batch_size: int = 64, label_column="label"
) -> float:
    """Top-1 accuracy (percent) of `model(pixel_values=...).logits` on `dataset` (shorter side resize + center crop
    to `image_size`, normalized with `image_mean` / `image_std`), batched in inference mode."""
    device = next(model.parameters()).device
    mean = torch.tensor(image_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(image_std, device=device).view(1, -1, 1, 1)
    collate = ImageCollator(image_size, int_columns={"labels": label_column})
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for batch in loader:
        pixels = (batch["pixel_values"].to(device).float() / 255.0 - mean) / std
        correct += (model(pixel_values=pixels).logits.argmax(-1) == batch["labels"].to(device)).sum()
    model.train(was_training)
    return 100.0 * correct.item() / len(dataset)
