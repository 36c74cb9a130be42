"""The plumbing the UNIC, UDON and task-specific trainers share, and only that: each trainer keeps its `compute_loss`
and what is specific to its method, readable top to bottom.

- one random stream per micro-batch: [`DistillationTrainer.step_generator`] is seeded from (seed, optimizer step,
  micro-batch within the step, process), so the micro-batches of one step (gradient accumulation) draw different
  augmentations and a run resumed at a step draws exactly what an uninterrupted one draws;
- the student's input normalization ([`DistillationTrainer.normalize`]) and the center-crop / augmented views
  ([`DistillationTrainer.make_views`]);
- metrics kept on the device in `self._metrics["train" | "eval"]`, averaged over steps and processes when logged, with
  the non-finite counters, in one collective and one host sync ([`DistillationTrainer.log`]);
- frozen teachers prepared for DDP / FSDP / DeepSpeed, never wrapped by DDP ([`DistillationTrainer.prepare_teacher`]);
- the final export written to a staging folder that takes the place of the output folder
  ([`DistillationTrainer.export_staged`]);
- the model card hook: `_tag_names` and `_paper` (the method's paper, for cards and the Hub).
"""

import copy
import logging
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from ..data.augmentations import resize_center
from ..data.streaming import StreamingImageDataset, StreamStateCallback, streaming_train_dataloader
from ..distributed_checks import check_accelerator, shard_with_fsdp2
from ..hub.push import PushExportMixin
from ..io_utils import atomic_folder, is_weight_file
from ..precision import warn_if_emulated_autocast
from .nonfinite import NonFiniteGuard

logger = logging.getLogger(__name__)


class DistillationTrainer(PushExportMixin, Trainer):
    """A `transformers.Trainer` with hf_distill's shared plumbing (see the module docstring).

    Subclasses pass on the standard Trainer arguments, in the order of this signature, plus:

    Args:
        image_mean, image_std (`list[float]`): the student's input normalization.
        nonfinite_sources (`list[str]`, *optional*): what produces per-sample outputs that may be non-finite (the
            teachers), for the [`NonFiniteGuard`] counters.
    """

    _tag_names = ["hf_distill", "distillation"]
    _paper: dict | None = None  # the method's paper for its model card: {"title", "authors", "venue", "citation"}

    def __init__(
        self,
        model,
        args,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        *,
        image_mean,
        image_std,
        nonfinite_sources=(),
        **kwargs,
    ):
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        check_accelerator(self.args, self.accelerator)  # FSDP asked, DDP running...: refused before teachers load
        warn_if_emulated_autocast(self.args)
        self.nonfinite = NonFiniteGuard(list(nonfinite_sources), self.args, self.args.device)
        self.add_callback(self.nonfinite)
        self.augmentation = None  # set by subclasses: (uint8 images, size, generator) -> views
        self._student_mean = torch.tensor(image_mean, device=self.args.device)
        self._student_std = torch.tensor(image_std, device=self.args.device)
        self._generator = None
        self._rng_position = (-1, 0)  # (global step, micro-batch within the step) of the last random draw
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        if isinstance(self.train_dataset, StreamingImageDataset):  # resumed from its saved position, not by skipping
            self.args.ignore_data_skip = True
            self.add_callback(StreamStateCallback(self.train_dataset))

    def get_train_dataloader(self):
        if isinstance(self.train_dataset, StreamingImageDataset):
            return streaming_train_dataloader(self)
        return super().get_train_dataloader()

    # ------------------------------------------------------------------ randomness and views

    def step_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from (seed, global step, micro-batch within the step, process): stateless, so a resumed
        run draws exactly the augmentations of an uninterrupted one, and the micro-batches of one optimizer step
        (gradient accumulation) draw different ones. Call it once per training micro-batch."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        step = self.state.global_step
        call = self._rng_position[1] + 1 if self._rng_position[0] == step else 0
        self._rng_position = (step, call)
        seed = hash((self.args.seed, step, call, self.args.process_index)) & 0x7FFF_FFFF_FFFF_FFFF
        return self._generator.manual_seed(seed)

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` views in [0, 1] -> the student's normalized inputs."""
        return (views - self._student_mean.view(1, -1, 1, 1)) / self._student_std.view(1, -1, 1, 1)

    def make_views(self, pixel_values: torch.Tensor, training: bool, generator: torch.Generator | None = None):
        """uint8 `[B, 3, S, S]` -> normalized student inputs `[B, 3, image_size, image_size]`: `self.augmentation`
        in training (when set), resize + center crop otherwise."""
        size = self.args.image_size
        if training and self.augmentation is not None:
            views = self.augmentation(pixel_values, size, generator)
        else:
            views = resize_center(pixel_values, size)
        return self.normalize(views)

    def batch_sampler_loader(self, batch_sampler) -> DataLoader:
        """A training `DataLoader` whose batches `batch_sampler` draws, with the run's collator, workers and pinning;
        not yet prepared by Accelerate."""
        return DataLoader(
            self.train_dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # ------------------------------------------------------------------ frozen teachers

    def prepare_teacher(self, teacher: nn.Module, shard: bool = True) -> nn.Module:
        """A frozen teacher ready for this run, never wrapped by DDP: a DeepSpeed inference engine (ZeRO-3 partitions
        it like the student) or FSDP2 shards when `shard` and the run uses them (else a full copy on every process),
        otherwise `prepare_model(evaluation_mode=True)` (which also runs it under the run's mixed precision)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            if not shard:
                teacher = teacher.to(self.args.device)
            elif self.is_deepspeed_enabled:
                teacher = self._prepare_deepspeed(teacher)
            else:
                teacher = shard_with_fsdp2(teacher, self.accelerator.device)
        else:
            teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher.eval()  # not `return teacher.eval()`: a DeepSpeed engine's eval() returns None
        return teacher

    def _prepare_deepspeed(self, teacher: nn.Module) -> nn.Module:
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        if config.get("zero_optimization", {}).get("stage") != 3:
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine

    # ------------------------------------------------------------------ logging and export

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The metrics of the current mode (train / eval, `eval_` prefix) averaged since the last log over steps and
        processes, and in training the non-finite counters: one collective, one host sync; stops when a teacher or the
        steps are non-finite too often (see [`NonFiniteGuard`]). An evaluation leaves the training window as it is."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if mode == "train":
            logs.update(self.nonfinite.log_values(metrics, self.accelerator))
        else:
            logs.update(self.nonfinite.log_values(metrics, self.accelerator, prefix="eval_", counters=False))
        metrics.clear()
        super().log(logs, start_time)

    def export_staged(self, output_dir: str, write: Callable[[str], None]) -> None:
        """Run `write(folder)` on a staging folder next to `output_dir`, which then takes its place in one rename
        ([`~hf_distill.io_utils.atomic_folder`]): a reader never sees a half-written export. What `output_dir` held
        besides the weights of an earlier export (checkpoints, logs, the run's lock and manifest) is moved into the
        new folder. Main process only."""
        with atomic_folder(output_dir, keep=lambda name: not is_weight_file(name)) as staging:
            write(staging)
