"""UDON losses as pure functions (Ypsilantis et al., "UDON: Universal Dynamic Online distillatioN for generic image
representations", NeurIPS 2024; docs/methods.md).

Shapes: `B` images of ONE domain, `C` classes of that domain, `E` embedding width. Embeddings are L2-normalized.
Nothing here reads a value back to the host: every result is a tensor.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MARGIN_TYPES = ("none", "arcface", "cosface")
_ACOS_EPS = 1e-7  # keeps acos (and its gradient) finite at cos = +-1


def class_cosines(embeddings: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cosine classifier without bias.

    Args:
        embeddings (`torch.Tensor` of shape `(B, E)`): L2-normalized embeddings.
        class_weights (`torch.Tensor` of shape `(C, E)`): one row per class, L2-normalized here.

    Returns:
        `torch.Tensor` of shape `(B, C)`: the cosines between each embedding and each class weight.
    """
    return embeddings @ F.normalize(class_weights, dim=-1).t()


def margin_logits(
    cosines: torch.Tensor,
    labels: torch.Tensor | None = None,
    scale: float = 16.0,
    margin: float = 0.0,
    margin_type: str = "none",
) -> torch.Tensor:
    """Normalized-softmax logits `scale * cos`; with `labels`, the target cosine is replaced by `cos(theta + m)`
    (ArcFace, as the authors' code: no fallback when `theta + m > pi`) or `cos - m` (CosFace).

    Args:
        cosines (`torch.Tensor` of shape `(B, C)`): class cosines.
        labels (`torch.LongTensor` of shape `(B,)`, *optional*): targets; without them no margin is applied
            (evaluation logits).
        scale (`float`, defaults to 16.0): logit scale `s`.
        margin (`float`, defaults to 0.0): margin `m` (radians for ArcFace).
        margin_type (`str`, defaults to `"none"`): one of `"none"`, `"arcface"`, `"cosface"`.
    """
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}.")
    if labels is None or margin_type == "none" or margin == 0.0:
        return scale * cosines
    index = labels.view(-1, 1)
    target = cosines.gather(1, index)  # only the B target cosines get a margin: no acos over the [B, C] matrix
    if margin_type == "cosface":
        adjusted = target - margin
    else:
        adjusted = torch.cos(torch.acos(target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS)) + margin)
    return scale * cosines.scatter(1, index, adjusted)


def cosine_logits(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    scale: float = 16.0,
    margin: float = 0.0,
    margin_type: str = "none",
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`margin_logits(class_cosines(embeddings, weight), labels, ...)`: the normalized-softmax logits of a cosine
    classifier, margins applied to the target class only when `labels` are given."""
    return margin_logits(class_cosines(embeddings, weight), labels, scale, margin, margin_type)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `(B, C)` logits (already scaled, margins included), mean over the batch."""
    return F.cross_entropy(logits, labels)


def logit_distillation_loss(
    student_cosines: torch.Tensor, teacher_cosines: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """`KL(softmax(teacher_cos / T) || softmax(student_cos / T))`, summed over classes, mean over the batch.

    Takes COSINES, not the scaled logits: the paper divides the cosines by T = 0.1 (an effective scale of 10, not
    16 / 0.1). The teacher side is detached.
    """
    teacher_log_probs = F.log_softmax(teacher_cosines.detach() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_cosines / temperature, dim=-1)
    return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")


RELATIONAL_SCALE = 32.0


def relational_distillation_loss(
    student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, scale: float = RELATIONAL_SCALE
) -> torch.Tensor:
    """Squared error between the in-batch similarity matrices `S_s = E_s E_s^T` and `S_t = E_t E_t^T` (teacher
    detached): `scale * mean over the B x B entries of (S_s - S_t)^2`.

    The authors' code sums the squared error over columns and averages over rows on each device (`b` times the mean
    over the `b x b` entries of its local batch of `b` images), then multiplies by `devices / 4`. At its reference
    setting, a global batch of 128 on 4 devices (`b = 32`), that is 32 x the mean: the default `scale` of 32 gives
    that value whatever the batch size and however the global batch is split over processes. Other settings of the
    authors' code: `scale = b * devices / 4`; `scale = B` (the local batch) gives a plain sum over columns.

    Args:
        student_embeddings (`torch.Tensor` of shape `(B, E_s)`): L2-normalized student embeddings.
        teacher_embeddings (`torch.Tensor` of shape `(B, E_t)`): L2-normalized teacher embeddings.
        scale (`float`, defaults to 32.0): multiplier of the mean squared error.
    """
    student_similarity = student_embeddings @ student_embeddings.t()
    teacher_embeddings = teacher_embeddings.detach()
    teacher_similarity = teacher_embeddings @ teacher_embeddings.t()
    return scale * (student_similarity - teacher_similarity).square().mean()


@dataclass
class UdonLoss:
    """The total loss and its terms (tensors; `None` for the terms a USCRR model does not have)."""

    loss: torch.Tensor
    student_classification: torch.Tensor
    teacher_classification: torch.Tensor | None = None
    logit_distillation: torch.Tensor | None = None
    relational_distillation: torch.Tensor | None = None

    def terms(self) -> dict[str, torch.Tensor]:
        """The terms that exist, by name."""
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
    relational_scale: float = RELATIONAL_SCALE,
) -> UdonLoss:
    """The UDON objective of one single-domain batch: the mean of teacher CE, student CE, logit KL and relational MSE.

    Args:
        labels (`torch.LongTensor` of shape `(B,)`): targets in the domain's label space.
        student_cosines, teacher_cosines (`torch.Tensor` of shape `(B, C)`): class cosines of the student and of the
            domain's teacher. Without `teacher_cosines` (USCRR baseline) the loss is the student CE alone.
        student_embeddings (`torch.Tensor` of shape `(B, E_s)`), teacher_embeddings (`(B, E_t)`): L2-normalized
            embeddings, for the relational term.
        distill_student_cosines, distill_student_embeddings (*optional*): the student's cosines / embedding computed
            from DETACHED backbone features, used by the two distillation terms instead of `student_*`, so that
            distillation gradients stop at the student head (paper). Left out, distillation also reaches the
            backbone (authors' code). The teacher side of both terms is always detached.
        scale, margin, margin_type: see [`margin_logits`] (both classification terms).
        temperature (`float`, defaults to 0.1): temperature of the logit distillation, on cosines.
        relational_scale (`float`, defaults to 32.0): multiplier of the relational term's mean squared error (see
            [`relational_distillation_loss`]; 32 matches the authors' code at its reference global batch of 128 on 4
            devices).
    """
    student_ce = classification_loss(margin_logits(student_cosines, labels, scale, margin, margin_type), labels)
    if teacher_cosines is None:
        return UdonLoss(loss=student_ce, student_classification=student_ce)
    teacher_ce = classification_loss(margin_logits(teacher_cosines, labels, scale, margin, margin_type), labels)
    distill_cosines = student_cosines if distill_student_cosines is None else distill_student_cosines
    distill_embeddings = student_embeddings if distill_student_embeddings is None else distill_student_embeddings
    kl = logit_distillation_loss(distill_cosines, teacher_cosines, temperature)
    relational = relational_distillation_loss(distill_embeddings, teacher_embeddings, relational_scale)
    return UdonLoss(
        loss=(teacher_ce + student_ce + kl + relational) / 4,
        student_classification=student_ce,
        teacher_classification=teacher_ce,
        logit_distillation=kl,
        relational_distillation=relational,
    )
