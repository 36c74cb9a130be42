"""UNIC distillation losses as pure functions (UNIC, Sariyildiz et al., ECCV 2024; docs/methods.md section 1).

Shapes: `B` images, `T` teachers, `N` patch tokens, `D` a teacher's feature width.
"""

import torch
import torch.nn.functional as F

COEFFICIENT_NORMALIZATIONS = ("image", "batch")


def token_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """UNIC eq. 1 for every token: `0.5 * (1 - cos(p, y)) + 0.5 * smoothL1(p, y)` (beta 1, mean over dims).

    `prediction` and `target` are `[..., D]`; returns `[...]`. The target is treated as a constant.
    """
    prediction = prediction.float()
    target = target.float()
    cosine = 1.0 - F.cosine_similarity(prediction, target, dim=-1)
    smooth_l1 = F.smooth_l1_loss(prediction, target, beta=1.0, reduction="none").mean(dim=-1)
    return 0.5 * cosine + 0.5 * smooth_l1


def teacher_losses(
    cls_prediction: torch.Tensor,
    cls_target: torch.Tensor,
    patch_prediction: torch.Tensor,
    patch_target: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-image loss of one teacher (UNIC eq. 2 inner term, CLS and patch averaged).

    Args:
        cls_prediction, cls_target: `[B, D]`.
        patch_prediction, patch_target: `[B, N, D]`.

    Returns:
        `{"cls": [B], "patch": [B] (mean over tokens), "loss": [B] = 0.5 * (cls + patch)}`.
    """
    cls_loss = token_loss(cls_prediction, cls_target)
    patch_loss = token_loss(patch_prediction, patch_target).mean(dim=-1)
    return {"cls": cls_loss, "patch": patch_loss, "loss": 0.5 * (cls_loss + patch_loss)}


def teacher_drop_coefficients(
    losses: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Teacher dropping (UNIC eq. 4), decided with tensor ops only: no Python loop, no host sync.

    For every image, the teacher with the largest loss is always kept (ties: the first one); every other teacher is
    dropped independently with probability `drop_prob`.

    Args:
        losses: `[B, T]` per-image, per-teacher losses (only compared, never differentiated).
        drop_prob: probability `p` of dropping a non-maximal teacher.
        generator: explicit random generator on `losses.device`.

    Returns:
        `[B, T]` float coefficients in {0, 1}, detached.
    """
    losses = losses.detach()
    if drop_prob <= 0.0:
        return torch.ones_like(losses)
    is_max = F.one_hot(losses.argmax(dim=-1), num_classes=losses.shape[-1]).bool()
    keep = torch.rand(losses.shape, generator=generator, device=losses.device) >= drop_prob
    return (keep | is_max).to(losses.dtype)


def unic_loss(
    losses: torch.Tensor, coefficients: torch.Tensor | None = None, normalization: str = "image"
) -> torch.Tensor:
    """Total UNIC loss from per-image, per-teacher losses and (detached) teacher coefficients.

    Args:
        losses: `[B, T]`.
        coefficients: `[B, T]` in {0, 1} (all ones without teacher dropping). An image whose coefficients are all 0
            (no valid teacher, see [`distillation_loss`]) is left out of the mean; if no image is left, the loss is 0.
        normalization: `"image"` (paper intent: each image is the mean over its kept teachers, then images are
            averaged, so every image weighs the same) or `"batch"` (UNIC code: sum of kept losses divided by the number
            of kept (image, teacher) pairs in the batch).
    """
    if coefficients is None:
        coefficients = torch.ones_like(losses)
    coefficients = coefficients.detach()
    weighted = losses * coefficients
    kept = coefficients.sum(dim=-1)
    if normalization == "image":
        # an image without any kept teacher (all its targets non-finite) is left out; without masks there is none
        has_teacher = (kept > 0).to(losses.dtype)
        return (weighted.sum(dim=-1) / kept.clamp_min(1.0) * has_teacher).sum() / has_teacher.sum().clamp_min(1.0)
    if normalization == "batch":
        return weighted.sum() / kept.sum().clamp_min(1.0)
    raise ValueError(f"normalization must be one of {COEFFICIENT_NORMALIZATIONS}, got {normalization!r}.")


def distillation_loss(
    cls_predictions: list[torch.Tensor],
    patch_predictions: list[torch.Tensor],
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    drop_prob: float = 0.0,
    normalization: str = "image",
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], torch.Tensor]:
    """The UNIC objective of one batch: per-teacher losses, teacher dropping, total loss.

    Args:
        cls_predictions, patch_predictions: per teacher, `[B, D]` and `[B, N, D]` student predictions.
        targets: per teacher, the (standardized) `(summary [B, D], patch tokens [B, N, D])`.
        drop_prob: teacher dropping probability (0: keep all teachers, e.g. at evaluation).
        normalization, generator: see [`unic_loss`] and [`teacher_drop_coefficients`].
        valid: `[B, T]` bool, the (image, teacher) pairs whose target is usable (finite teacher outputs). The others
            get coefficient 0 and never count as an image's largest loss; the image's other teachers still count,
            and an image without any valid teacher is left out of the loss. `None`: all valid. The targets of invalid
            pairs must still be finite (e.g. the zeros [`FeatureStandardizer`] gives them): NaN times a zero
            coefficient is NaN in the backward pass.

    Returns:
        `(loss, per-teacher terms of [`teacher_losses`], coefficients [B, T])`, all tensors (no host sync).
    """
    per_teacher = [
        teacher_losses(cls_pred, cls_target, patch_pred, patch_target)
        for cls_pred, patch_pred, (cls_target, patch_target) in zip(cls_predictions, patch_predictions, targets)
    ]
    losses = torch.stack([terms["loss"] for terms in per_teacher], dim=1)
    if valid is None:
        coefficients = teacher_drop_coefficients(losses, drop_prob, generator)
    else:
        ranked = losses.detach().masked_fill(~valid, float("-inf"))
        coefficients = teacher_drop_coefficients(ranked, drop_prob, generator) * valid.to(losses.dtype)
        losses = torch.where(valid, losses, 0.0)
    return unic_loss(losses, coefficients, normalization), per_teacher, coefficients
