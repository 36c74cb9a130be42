"""hf_distill: distil large pretrained vision models into smaller or more universal ones.

Importing the package registers its model classes with `AutoConfig` / `AutoModel`, so prepared teachers and UNIC
students (with their projector heads) load back with `AutoModel.from_pretrained`. Exported students are stock
transformers models and need nothing from this package.
"""

from .models import (
    ModuleTeacher,
    TeacherConfig,
    TeacherModel,
    TeacherOutput,
    UnicStudentConfig,
    UnicStudentModel,
    UnicStudentOutput,
    load_teacher,
    load_teacher_config,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ModuleTeacher",
    "TeacherConfig",
    "TeacherModel",
    "TeacherOutput",
    "UnicStudentConfig",
    "UnicStudentModel",
    "UnicStudentOutput",
    "load_teacher",
    "load_teacher_config",
]
