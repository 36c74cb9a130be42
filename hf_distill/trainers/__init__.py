from .unic_config import UnicConfig
from .unic_trainer import UnicTrainer, teacher_spec, unique_teacher_names

__all__ = ["UnicConfig", "UnicTrainer", "teacher_spec", "unique_teacher_names"]
