from .unic import distillation_loss, teacher_drop_coefficients, teacher_losses, token_loss, unic_loss

__all__ = ["distillation_loss", "teacher_drop_coefficients", "teacher_losses", "token_loss", "unic_loss"]
