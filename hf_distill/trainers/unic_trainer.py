"""UNIC multi-teacher distillation as a `transformers.Trainer` (UNIC, Sariyildiz et al., ECCV 2024).

One training step: decode a batch of uint8 images -> batched UNIC augmentations on the device -> the SAME normalized
view feeds the student and every frozen teacher (teachers in inference mode, or no_grad when sharded, re-normalized
and grid-aligned by their wrappers) -> teacher features standardized with EMA statistics over the global batch ->
per-image, per-teacher losses -> teacher dropping -> total loss. Metrics stay on the device and are reduced only when
logged.
"""

import logging
import os

import torch
from torch import nn

from .. import hub
from ..data.augmentations import resize_center
from ..data.image_datasets import ImageCollator
from ..losses.unic import distillation_loss
from ..models.adaptors import ADAPTORS_FOLDER
from ..models.modeling_unic import UnicStudentModel
from ..models.standardization import ema_weight
from ..models.student_backbones import describe_backbone
from ..models.teacher_loading import teacher_outputs, teacher_source, teacher_spec
from ..models.teacher_quantization import Calibration, calibration_views, load_checked_teacher
from .base import DistillationTrainer
from .cache_options import BOXES
from .cache_views import fixed_views
from .nonfinite import assert_finite_weights, finite_rows
from .teacher_cache import INDEX_COLUMN
from .teacher_cache_shards import TeacherOutputShards, open_teacher_cache
from .unic_config import UnicConfig

logger = logging.getLogger(__name__)


def standardize_targets(
    student: UnicStudentModel,
    outputs: list[tuple[torch.Tensor, torch.Tensor]],
    ema_weight: float | None,
    valid: list[torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-teacher standardization of the targets (statistics updated in training, when `ema_weight` is given).
    `valid` (per teacher, `[B]` bool): rows left out of that teacher's statistics, standardized to 0."""
    valid = valid or [None] * len(outputs)
    return [
        (
            student.cls_standardizers[name](summary, ema_weight, valid=rows),
            student.patch_standardizers[name](patch, ema_weight, valid=rows),
        )
        for name, (summary, patch), rows in zip(student.config.teacher_names, outputs, valid)
    ]


def _initialization(config) -> str:
    """How the student's encoder was initialized, for the model card."""
    if not config.backbone_source:
        return "random weights"
    revision = f" (revision {config.backbone_revision})" if config.backbone_revision else ""
    return f"pretrained weights of {config.backbone_source}{revision}"


class UnicTrainer(DistillationTrainer):
    """Trainer for UNIC distillation of several frozen teachers into one student ([`UnicStudentModel`]).

    Args:
        model ([`UnicStudentModel`]): the student with one head pair and standardizer pair per teacher.
        args ([`UnicConfig`]): training configuration.
        teachers (`list[str | nn.Module]`, *optional*): Hub ids / local paths / teacher modules, in the order of
            `model.config.teachers`. Defaults to `args.teachers`. Loaded and prepared after `Trainer.__init__`, never
            wrapped by DDP.
        train_dataset: a dataset whose examples hold a PIL image under `image_column`.
        image_column (`str`, defaults to `"image"`): column read by the default collator.
        Other arguments are those of [`~transformers.Trainer`].

    Non-finite values ([`NonFiniteGuard`]): an image whose outputs of one teacher hold NaN / inf is left out of that
    teacher's standardization statistics and loss (its other teachers still count; an image without any finite
    teacher is left out of the loss), counted in `nonfinite/<teacher>_skipped_samples`; a step whose loss or gradients
    are not finite is skipped. Too many of either stop training with an error naming the teacher.
    """

    _tag_names = ["hf_distill", "unic", "distillation"]
    _paper = hub.PAPERS["unic"]

    def __init__(
        self,
        model: UnicStudentModel,
        args: UnicConfig,
        teachers: list | None = None,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        image_column: str = "image",
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        if not isinstance(model, UnicStudentModel):
            raise TypeError(f"UnicTrainer trains a UnicStudentModel, got {type(model).__name__}.")
        grid = model.grid_size(
            args.image_size, args.image_size
        )  # fails early on a size the patch size does not divide
        # a map-style cache (indexed by row) or WebDataset shards (the outputs streamed with their images)
        self.teacher_cache = open_teacher_cache(args.teacher_cache) if args.teacher_cache else None
        shards = isinstance(self.teacher_cache, TeacherOutputShards)
        if self.teacher_cache is not None:
            if self.teacher_cache.teacher_names != model.config.teacher_names:
                raise ValueError(
                    f"The teacher-output cache holds {self.teacher_cache.teacher_names}, the student has heads for "
                    f"{model.config.teacher_names}."
                )
            cached = {spec["name"]: spec for spec in self.teacher_cache.teacher_specs()}
            for spec in model.config.teachers:
                if (spec["summary_dim"], spec["patch_dim"]) != (
                    cached[spec["name"]]["summary_dim"],
                    cached[spec["name"]]["patch_dim"],
                ):
                    raise ValueError(
                        f"The teacher-output cache holds {cached[spec['name']]['summary_dim']}-d summary / "
                        f"{cached[spec['name']]['patch_dim']}-d patch tokens for {spec['name']!r}, the student's "
                        f"heads predict {spec['summary_dim']} / {spec['patch_dim']}: it was built for other teachers."
                    )
            self.teacher_cache.check(train_dataset, args.image_size, grid, args.load_size, args.jpeg_draft)
            if eval_dataset is not None:
                raise ValueError(
                    "Evaluation loss needs online teachers: do not pass an eval_dataset with a teacher cache."
                )
            if not shards:
                train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
            teachers = []  # the cache replaces the teachers
        else:
            teachers = list(teachers if teachers is not None else (args.teachers or []))
            if len(teachers) != len(model.config.teachers):
                raise ValueError(
                    f"The student has heads for {len(model.config.teachers)} teachers "
                    f"({model.config.teacher_names}) but {len(teachers)} teachers were given."
                )
        if data_collator is None:
            index_column = INDEX_COLUMN if self.teacher_cache is not None and not shards else None
            data_collator = ImageCollator(
                args.load_size, image_column=image_column, index_column=index_column, jpeg_draft=args.jpeg_draft
            )
            if shards:  # the batch also holds each sample's stored outputs (and crops)
                data_collator = self.teacher_cache.collator(data_collator)
        super().__init__(
            model, args, train_dataset, eval_dataset, data_collator, processing_class, callbacks, optimizers,
            image_mean=model.config.image_mean, image_std=model.config.image_std,
            nonfinite_sources=model.config.teacher_names, **kwargs,
        )  # fmt: skip
        self.loss_is_scaled_for_ga = False  # per-batch mean: the Trainer divides by the accumulation steps
        self.teacher_names = model.config.teacher_names
        self.teachers = [self._load_and_prepare_teacher(teacher, index) for index, teacher in enumerate(teachers)]
        self.augmentation = args.augmentation()

    # ------------------------------------------------------------------ teachers

    def _load_and_prepare_teacher(self, teacher, index: int) -> nn.Module:
        name = self.teacher_names[index]
        # a cheaper (bf16 / fp16 / int8) teacher is derived from the float32 one and checked against it first
        teacher = load_checked_teacher(
            teacher, name, self.args.teacher_torch_dtype(), self.args.teacher_quantization, self.args.device,
            self._calibration, self.args.teacher_fidelity_max_error, **self.args.teacher_options(index),
        )  # fmt: skip
        expected = self.model.config.teachers[index]
        spec = teacher_spec(name, teacher)
        if (spec["summary_dim"], spec["patch_dim"]) != (expected["summary_dim"], expected["patch_dim"]):
            raise ValueError(
                f"Teacher {index} ({name}) outputs {spec['summary_dim']}-d summary / {spec['patch_dim']}-d patch "
                f"tokens but the student's heads for {expected['name']!r} predict {expected['summary_dim']} / "
                f"{expected['patch_dim']}: build the student for these teachers (same order)."
            )
        teacher = self.prepare_teacher(teacher)
        logger.info(
            "Teacher %d %r: %s, %d-d summary / %d-d patch tokens, grid alignment %r, dtype %s",
            index,
            name,
            type(teacher).__name__,
            spec["summary_dim"],
            spec["patch_dim"],
            getattr(teacher, "grid_alignment", "?"),
            next(teacher.parameters()).dtype,
        )
        return teacher

    def _calibration(self) -> Calibration | None:
        """Center crops of the first `teacher_fidelity_batch` training images, normalized for the student (once)."""
        if not hasattr(self, "_calibration_batch"):
            pixels = calibration_views(
                self.train_dataset, self.data_collator, self.args.teacher_fidelity_batch, self.args.image_size,
                self._student_mean, self._student_std, self.args.device,
            )  # fmt: skip
            self._calibration_batch = None
            if pixels is not None:
                grid = self.model.grid_size(*pixels.shape[-2:])
                self._calibration_batch = Calibration(pixels, self._student_mean, self._student_std, grid)
        return self._calibration_batch

    # ------------------------------------------------------------------ one step

    def make_views(
        self,
        pixel_values: torch.Tensor,
        training: bool,
        generator: torch.Generator | None,
        fixed_view_ids: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 `[B, 3, S, S]` -> the normalized student view `[B, 3, image_size, image_size]`: the cached views
        `fixed_view_ids` of images `sample_index` (map-style teacher-output cache) or of stored crops `boxes`
        (teacher-output shards): the views the teachers saw; the UNIC augmentations (training), or the center crop."""
        size = self.args.image_size
        if fixed_view_ids is not None and isinstance(self.teacher_cache, TeacherOutputShards):
            views = self.teacher_cache.views(pixel_values, boxes, fixed_view_ids, size)
        elif fixed_view_ids is not None and self.teacher_cache is not None and sample_index is not None:
            views = self.teacher_cache.views(pixel_values, sample_index, fixed_view_ids, size)
        elif fixed_view_ids is not None:
            views = fixed_views(pixel_values, size, fixed_view_ids)
        elif training and self.args.augment:
            views = self.augmentation(pixel_values, size, generator)
        else:
            views = resize_center(pixel_values, size)
        return self.normalize(views)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        student = self.accelerator.unwrap_model(model)
        # evaluation draws nothing, so it cannot shift the random stream of the training steps
        device = inputs["pixel_values"].device
        generator = self.step_generator(device) if training else None
        views = None
        if self.teacher_cache is not None:
            views = torch.zeros(inputs["pixel_values"].shape[0], dtype=torch.long, device=device)
            if training:
                views = torch.randint(self.teacher_cache.num_views, views.shape, generator=generator, device=device)
        pixel_values = self.make_views(
            inputs["pixel_values"], training, generator, views, inputs.get("sample_index"), inputs.get(BOXES)
        )
        grid = student.grid_size(*pixel_values.shape[-2:])
        weight = None
        if training:
            weight = ema_weight(self.state.global_step, self.state.max_steps)

        if self.teacher_cache is not None:  # the stored outputs: of the batch (shards) or looked up by row
            rows = inputs if isinstance(self.teacher_cache, TeacherOutputShards) else inputs["sample_index"]
            outputs = [self.teacher_cache.lookup(name, rows, views, device) for name in self.teacher_names]
        else:
            outputs = teacher_outputs(self.teachers, pixel_values, self._student_mean, self._student_std, grid)
        # a teacher's non-finite rows: out of its statistics (standardized to 0) and of its loss, counted
        valid = [finite_rows(summary, patch) for summary, patch in outputs]
        targets = standardize_targets(student, outputs, weight, valid)

        outputs = model(pixel_values=pixel_values)
        loss, per_teacher, coefficients = distillation_loss(
            outputs.cls_predictions,
            outputs.patch_predictions,
            targets,
            drop_prob=self.args.teacher_drop_prob if training else 0.0,
            normalization=self.args.loss_normalization,
            generator=generator,
            valid=torch.stack(valid, dim=1),
        )

        metrics = self._metrics["train" if training else "eval"]
        teacher_losses = {}
        for index, (name, terms, rows) in enumerate(zip(self.teacher_names, per_teacher, valid)):
            count = rows.sum().clamp_min(1)
            for term in ("cls", "patch"):  # means over the teacher's valid rows
                metrics[f"{name}/{term}_loss"].append(torch.where(rows, terms[term].detach(), 0.0).sum() / count)
            metrics[f"{name}/kept"].append(coefficients[:, index].mean())
            teacher_losses[f"{name}/loss"] = torch.where(rows, terms["loss"].detach(), 0.0)
            if training:
                self.nonfinite.count_samples(index, rows)
        if training:
            self.nonfinite.count_terms(teacher_losses)
            loss = self.nonfinite.poison(loss)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the distillation loss on center views with frozen statistics and no teacher dropping."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on >= 2-D weights only (UNIC code): no decay on biases and norm weights."""
        return [name for name, parameter in model.named_parameters() if parameter.ndim >= 2]

    # ------------------------------------------------------------------ logging and saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the full student (heads and standardization statistics, to resume); the final save
        exports ONLY the encoder as a stock transformers model with its image processor, written atomically."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir or self.args.output_dir
        # gathered under FSDP / ZeRO-3 (DeepSpeed gathers through its engine)
        state_dict = self.accelerator.get_state_dict(self.model_wrapped if self.is_deepspeed_enabled else self.model)
        if not self.args.should_save:
            return None
        student = self.accelerator.unwrap_model(self.model)
        encoder_state = {
            key.removeprefix("backbone."): v for key, v in state_dict.items() if key.startswith("backbone.")
        }
        assert_finite_weights(encoder_state, "the student encoder")
        self.export_staged(
            output_dir, lambda folder: student.save_encoder(folder, self.args.image_size, state_dict=encoder_state)
        )
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        logger.info("Exported the student encoder (%s) to %s", type(student.backbone).__name__, output_dir)
        if self.args.export_adaptors:
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            folder = student.export_adaptors(
                os.path.join(output_dir, ADAPTORS_FOLDER),
                image_size=self.args.image_size,
                state_dict=state_dict if sharded else None,
            )
            logger.info("Exported the student with its adaptors for %s to %s", self.teacher_names, folder)
        return None

    def create_model_card(
        self, model_name: str | None = None, dataset_name: str | None = None, tags: list[str] | None = None
    ) -> None:
        """Write (or update) `output_dir/README.md` and `output_dir/plots/teacher_losses.png` (per-teacher losses and
        kept coefficients over training, UNIC figures 3-4). Existing evaluation results in the card are kept; its tags
        are the trainer's `_tag_names` and `tags`."""
        if not self.is_world_process_zero():
            return
        output_dir = self.args.output_dir
        student = self.accelerator.unwrap_model(self.model)
        plots = []
        plot = hub.plot_training_curves(
            self.state.log_history, os.path.join(output_dir, "plots", "teacher_losses.png")
        )
        if plot is not None:
            plots.append(os.path.relpath(plot, output_dir))
        if self.teacher_cache is not None:
            teachers = [
                {key: teacher.get(key) for key in ("name", "source", "summary", "grid_alignment")}
                for teacher in self.teacher_cache.info["teachers"]
            ]
        else:
            teachers = []
            for name, teacher in zip(self.teacher_names, self.teachers):
                config = getattr(teacher, "config", None)
                teachers.append(
                    {
                        "name": name,
                        "source": teacher_source(teacher),
                        "revision": getattr(config, "revision", None),
                        "summary": getattr(config, "summary", "mean_patch"),
                        "grid_alignment": teacher.grid_alignment,
                    }
                )
        settings = {
            "student": describe_backbone(student.config.backbone_config),
            "student initialization": _initialization(student.config),
            "image size": self.args.image_size,
            "training steps": self.state.global_step,
            "global batch size": self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size,
            "learning rate": self.args.learning_rate,
            "teacher dropping p": self.args.teacher_drop_prob,
            "loss normalization": self.args.loss_normalization,
            "ladder of projectors": student.config.ladder_block_indices if student.config.use_ladder else "off",
            "standardization": student.config.standardization,
            "augmentations": self._augmentation_description(),
        }
        if self.args.export_adaptors:
            settings["adaptors"] = (
                f"`{ADAPTORS_FOLDER}/`: the student with one adaptor per teacher, outputs in each teacher's feature "
                f'space (`AutoModel.from_pretrained(repo, subfolder="{ADAPTORS_FOLDER}", trust_remote_code=True)`)'
            )
        hub.create_or_update_model_card(
            output_dir,
            model_name=model_name or os.path.basename(os.path.abspath(output_dir)),
            teachers=teachers,
            training_data=dataset_name or "-",
            settings=settings,
            plots=plots,
            tags=[*self._tag_names, *(tags or [])],  # TRL's convention: the trainer's tags, then the caller's
            repo_id=self.hub_model_id or self.args.hub_model_id,
            paper=self._paper,
        )
        logger.info("Wrote the model card %s", os.path.join(output_dir, "README.md"))

    def _augmentation_description(self) -> str:
        if self.teacher_cache is not None:
            return f"teacher-output cache of {self.teacher_cache.describe_views()}"
        if self.args.augment:
            return "UNIC (random resized crop, flip, color jitter, grayscale, blur, solarize)"
        return "none (center crop)"
