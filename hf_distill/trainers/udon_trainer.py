"""`UdonTrainer`: UDON training with single-domain batches, online per-domain teacher heads and a dynamic sampler."""

import json
import logging
import os
from collections import defaultdict

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from ..data.augmentations import random_resized_crop, resize_center
from ..data.domain_sampler import DomainBatchSampler
from ..data.image_datasets import ImageCollator
from ..hub.push import PushExportMixin
from ..io_utils import write_json_atomically
from ..models.modeling_udon import UdonModel
from .udon_config import UdonConfig

logger = logging.getLogger(__name__)
SAMPLER_STATE = "domain_sampler.json"


class DomainCollator(ImageCollator):
    """Images as uint8 `[B, 3, S, S]`, labels `[B]`, and the batch's domain as a plain int (every batch holds one
    domain, so no tensor and no host sync is needed to pick its heads)."""

    def __init__(self, size: int):
        super().__init__(size, image_column="image", int_columns={"labels": "label"})

    def __call__(self, examples: list[dict]) -> dict:
        domains = {example["domain"] for example in examples}
        if len(domains) != 1:
            raise ValueError(f"A UDON batch must hold one domain, got domains {sorted(domains)}.")
        return {**super().__call__(examples), "domain": domains.pop()}


class _UdonSchedule(TrainerCallback):
    """Backbone freezing by epoch, sampler epochs and dynamic updates, sampler state in checkpoints."""

    def __init__(self, trainer: "UdonTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.domain_sampler.set_epoch(int(state.epoch or 0))
        trainer.udon_model.backbone_frozen = (state.epoch or 0) < args.freeze_backbone_epochs - 1e-9

    def on_step_end(self, args, state, control, **kwargs):
        weights = self.trainer.domain_sampler.step(reduce=self.trainer._reduce_sum)  # collective: every process
        if weights is not None:
            logger.info("Dynamic sampler weights at step %d: %s", state.global_step, self.trainer._format(weights))

    def on_save(self, args, state, control, **kwargs):
        sampler_state = self.trainer.domain_sampler.state_dict(reduce=self.trainer._reduce_sum)  # every process
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            write_json_atomically(os.path.join(folder, SAMPLER_STATE), sampler_state)


class UdonTrainer(PushExportMixin, Trainer):
    """Trains a [`UdonModel`] (UDON, or USCRR when `use_teacher_heads=False`).

    Args:
        model ([`UdonModel`]): the model; its `config.domains` must match `domain_sizes` in order.
        args ([`UdonConfig`]): training arguments.
        train_dataset: the concatenated training data (`image`, `label`, `domain` columns, domains contiguous), e.g.
            from [`load_domains`].
        domain_sizes (`list[int]`): training rows per domain.
        Other arguments are those of [`~transformers.Trainer`].
    """

    _tag_names = ["hf_distill", "udon", "distillation", "image-retrieval"]

    def __init__(
        self, model: UdonModel, args: UdonConfig, train_dataset, domain_sizes: list[int], callbacks=None, **kwargs
    ):
        if not isinstance(model, UdonModel):
            raise TypeError(f"UdonTrainer trains a UdonModel, got {type(model).__name__}.")
        if len(domain_sizes) != len(model.config.domains):
            raise ValueError(f"{len(domain_sizes)} domains of data for a model with {model.config.domain_names}.")
        # Every process draws the same domain schedule and reads its own slice of each step's global batch: one
        # optimizer step sees ONE domain on all processes (see DomainBatchSampler).
        self.domain_sampler = DomainBatchSampler(
            domain_sizes,
            args.per_device_train_batch_size,
            args.sampling,
            args.sampler_update_every,
            args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
        )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=DomainCollator(args.load_size),
            callbacks=callbacks,
            **kwargs,
        )
        self.add_callback(_UdonSchedule(self))
        self.udon_model = model
        self._mean = torch.tensor(model.config.image_mean, device=args.device).view(1, -1, 1, 1)
        self._std = torch.tensor(model.config.image_std, device=args.device).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=args.device)
        self._metrics = defaultdict(list)

    def _format(self, weights: list[float]) -> str:
        return ", ".join(f"{name} {w:.3f}" for name, w in zip(self.udon_model.config.domain_names, weights))

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def get_train_dataloader(self) -> DataLoader:
        """The domain sampler already gives each process its own rows, so the loader is NOT re-sharded by Accelerate
        (`num_processes=1`): it only moves batches to the device."""
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=self.domain_sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return prepare_data_loader(
            loader, self.accelerator.device, num_processes=1, process_index=0, put_on_device=True
        )

    def create_optimizer(self, model=None):
        """Adam(W) with two groups: the backbone at `backbone_learning_rate`, heads and classifiers at
        `learning_rate`; weight decay on both."""
        if self.optimizer is None:
            udon = self.udon_model
            groups = [
                {"params": udon.backbone_parameters(), "lr": self.args.backbone_learning_rate},
                {"params": udon.head_parameters(), "lr": self.args.learning_rate},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, udon)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, SAMPLER_STATE)
            if os.path.exists(path):
                with open(path) as handle:
                    self.domain_sampler.load_state_dict(json.load(handle))
                logger.info("Restored the domain sampler from %s", path)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _views(self, pixel_values: torch.Tensor, training: bool) -> torch.Tensor:
        size = self.args.image_size
        if training:
            seed = hash((self.args.seed, self.state.global_step, self.args.process_index)) & 0x7FFF_FFFF_FFFF_FFFF
            self._generator.manual_seed(seed)
            scale = (size / pixel_values.shape[-1]) ** 2
            views = random_resized_crop(
                pixel_values,
                size,
                self._generator,
                scale=(scale, scale),
                ratio=(1.0, 1.0),
                flip_prob=self.args.flip_prob,
            )
        else:
            views = resize_center(pixel_values, size)
        return (views - self._mean) / self._std

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        domain = inputs["domain"]
        outputs = model(
            pixel_values=self._views(inputs["pixel_values"], training), domain=domain, labels=inputs["labels"]
        )
        terms = outputs.loss_terms
        if training:
            tracked = terms.get("teacher_classification", terms["student_classification"])
            self.domain_sampler.record_loss(domain, tracked)
        name = self.udon_model.config.domain_names[domain]
        self._metrics[f"{name}/loss"].append(outputs.loss.detach())
        for term, value in terms.items():
            self._metrics[f"{term}"].append(value.detach())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Per-domain losses and loss terms averaged since the last log (one host sync), sampler weights."""
        if self._metrics:
            names = sorted(self._metrics)
            values = [torch.stack(self._metrics[name]).mean() for name in names]
            logs.update({name: value.item() for name, value in zip(names, values)})
            self._metrics.clear()
        if "loss" in logs:
            for name, weight in zip(self.udon_model.config.domain_names, self.domain_sampler.current_weights):
                logs[f"sampler/{name}"] = weight
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the full model (heads, classifiers); the final save exports ONLY the universal embedding
        model (backbone + student head + L2 norm), atomically."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.udon_model.save_embedding_model(output_dir, self.args.image_size)
            logger.info("Exported the universal embedding model to %s", output_dir)
        return None
