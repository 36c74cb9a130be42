"""Task-specific distillation loss (Hinton et al. 2015, as used by Marrie et al., TMLR 2024; docs/methods.md 3).

    L = (1 - alpha) * CE(student, labels)  +  alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

- CE is the mean over the LABELLED rows only: rows whose label is `ignore_index` (-100, the synthetic images, which
  have no label) never reach it. A batch without any labelled row has CE = 0.
- KL is the mean over ALL rows (real and synthetic) of the per-row KL divergence summed over classes; the teacher side
  is a constant (detached).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KDLoss:
    """`loss` = `(1 - alpha) * cross_entropy + alpha * temperature^2 * kl`; the two terms are detached for logging."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    kl: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> KDLoss:
    """
    Args:
        student_logits (`torch.Tensor` of shape `(B, C)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(B, C)`): logits of the probed teacher (detached here).
        labels (`torch.LongTensor` of shape `(B,)`): class ids; `ignore_index` for rows without a label.
        alpha (`float`): weight of the distillation term, in `[0, 1]`.
        temperature (`float`): softmax temperature `T > 0` of the distillation term.
        ignore_index (`int`): label of the unlabelled rows.

    No host synchronization: the number of labelled rows stays on the device.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"Student and teacher logits must both be (batch, classes); got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels must be ({student_logits.shape[0]},), got {tuple(labels.shape)}.")
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise ValueError(f"Need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}.")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    labelled = labels != ignore_index
    ce_sum = F.cross_entropy(student, labels, ignore_index=ignore_index, reduction="sum")
    cross_entropy = ce_sum / labelled.sum().clamp(min=1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum") / student.shape[0]
    loss = (1.0 - alpha) * cross_entropy + alpha * temperature**2 * kl
    return KDLoss(loss=loss, cross_entropy=cross_entropy.detach(), kl=kl.detach())
