"""hf_distill's fast UNIC step computes the same losses and gradients as the reference-style step of the benchmark
(teachers under no_grad, one MLP call per block per teacher, Python-loop teacher dropping)."""

import copy

import torch
from transformers import ViTConfig

from benchmarks.reference_unic import (
    reference_distillation_loss,
    reference_drop_coefficients,
    reference_heads,
    reference_teacher_outputs,
)
from hf_distill import TeacherConfig, TeacherModel, UnicStudentConfig, UnicStudentModel
from hf_distill.losses import distillation_loss, teacher_drop_coefficients
from hf_distill.models import freeze_teacher
from hf_distill.models.teacher_loading import teacher_outputs
from hf_distill.trainers.unic_trainer import standardize_targets

from ..conftest import TINY, tiny_vit_config

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def test_vectorized_teacher_dropping_equals_the_python_loop():
    losses = torch.rand(64, 4)
    losses[3] = 1.0  # ties: both keep the first maximum
    for p in (0.0, 0.25, 0.5, 0.9):
        fast = teacher_drop_coefficients(losses, p, torch.Generator().manual_seed(1))
        loop = reference_drop_coefficients(losses, p, torch.Generator().manual_seed(1))
        assert torch.equal(fast, loop), p
    assert fast.sum() < fast.numel()  # something was dropped


def test_fast_step_matches_the_reference_step():
    torch.manual_seed(0)
    teachers = [
        freeze_teacher(
            TeacherModel(
                TeacherConfig(backbone_config=ViTConfig(**{**TINY, "hidden_size": h}, image_size=32, patch_size=8))
            )
        )
        for h in (48, 24)
    ]
    specs = [{"name": f"t{i}", "summary_dim": t.summary_dim, "patch_dim": t.patch_dim} for i, t in enumerate(teachers)]
    student = UnicStudentModel(
        UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=specs, grouped_heads=True)
    )
    reference = copy.deepcopy(student)
    pixels = torch.randn(6, 3, 32, 32)
    grid = student.grid_size(32, 32)

    targets = standardize_targets(student, teacher_outputs(teachers, pixels, MEAN, STD, grid), 0.5)
    outputs = student(pixels)
    loss, _, kept = distillation_loss(
        outputs.cls_predictions, outputs.patch_predictions, targets, 0.5, "image", torch.Generator().manual_seed(3)
    )
    loss.backward()

    ref_targets = standardize_targets(reference, reference_teacher_outputs(teachers, pixels, MEAN, STD, grid), 0.5)
    _, cls_features, patch_features = reference.ladder_features(pixels)
    cls_predictions, patch_predictions = reference_heads(reference, cls_features, patch_features)
    ref_loss, _, ref_kept = reference_distillation_loss(
        cls_predictions, patch_predictions, ref_targets, 0.5, "image", torch.Generator().manual_seed(3)
    )
    ref_loss.backward()

    assert torch.equal(kept, ref_kept) and kept.sum() < kept.numel()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_parameters = dict(reference.named_parameters())
    for name, parameter in student.named_parameters():
        if parameter.grad is not None or ref_parameters[name].grad is not None:
            torch.testing.assert_close(parameter.grad, ref_parameters[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, buffer in reference.named_buffers():  # the standardization statistics moved the same way
        torch.testing.assert_close(dict(student.named_buffers())[name], buffer)
