"""UDON losses as pure functions (Ypsilantis et al., "UDON: Universal Dynamic Online distillatioN for generic image
representations", REFERENCE.md 2).

Shapes: `B` images of ONE domain, `C` classes of that domain, `E` embedding width. Embeddings are L2-normalized.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MARGIN_TYPES = ("none", "arcface", "cosface")


def class_cosines(embeddings: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cosine classifier: `[B, E]` normalized embeddings x `[C, E]` class weights (normalized here, no bias) ->
    `[B, C]` cosines."""
    return embeddings @ F.normalize(class_weights, dim=-1).t()


def margin_logits(
    cosines: torch.Tensor,
    labels: torch.Tensor,
    scale: float = 16.0,
    margin: float = 0.0,
    margin_type: str = "none",
) -> torch.Tensor:
    """Normalized-softmax logits `scale * cos`, with the target class's cosine replaced by `cos(theta + m)` (ArcFace)
    or `cos - m` (CosFace)."""
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}.")
    if margin_type == "none" or margin == 0.0:
        return scale * cosines
    target = F.one_hot(labels, cosines.shape[-1]).bool()
    if margin_type == "cosface":
        adjusted = cosines - margin
    else:
        theta = torch.acos(cosines.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        adjusted = torch.cos(theta + margin)
    return scale * torch.where(target, adjusted, cosines)


def classification_loss(cosines, labels, scale=16.0, margin=0.0, margin_type="none") -> torch.Tensor:
    """Cross-entropy of the (margin) normalized-softmax logits."""
    return F.cross_entropy(margin_logits(cosines, labels, scale, margin, margin_type), labels)


def logit_distillation_loss(student_cosines, teacher_cosines, temperature: float = 0.1) -> torch.Tensor:
    """`KL(softmax(teacher_cos / T) || softmax(student_cos / T))`, mean over the batch; the teacher side is detached.
    Takes cosines (the paper divides cosines, not the scaled logits, by T = 0.1)."""
    teacher_log_probs = F.log_softmax(teacher_cosines.detach() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_cosines / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")


def relational_distillation_loss(student_embeddings, teacher_embeddings) -> torch.Tensor:
    """MSE between the in-batch similarity matrices `E_s E_s^T` and `E_t E_t^T` (teacher detached), as in the
    authors' code: squared error summed over columns, mean over rows."""
    student_similarity = student_embeddings @ student_embeddings.t()
    teacher_embeddings = teacher_embeddings.detach()
    teacher_similarity = teacher_embeddings @ teacher_embeddings.t()
    return (student_similarity - teacher_similarity).square().sum(dim=-1).mean()


@dataclass
class UdonLoss:
    """The total loss and its terms (tensors; `None` for the terms a USCRR model does not have)."""

    loss: torch.Tensor
    student_classification: torch.Tensor
    teacher_classification: torch.Tensor | None = None
    logit_distillation: torch.Tensor | None = None
    relational_distillation: torch.Tensor | None = None

    def terms(self) -> dict[str, torch.Tensor]:
        names = ("student_classification", "teacher_classification", "logit_distillation", "relational_distillation")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def udon_loss(
    labels: torch.Tensor,
    student_cosines: torch.Tensor,
    teacher_cosines: torch.Tensor | None = None,
    student_embeddings: torch.Tensor | None = None,
    teacher_embeddings: torch.Tensor | None = None,
    distill_student_cosines: torch.Tensor | None = None,
    distill_student_embeddings: torch.Tensor | None = None,
    scale: float = 16.0,
    margin: float = 0.0,
    margin_type: str = "none",
    temperature: float = 0.1,
) -> UdonLoss:
    """The UDON objective of one single-domain batch: the mean of teacher CE, student CE, logit KL and relational MSE.

    Without teacher cosines (USCRR baseline) the loss is the student CE alone. The distillation terms use
    `distill_student_*` when given: the student head applied to DETACHED backbone features, so distillation gradients
    stop at the student head (paper); otherwise they also reach the backbone (authors' code).
    """
    student_ce = classification_loss(student_cosines, labels, scale, margin, margin_type)
    if teacher_cosines is None:
        return UdonLoss(loss=student_ce, student_classification=student_ce)
    teacher_ce = classification_loss(teacher_cosines, labels, scale, margin, margin_type)
    distill_cosines = student_cosines if distill_student_cosines is None else distill_student_cosines
    distill_embeddings = student_embeddings if distill_student_embeddings is None else distill_student_embeddings
    kl = logit_distillation_loss(distill_cosines, teacher_cosines, temperature)
    relational = relational_distillation_loss(distill_embeddings, teacher_embeddings)
    return UdonLoss(
        loss=(teacher_ce + student_ce + kl + relational) / 4,
        student_classification=student_ce,
        teacher_classification=teacher_ce,
        logit_distillation=kl,
        relational_distillation=relational,
    )
