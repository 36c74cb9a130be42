"""Teachers and students. This is the only module that registers classes with AutoConfig / AutoModel."""

from transformers import AutoConfig, AutoModel

from .adaptors import export_adaptors
from .configuration_teacher import TeacherConfig
from .configuration_udon import UdonModelConfig
from .configuration_unic import UnicStudentConfig
from .modeling_teacher import ModuleTeacher, TeacherModel, TeacherOutput, freeze_teacher
from .modeling_udon import UdonModel, UdonOutput
from .modeling_unic import UnicStudentModel, UnicStudentOutput
from .modeling_unic_adaptors import AdaptorOutput, UnicAdaptorModel, UnicAdaptorModelOutput
from .phi_s import PhiSStandardizer
from .standardization import FeatureStandardizer, ema_weight, global_moments
from .teacher_loading import (
    TeacherNotFoundError,
    load_teacher,
    load_teacher_config,
    teacher_name,
    teacher_outputs,
    teacher_spec,
    unique_teacher_names,
)

AutoConfig.register(TeacherConfig.model_type, TeacherConfig, exist_ok=True)
AutoModel.register(TeacherConfig, TeacherModel, exist_ok=True)
AutoConfig.register(UnicStudentConfig.model_type, UnicStudentConfig, exist_ok=True)
AutoModel.register(UnicStudentConfig, UnicStudentModel, exist_ok=True)
AutoConfig.register(UdonModelConfig.model_type, UdonModelConfig, exist_ok=True)
AutoModel.register(UdonModelConfig, UdonModel, exist_ok=True)

__all__ = [
    "AdaptorOutput",
    "FeatureStandardizer",
    "ModuleTeacher",
    "PhiSStandardizer",
    "TeacherConfig",
    "TeacherModel",
    "TeacherNotFoundError",
    "TeacherOutput",
    "UdonModelConfig",
    "UdonModel",
    "UdonOutput",
    "UnicStudentConfig",
    "UnicStudentModel",
    "UnicStudentOutput",
    "UnicAdaptorModel",
    "UnicAdaptorModelOutput",
    "ema_weight",
    "export_adaptors",
    "freeze_teacher",
    "global_moments",
    "load_teacher",
    "load_teacher_config",
    "teacher_name",
    "teacher_outputs",
    "teacher_spec",
    "unique_teacher_names",
]
