"""`UdonTrainer`: UDON training with single-domain batches, online per-domain teacher heads and a dynamic sampler."""

import json
import logging
import os

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from ..data.augmentations import random_resized_crop
from ..data.domain_sampler import DomainBatchSampler
from ..data.image_datasets import ImageCollator
from ..hub.papers import PAPERS
from ..io_utils import write_json_atomically
from ..models.modeling_udon import UdonModel
from .base import DistillationTrainer
from .nonfinite import assert_finite_weights
from .udon_config import UdonConfig

logger = logging.getLogger(__name__)
SAMPLER_STATE = "domain_sampler.json"


class DomainCollator(ImageCollator):
    """Images as uint8 `[B, 3, S, S]`, labels `[B]`, and the batch's domain as a plain int (every batch holds one
    domain, so no tensor and no host sync is needed to pick its heads)."""

    def __init__(self, size: int, jpeg_draft: bool = True):
        super().__init__(size, image_column="image", int_columns={"labels": "label"}, jpeg_draft=jpeg_draft)

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


class UdonTrainer(DistillationTrainer):
    """Trains a [`UdonModel`] (UDON, or USCRR when `use_teacher_heads=False`).

    Args:
        model ([`UdonModel`]): the model; its `config.domains` must match `domain_sizes` in order.
        args ([`UdonConfig`]): training arguments.
        train_dataset: the concatenated training data (`image`, `label`, `domain` columns, domains contiguous), e.g.
            from [`load_domains`].
        domain_sizes (`list[int]`): training rows per domain.
        Other arguments are those of [`~transformers.Trainer`].

    Non-finite values ([`NonFiniteGuard`]): the UDON terms are relational over the whole batch, so a NaN / inf in one
    image's embedding spoils every term of its batch: that step is skipped (no update; counted in
    `nonfinite/skipped_steps`, the non-finite terms in `nonfinite/<domain>/<term>`), its loss is not recorded by the
    dynamic sampler, and after `--max_skipped_steps` consecutive skipped steps training stops naming the domain and
    the terms.
    """

    _tag_names = ["hf_distill", "udon", "distillation", "image-retrieval"]
    _paper = PAPERS["udon"]

    def __init__(
        self,
        model: UdonModel,
        args: UdonConfig,
        train_dataset,
        domain_sizes: list[int],
        eval_dataset=None,
        data_collator=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
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
        if data_collator is None:
            data_collator = DomainCollator(args.load_size, args.jpeg_draft)
        super().__init__(
            model, args, train_dataset, eval_dataset, data_collator, processing_class, callbacks, optimizers,
            image_mean=model.config.image_mean, image_std=model.config.image_std, **kwargs,
        )  # fmt: skip
        self.add_callback(_UdonSchedule(self))
        self.udon_model = model
        self.augmentation = self._random_crop

    def _format(self, weights: list[float]) -> str:
        return ", ".join(f"{name} {w:.3f}" for name, w in zip(self.udon_model.config.domain_names, weights))

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def get_train_dataloader(self) -> DataLoader:
        """The domain sampler already gives each process its own rows, so the loader is NOT re-sharded by Accelerate
        (`num_processes=1`): it only moves batches to the device."""
        loader = self.batch_sampler_loader(self.domain_sampler)
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

    def _random_crop(self, pixel_values: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        """UDON's training view: a random `size` square of the decoded image (no rescaling) and a flip."""
        scale = (size / pixel_values.shape[-1]) ** 2
        return random_resized_crop(
            pixel_values, size, generator, scale=(scale, scale), ratio=(1.0, 1.0), flip_prob=self.args.flip_prob
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        domain = inputs["domain"]
        generator = self.step_generator(inputs["pixel_values"].device) if training else None
        pixel_values = self.make_views(inputs["pixel_values"], training, generator)
        outputs = model(pixel_values=pixel_values, domain=domain, labels=inputs["labels"])
        terms = outputs.loss_terms
        name = self.udon_model.config.domain_names[domain]
        loss = outputs.loss
        if training:
            tracked = terms.get("teacher_classification", terms["student_classification"])
            self.domain_sampler.record_loss(domain, tracked)  # non-finite losses are not counted by the sampler
            self.nonfinite.count_terms({f"{name}/{term}": value for term, value in terms.items()})
            loss = self.nonfinite.poison(loss)
        metrics = self._metrics["train" if training else "eval"]
        metrics[f"{name}/loss"].append(outputs.loss.detach())
        for term, value in terms.items():
            metrics[term].append(value.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Per-domain losses and loss terms averaged since the last log over steps and processes, the non-finite
        counters (one collective, one host sync; see [`DistillationTrainer.log`]), and the sampler weights."""
        if "loss" in logs:
            for name, weight in zip(self.udon_model.config.domain_names, self.domain_sampler.current_weights):
                logs[f"sampler/{name}"] = weight
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints keep the full model (heads, classifiers); the final save exports ONLY the universal embedding
        model (backbone + student head + L2 norm), atomically, refused when a weight is not finite."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = output_dir or self.args.output_dir
        assert_finite_weights(self.udon_model.state_dict(), "the universal embedding model")
        if self.args.should_save:
            self.udon_model.save_embedding_model(output_dir, self.args.image_size)
            logger.info("Exported the universal embedding model to %s", output_dir)
        return None
