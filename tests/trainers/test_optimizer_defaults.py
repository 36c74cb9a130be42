"""Fused AdamW is the optimizer of every distillation config (measured faster on CPU: `make bench`'s optimizer table)."""

import pytest
import torch

from hf_distill.trainers import KDConfig, UdonConfig, UnicConfig

from .test_unic_trainer import build


@pytest.mark.parametrize("config_class", [UnicConfig, UdonConfig, KDConfig])
def test_configs_default_to_fused_adamw(config_class, tmp_path):
    args = config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    assert args.optim == "adamw_torch_fused"


def test_unic_trainer_builds_a_fused_adamw_on_cpu(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(tiny_teachers, image_dataset_dir, tmp_path, max_steps=1)
    optimizer = trainer.create_optimizer()
    optimizer = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["betas"] == (0.9, 0.99)
