"""Loading teachers: from a Hub id or a local folder (a prepared teacher or a plain transformers vision backbone),
from a `py:package.module:function` factory, or from a model object; and the few helpers every user of a set of
teachers needs (names, output sizes, outputs on a batch). The teacher model classes are in `modeling_teacher.py`.
"""

import importlib
import logging

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from ..distributed_checks import is_sharded
from .configuration_teacher import GRID_ALIGNMENTS, IMAGENET_MEAN, IMAGENET_STD, SUMMARY_TYPES, TeacherConfig
from .modeling_teacher import ModuleTeacher, TeacherModel, freeze_teacher
from .student_backbones import is_feature_map_config

logger = logging.getLogger(__name__)


class TeacherNotFoundError(ValueError):
    """A teacher id or path that cannot be resolved (not a local folder, not in the Hub cache when offline)."""


def _default_summary(backbone_config) -> str:
    # SigLIP-style towers and feature-map backbones have no CLS token: their summary is the pooled output.
    no_cls = backbone_config.model_type.startswith("siglip") or is_feature_map_config(backbone_config)
    return "pooler" if no_cls else "cls"


def _read_config(source: str, revision: str | None):
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise TeacherNotFoundError(
            f"Teacher {source!r} could not be found: it is not a local folder with a config.json, and it could not be "
            "loaded from the Hugging Face Hub or its local cache (with HF_HUB_OFFLINE=1 only cached models can be "
            f"used). Check the id or path, or download it first with `hf download {source}`. Original error: {error}"
        ) from error


def load_teacher_config(
    source: str,
    revision: str | None = None,
    summary: str | None = None,
    grid_alignment: str | None = None,
    image_size: int | None = None,
) -> TeacherConfig:
    """Resolve the [`TeacherConfig`] of `source` without loading weights (cheap: reads config files only).

    `source` is a Hub id or a local folder holding either a prepared teacher or a plain transformers vision model
    (for CLIP / SigLIP checkpoints the vision tower is used). Options left to `None` keep the prepared teacher's
    values or the defaults. Raises [`TeacherNotFoundError`] with instructions when `source` cannot be found.
    """
    config = _read_config(source, revision)
    options = {"summary": summary, "grid_alignment": grid_alignment, "image_size": image_size}
    options = {key: value for key, value in options.items() if value is not None}
    if isinstance(config, TeacherConfig):
        for key, value in options.items():
            setattr(config, key, value)
        if config.summary not in SUMMARY_TYPES or config.grid_alignment not in GRID_ALIGNMENTS:
            raise ValueError(f"Invalid teacher options for {source!r}: {options}.")
        return config

    backbone_config = getattr(config, "vision_config", None) or config
    vit_family = hasattr(backbone_config, "patch_size") and hasattr(backbone_config, "hidden_size")
    if not (vit_family or is_feature_map_config(backbone_config)):
        raise ValueError(
            f"Teacher {source!r} ({config.model_type}) is not a ViT-family vision backbone (no patch_size / "
            "hidden_size in its config) nor a ConvNeXt / ResNet / Swin. Wrap other networks in "
            "hf_distill.ModuleTeacher."
        )
    try:
        processor_dict, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
        image_mean = processor_dict.get("image_mean") or IMAGENET_MEAN
        image_std = processor_dict.get("image_std") or IMAGENET_STD
    except OSError:
        logger.warning("Teacher %r has no image processor config; assuming ImageNet mean/std.", source)
        image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD
    options.setdefault("summary", _default_summary(backbone_config))
    return TeacherConfig(
        backbone_config=backbone_config,
        source=source,
        revision=revision or getattr(config, "_commit_hash", None),
        image_mean=list(image_mean),
        image_std=list(image_std),
        **options,
    )


FACTORY_PREFIX = "py:"


def is_factory_spec(teacher) -> bool:
    """`py:package.module:function`: a teacher built by calling a Python function (e.g. a `ModuleTeacher` around a
    CNN), so that plain-module teachers can be named on a command line.

    Loading such a teacher imports that module and calls the function: it runs arbitrary Python code. The recipes
    accept one read from a `--config` YAML only with `--allow_code_teachers` on the command line
    ([`hf_distill.recipe_utils.parse_with_yaml`]); one typed on the command line is explicit."""
    return isinstance(teacher, str) and teacher.startswith(FACTORY_PREFIX)


def _build_from_factory(spec: str) -> nn.Module:
    module_name, _, function_name = spec[len(FACTORY_PREFIX) :].partition(":")
    if not module_name or not function_name:
        raise ValueError(f"A teacher factory is written py:package.module:function, got {spec!r}.")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise TeacherNotFoundError(f"Teacher factory {spec!r} could not be imported: {error}") from error
    return factory()


def load_teacher(
    teacher: "str | nn.Module",
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    **options,
) -> "TeacherModel | ModuleTeacher":
    """Load a teacher from a Hub id / local path (prepared teacher or plain backbone), or check a module.

    The result is frozen (`eval()`, no gradients). `options` are [`TeacherConfig`] fields (`summary`,
    `grid_alignment`, `image_size`; `None` values keep the defaults) read for ids and paths only: modules and
    `py:` factories carry their own settings. `dtype` (e.g. `torch.bfloat16`) casts the teacher's weights.
    """
    if is_factory_spec(teacher):
        spec, teacher = teacher, _build_from_factory(teacher)
        if isinstance(teacher, ModuleTeacher):
            teacher.source = spec
    if isinstance(teacher, (TeacherModel, ModuleTeacher)):
        model = teacher
    elif isinstance(teacher, nn.Module):
        raise TypeError(
            f"{type(teacher).__name__} is a plain nn.Module: wrap it in hf_distill.ModuleTeacher(module, image_mean=..., "
            "image_std=..., patch_size=...) to say how its features and pixel normalization are read."
        )
    elif isinstance(teacher, str):
        config = load_teacher_config(teacher, revision=revision, **options)
        if isinstance(_read_config(teacher, revision), TeacherConfig):  # a prepared teacher
            model = TeacherModel.from_pretrained(teacher, config=config, revision=revision, dtype=dtype)
        else:
            backbone_cls = MODEL_MAPPING[type(config.backbone_config)]
            backbone = backbone_cls.from_pretrained(teacher, revision=revision, dtype=dtype)
            model = TeacherModel(config, backbone=backbone)
    else:
        raise TypeError(f"A teacher is a Hub id, a local path or an nn.Module, got {type(teacher).__name__}.")
    if dtype is not None:
        model.to(dtype)
    return freeze_teacher(model)


def teacher_source(teacher: nn.Module) -> str:
    """Where a loaded teacher comes from: its Hub id / path, its factory spec, or its class name."""
    config_source = getattr(getattr(teacher, "config", None), "source", None)
    return config_source or getattr(teacher, "source", None) or type(teacher).__name__


def teacher_name(teacher: "str | nn.Module") -> str:
    """Short name of a teacher for logs: the last part of its id/path, or the module's name."""
    if is_factory_spec(teacher):
        return teacher.rsplit(":", 1)[-1].removesuffix("_teacher").replace("_", "-")
    if isinstance(teacher, str):
        return teacher.rstrip("/").split("/")[-1]
    if isinstance(teacher, TeacherModel) and teacher.config.source:
        return teacher_name(teacher.config.source)
    return getattr(teacher, "name", type(teacher).__name__.lower())


def teacher_from_backbone(
    backbone: PreTrainedModel, summary: str | None = None, image_mean=None, image_std=None
) -> TeacherModel:
    """A frozen [`TeacherModel`] around a ViT-family or feature-map model object already in memory (for a classifier,
    pass its `base_model`); its normalization defaults to ImageNet's and its summary to `cls` (`pooler` without a CLS
    token)."""
    config = TeacherConfig(
        backbone_config=backbone.config,
        source=backbone.config.name_or_path or None,
        summary=summary or _default_summary(backbone.config),
        image_mean=list(image_mean or IMAGENET_MEAN),
        image_std=list(image_std or IMAGENET_STD),
    )
    return freeze_teacher(TeacherModel(config, backbone=backbone))


def unique_teacher_names(teachers: list) -> list[str]:
    """Short, unique names for logs and head keys (`dinov2-base`, `dinov2-base_1`, ...)."""
    names = []
    for teacher in teachers:
        name = teacher_name(teacher).replace(".", "_")
        base, index = name, 1
        while name in names:
            name, index = f"{base}_{index}", index + 1
        names.append(name)
    return names


def teacher_spec(name: str, teacher) -> dict:
    """`{"name", "summary_dim", "patch_dim"}` of a teacher module or a [`TeacherConfig`] (for the student config)."""
    if isinstance(teacher, TeacherConfig):
        return {"name": name, "summary_dim": teacher.hidden_size, "patch_dim": teacher.hidden_size}
    return {"name": name, "summary_dim": teacher.summary_dim, "patch_dim": teacher.patch_dim}


def teacher_outputs(
    teachers: list[nn.Module], pixel_values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, grid: tuple[int, int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every teacher's `(summary, patch tokens)` on the student's views, without autograd records (see
    [`frozen_forward_context`])."""
    with frozen_forward_context(teachers):
        outputs = [teacher(pixel_values, mean, std, grid_size=grid) for teacher in teachers]
    return [(output.summary, output.patch_tokens) for output in outputs]


def frozen_forward_context(teachers: list[nn.Module]):
    """The context frozen teachers run in: `torch.inference_mode()` (the fastest), or `torch.no_grad()` when one is
    sharded (FSDP2, DeepSpeed ZeRO-3: their hooks gather parameters, which ZeRO-3 cannot do under inference mode)."""
    return torch.no_grad() if any(is_sharded(teacher) for teacher in teachers) else torch.inference_mode()
