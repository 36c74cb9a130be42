"""One UNIC step written with the library's functions, outside the Trainer (what `UnicTrainer.compute_loss` does
without augmentations), and the tiny fp32 teachers and student it runs on: shared by the sharding and CUDA tests."""

import torch
from torch import nn
from transformers import Dinov2Model, ViTModel

from hf_distill.losses.unic import distillation_loss
from hf_distill.models import UnicStudentConfig, UnicStudentModel
from hf_distill.models.modeling_teacher import ModuleTeacher
from hf_distill.models.teacher_loading import teacher_from_backbone, teacher_outputs
from hf_distill.trainers.nonfinite import finite_rows
from hf_distill.trainers.unic_trainer import standardize_targets

from .conftest import tiny_dinov2_config, tiny_vit_config

IMAGE = 32
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def build_teachers() -> list[nn.Module]:
    """The same three tiny fp32 teachers on every call: a ViT /4, a DINOv2 /7 and a plain conv net /8."""
    torch.manual_seed(0)
    vit = teacher_from_backbone(ViTModel(tiny_vit_config(image_size=16, patch_size=4), add_pooling_layer=False))
    dinov2 = teacher_from_backbone(Dinov2Model(tiny_dinov2_config()))
    net = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.GELU(), nn.Conv2d(16, 24, 1))
    return [vit, dinov2, ModuleTeacher(net, patch_size=8, name="convnet")]


def build_student(teachers, standardization: str = "dune") -> UnicStudentModel:
    """A tiny ViT /8 student with heads for `teachers`. The default `"dune"` standardizes the targets with the
    current (global) batch statistics, so the loss depends on them and repeated calls give the same loss."""
    torch.manual_seed(1)
    specs = [{"name": f"t{i}", "summary_dim": t.summary_dim, "patch_dim": t.patch_dim} for i, t in enumerate(teachers)]
    config = UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=specs, standardization=standardization)
    return UnicStudentModel(config)


def unic_step(student, teachers, pixels, drop_prob: float = 0.0, generator=None, normalization=None) -> torch.Tensor:
    """The UNIC loss of one batch of student-normalized `pixels`; `student` and `teachers` may be sharded.
    `normalization`: the student's (mean, std) already on the pixels' device, as the trainer keeps them (copying them
    there each step is a host-to-device copy)."""
    student_module = getattr(student, "module", student)
    grid = student_module.grid_size(*pixels.shape[-2:])
    mean, std = (MEAN.to(pixels.device), STD.to(pixels.device)) if normalization is None else normalization
    outputs = teacher_outputs(teachers, pixels, mean, std, grid)
    valid = [finite_rows(summary, patch) for summary, patch in outputs]
    targets = standardize_targets(student_module, outputs, 1.0, valid)
    predictions = student(pixel_values=pixels)
    loss, _, _ = distillation_loss(
        predictions.cls_predictions,
        predictions.patch_predictions,
        targets,
        drop_prob=drop_prob,
        generator=generator,
        valid=torch.stack(valid, dim=1),
    )
    return loss
