from .unic import teacher_drop_coefficients, teacher_losses, token_loss, unic_loss

__all__ = ["teacher_drop_coefficients", "teacher_losses", "token_loss", "unic_loss"]
