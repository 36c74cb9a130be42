"""The grouped-matmul ladder heads give the same predictions and gradients as one MLP call per block per teacher."""

import pytest
import torch

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.models.modeling_unic import LadderProjector, grouped_ladder_forward

from ..conftest import tiny_vit_config

TEACHERS = [
    {"name": "a", "summary_dim": 48, "patch_dim": 48},
    {"name": "b", "summary_dim": 16, "patch_dim": 24},
    {"name": "c", "summary_dim": 32, "patch_dim": 8},
]


def projectors(num_rungs):
    torch.manual_seed(0)
    return [LadderProjector(32, dim, num_rungs, ladder_hidden=32, last_hidden=128) for dim in (48, 16, 24)]


@pytest.mark.parametrize("num_rungs", [1, 2, 4])
@pytest.mark.parametrize("lead", [(5,), (2, 7)])  # CLS tokens [B, d] and patch tokens [B, N, d]
def test_grouped_forward_matches_per_teacher_calls(num_rungs, lead):
    heads = projectors(num_rungs)
    features = [torch.randn(*lead, 32) for _ in range(num_rungs)]
    grouped = grouped_ladder_forward(heads, features)
    plain = [head(features) for head in heads]
    assert [g.shape for g in grouped] == [(*lead, d) for d in (48, 16, 24)]
    for g, p in zip(grouped, plain):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)


def grads(student, pixels, targets):
    student.zero_grad()
    out = student(pixels)
    loss = sum(((p - t) ** 2).mean() for p, t in zip(out.cls_predictions + out.patch_predictions, targets))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [{}, {"use_ladder": False}, {"ladder_layers": [1]}])
def test_student_gradients_are_the_same_with_grouped_heads(options):
    torch.manual_seed(0)
    config = UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=TEACHERS, grouped_heads=True, **options)
    student = UnicStudentModel(config)
    pixels = torch.randn(3, 3, 32, 32)
    targets = [torch.randn(3, t["summary_dim"]) for t in TEACHERS] + [
        torch.randn(3, 16, t["patch_dim"]) for t in TEACHERS
    ]
    loss_grouped, grads_grouped = grads(student, pixels, targets)
    student.config.grouped_heads = False
    loss_plain, grads_plain = grads(student, pixels, targets)
    torch.testing.assert_close(loss_grouped, loss_plain, rtol=1e-5, atol=1e-6)
    assert grads_grouped.keys() == grads_plain.keys() and len(grads_plain) > 0
    for name in grads_plain:
        torch.testing.assert_close(grads_grouped[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)
