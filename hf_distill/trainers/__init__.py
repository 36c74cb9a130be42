from ..models.teacher_loading import teacher_spec, unique_teacher_names
from .kd_config import KDConfig
from .kd_trainer import KDTrainer, classification_accuracy
from .teacher_cache import TeacherOutputCache
from .udon_config import UdonConfig
from .udon_trainer import UdonTrainer
from .unic_config import UnicConfig
from .unic_trainer import UnicTrainer

__all__ = [
    "KDConfig",
    "KDTrainer",
    "classification_accuracy",
    "UdonConfig",
    "UdonTrainer",
    "UnicConfig",
    "TeacherOutputCache",
    "UnicTrainer",
    "teacher_spec",
    "unique_teacher_names",
]
