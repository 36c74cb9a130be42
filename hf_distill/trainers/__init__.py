from .kd_config import KDConfig
from .kd_trainer import KDTrainer, classification_accuracy
from .udon_config import UdonConfig
from .udon_trainer import UdonTrainer
from .unic_config import UnicConfig
from .unic_trainer import UnicTrainer, teacher_spec, unique_teacher_names

__all__ = [
    "KDConfig",
    "KDTrainer",
    "classification_accuracy",
    "UdonConfig",
    "UdonTrainer",
    "UnicConfig",
    "UnicTrainer",
    "teacher_spec",
    "unique_teacher_names",
]
