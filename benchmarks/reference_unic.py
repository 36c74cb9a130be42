"""A reference-style UNIC step, written the way the authors' code computes the same math (docs/methods.md 1, issue 7):

- teachers run under `torch.no_grad()` in fp32 (not inference mode, no bf16);
- one small MLP call per selected block per teacher (no grouped matmuls);
- teacher dropping decided by a Python loop over images x teachers, with a host sync (`.item()`) per decision.

It exists only to be measured against hf_distill's step in `benchmarks/bench_unic_step.py` and to check, in the tests,
that the fast paths compute the same numbers.
"""

import torch

from hf_distill.losses.unic import teacher_losses, unic_loss


def reference_drop_coefficients(losses: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None):
    """Teacher dropping with a Python loop. Draws the same uniforms as the vectorized version, so with the same
    generator state both return the same coefficients."""
    coefficients = torch.ones_like(losses)
    if drop_prob <= 0.0:
        return coefficients
    uniform = torch.rand(losses.shape, generator=generator, device=losses.device)
    for image in range(losses.shape[0]):
        kept = int(losses[image].argmax().item())
        for teacher in range(losses.shape[1]):
            if teacher != kept and uniform[image, teacher].item() < drop_prob:
                coefficients[image, teacher] = 0.0
    return coefficients


def reference_teacher_outputs(teachers, pixel_values, mean, std, grid):
    """Teachers under `torch.no_grad()` (autograd still tracks versions; no inference-mode shortcuts)."""
    outputs = []
    with torch.no_grad():
        for teacher in teachers:
            output = teacher(pixel_values, mean, std, grid_size=grid)
            outputs.append((output.summary, output.patch_tokens))
    return outputs


def reference_heads(student, cls_features, patch_features):
    """One `LadderProjector` per teacher, each one MLP call per block."""
    names = student.config.teacher_names
    return (
        [student.cls_heads[name](cls_features) for name in names],
        [student.patch_heads[name](patch_features) for name in names],
    )


def reference_distillation_loss(cls_predictions, patch_predictions, targets, drop_prob, normalization, generator):
    """Per-teacher losses, looped teacher dropping, total loss."""
    per_teacher = []
    for cls_prediction, patch_prediction, (cls_target, patch_target) in zip(
        cls_predictions, patch_predictions, targets
    ):
        per_teacher.append(teacher_losses(cls_prediction, cls_target, patch_prediction, patch_target))
    losses = torch.stack([terms["loss"] for terms in per_teacher], dim=1)
    coefficients = reference_drop_coefficients(losses, drop_prob, generator)
    return unic_loss(losses, coefficients, normalization), per_teacher, coefficients
