"""Teachers and students. This is the only module that registers classes with AutoConfig / AutoModel."""

from transformers import AutoConfig, AutoModel

from .configuration_teacher import TeacherConfig
from .configuration_udon import UdonConfig
from .configuration_unic import UnicStudentConfig
from .modeling_teacher import (
    ModuleTeacher,
    TeacherModel,
    TeacherNotFoundError,
    TeacherOutput,
    freeze_teacher,
    load_teacher,
    load_teacher_config,
    teacher_name,
)
from .modeling_udon import UdonModel, UdonOutput
from .modeling_unic import UnicStudentModel, UnicStudentOutput
from .standardization import FeatureStandardizer, ema_weight, global_moments

AutoConfig.register(TeacherConfig.model_type, TeacherConfig, exist_ok=True)
AutoModel.register(TeacherConfig, TeacherModel, exist_ok=True)
AutoConfig.register(UnicStudentConfig.model_type, UnicStudentConfig, exist_ok=True)
AutoModel.register(UnicStudentConfig, UnicStudentModel, exist_ok=True)
AutoConfig.register(UdonConfig.model_type, UdonConfig, exist_ok=True)
AutoModel.register(UdonConfig, UdonModel, exist_ok=True)

__all__ = [
    "FeatureStandardizer",
    "ModuleTeacher",
    "TeacherConfig",
    "TeacherModel",
    "TeacherNotFoundError",
    "TeacherOutput",
    "UdonConfig",
    "UdonModel",
    "UdonOutput",
    "UnicStudentConfig",
    "UnicStudentModel",
    "UnicStudentOutput",
    "ema_weight",
    "freeze_teacher",
    "global_moments",
    "load_teacher",
    "load_teacher_config",
    "teacher_name",
]
