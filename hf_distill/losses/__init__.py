from .kd import KDLoss, kd_loss
from .unic import distillation_loss, teacher_drop_coefficients, teacher_losses, token_loss, unic_loss

__all__ = [
    "KDLoss",
    "distillation_loss",
    "kd_loss",
    "teacher_drop_coefficients",
    "teacher_losses",
    "token_loss",
    "unic_loss",
]
