"""`KDTrainer`: a small image classifier distilled from a probed teacher, on real and synthetic images."""

import logging
import os

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, TrainerCallback

from ..data.image_datasets import ImageCollator
from ..data.mixed_batch_sampler import MixedBatchSampler
from ..hub.papers import PAPERS
from ..losses.kd import kd_loss
from ..models.probed_teacher import ProbedTeacher
from ..models.teacher_loading import frozen_forward_context, teacher_name
from .base import DistillationTrainer
from .kd_config import KDConfig
from .nonfinite import assert_finite_weights, finite_rows

logger = logging.getLogger(__name__)


class _SamplerEpoch(TrainerCallback):
    def __init__(self, sampler: MixedBatchSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(int(state.epoch or 0))


class KDTrainer(DistillationTrainer):
    """Trains `model` (any transformers image classification model) against a [`ProbedTeacher`].

    Args:
        model ([`~transformers.PreTrainedModel`]): the student; `model(pixel_values=...).logits` is `(B, C)`.
        teacher ([`ProbedTeacher`]): frozen, run in inference mode on the same augmented views as the student.
        args ([`KDConfig`]): training arguments.
        train_dataset: real rows then synthetic rows, with the columns `image` and `label` (-100 on synthetic rows).
        num_synthetic (`int`): number of synthetic rows at the end of `train_dataset`.
        image_mean, image_std (`list[float]`): the student's input normalization.
        Other arguments are those of [`~transformers.Trainer`].

    Non-finite values ([`NonFiniteGuard`]): a row whose teacher logits hold NaN / inf gets no distillation term (its
    teacher side is replaced by the student's own detached logits: zero KL, zero gradient; the KL mean still divides
    by the batch size) and its cross-entropy still counts; the rows are counted in `nonfinite/<teacher>_skipped_samples`.
    A step whose loss or gradients are not finite is skipped.
    """

    _tag_names = ["hf_distill", "distillation", "image-classification"]
    _paper = PAPERS["task"]
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
        eval_dataset=None,
        data_collator=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
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
        if data_collator is None:
            data_collator = ImageCollator(args.load_size, int_columns={"labels": "label"}, jpeg_draft=args.jpeg_draft)
        self.teacher_name = f"probed {teacher_name(teacher.teacher)}"
        super().__init__(
            model, args, train_dataset, eval_dataset, data_collator, processing_class, callbacks, optimizers,
            image_mean=image_mean, image_std=image_std, nonfinite_sources=[self.teacher_name], **kwargs,
        )  # fmt: skip
        self.add_callback(_SamplerEpoch(self.batch_sampler))
        # one frozen copy per process (one backbone and a linear head): not sharded under DeepSpeed / FSDP
        self.teacher = self.prepare_teacher(teacher.eval().to(self.args.device), shard=False)
        self.augmentation = args.augmentation()

    def get_train_dataloader(self) -> DataLoader:
        return self.accelerator.prepare(self.batch_sampler_loader(self.batch_sampler))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        generator = self.step_generator(inputs["pixel_values"].device) if training else None
        views = self.make_views(inputs["pixel_values"], training, generator)
        labels = inputs["labels"]
        outputs = model(pixel_values=views)
        if self.args.alpha > 0:
            with frozen_forward_context([self.teacher]):
                teacher_logits = self.teacher(views, self._student_mean, self._student_std).clone()
            valid = finite_rows(teacher_logits)
            # a row without finite teacher logits: the student's own detached prediction (zero KL, zero gradient)
            teacher_logits = torch.where(valid[:, None], teacher_logits, outputs.logits.detach())
            if training:
                self.nonfinite.count_samples(0, valid)
        else:  # plain supervised training: the teacher is not run (the logged KL is 0)
            teacher_logits = outputs.logits.detach()
        terms = kd_loss(
            outputs.logits, teacher_logits, labels, alpha=self.args.alpha, temperature=self.args.temperature
        )
        loss = terms.loss
        if training:
            self.nonfinite.count_terms({"cross_entropy": terms.cross_entropy, "kl": terms.kl})
            loss = self.nonfinite.poison(loss)
        metrics = self._metrics["train" if training else "eval"]
        metrics["cross_entropy"].append(terms.cross_entropy)
        metrics["kl"].append(terms.kl)
        metrics["synthetic_fraction"].append((labels == -100).float().mean())
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the model's live parameter names (`save_original_format=False`): transformers 5's Trainer
        resume loads them without the legacy-name conversion. The final save (`save_pretrained`, the processing class
        and the training arguments) is refused when a weight is not finite and written atomically
        ([`DistillationTrainer.export_staged`]): a failure or a kill leaves the previous export whole."""
        if _internal_call:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call=True)
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(output_dir, save_original_format=False, is_main_process=self.args.should_save)
            return None
        output_dir = output_dir or self.args.output_dir
        # gathered under FSDP / ZeRO-3 (DeepSpeed gathers through its engine)
        state_dict = self.accelerator.get_state_dict(self.model_wrapped if self.is_deepspeed_enabled else self.model)
        assert_finite_weights(state_dict, "the student")
        if not self.args.should_save:
            return None
        student = self.accelerator.unwrap_model(self.model)
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled

        def write(folder: str) -> None:
            student.save_pretrained(folder, state_dict=state_dict if sharded else None)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, os.path.join(folder, "training_args.bin"))

        self.export_staged(output_dir, write)
        logger.info("Exported the student (%s) to %s", type(student).__name__, output_dir)
        return None


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
