"""Adaptor export: the UNIC student WITH its per-teacher heads, as a model that stands in for each of its teachers.

In training the heads predict STANDARDIZED teacher features `x' = S(x)`. Every standardization is affine and
invertible on the teacher's features (`x = A x' + c`: per dimension `A = diag(std)`, `c = mean` for `"unic"` /
`"dune"`; `A = U H^T / alpha`, `c = mu` for PHI-S), and a head's output is a sum of MLPs whose last layers are linear,
so the inverse folds into those last layers: `W' = A W`, `b' = A b` on every rung, plus `c` on the last rung's bias.
The exported adaptors then output the teacher's own features, directly comparable with the teacher's
(evaluation: [`~hf_distill.evaluation.emulation`]).

The export ships [`UnicAdaptorModel`] (`modeling_unic_adaptors.py` and `configuration_unic_adaptors.py`, which import
only torch and transformers) next to its weights, so that `AutoModel.from_pretrained(folder, trust_remote_code=True)`
works without hf_distill. Every student exports: ViT-family encoders (the ladder reads blocks) and feature-map
backbones (ConvNeXt, ResNet, Swin: the ladder reads stages, each rung of its stage's width).
"""

import logging
import os

import torch

from ..io_utils import atomic_folder
from .configuration_unic_adaptors import UnicAdaptorConfig
from .modeling_unic_adaptors import UnicAdaptorModel
from .student_backbones import is_feature_map_config

ADAPTORS_FOLDER = "adaptors"  # where the trainer writes the adaptor export, inside its output_dir
logger = logging.getLogger(__name__)


def folded_heads(student, teachers: list[str]) -> dict[str, torch.Tensor]:
    """State dict of the export's heads (`summary_heads.*`, `patch_heads.*`): the student's heads with the inverse of
    their teacher's standardization folded into the last layer of every rung (computed in float64)."""
    state = {}
    for kind, heads, standardizers in (
        ("summary", student.cls_heads, student.cls_standardizers),
        ("patch", student.patch_heads, student.patch_standardizers),
    ):
        for name in teachers:
            matrix, offset = standardizers[name].inverse_affine()
            last = len(heads[name].rungs) - 1
            for index, rung in enumerate(heads[name].rungs):
                prefix = f"{kind}_heads.{name}.rungs.{index}"
                state[f"{prefix}.0.weight"] = rung[0].weight.detach()
                state[f"{prefix}.0.bias"] = rung[0].bias.detach()
                weight = matrix.to(rung[2].weight.device) @ rung[2].weight.detach().double()
                bias = matrix.to(rung[2].bias.device) @ rung[2].bias.detach().double()
                if index == last:
                    bias = bias + offset.to(bias.device)
                state[f"{prefix}.2.weight"] = weight.float()
                state[f"{prefix}.2.bias"] = bias.float()
    return state


def adaptor_model(student, teachers: list[str] | None = None, state_dict: dict | None = None) -> UnicAdaptorModel:
    """The [`UnicAdaptorModel`] of `student` (a [`UnicStudentModel`]) for `teachers` (names; default: all), a CPU
    copy sharing nothing with it. `state_dict`: the student's full state dict when its parameters are not all local
    (gathered under FSDP / ZeRO-3)."""
    names = student.config.teacher_names
    teachers = list(names if teachers is None else teachers)
    unknown = [name for name in teachers if name not in names]
    if unknown or not teachers:
        raise ValueError(f"Cannot export adaptors for {unknown or 'no teacher'}: the student has heads for {names}.")
    if state_dict is not None:  # a local copy holding the gathered weights
        source = type(student)(student.config)
        source.load_state_dict({key: value.cpu() for key, value in state_dict.items()})
    else:
        source = student
    warming_up = [
        name
        for name in teachers
        for kind in (source.cls_standardizers, source.patch_standardizers)
        if not getattr(kind[name], "is_frozen", True)
    ]
    if warming_up:
        logger.warning(
            "The PHI-S transform of %s is still in its warm-up (fewer training batches than "
            "standardization_warmup_steps): the adaptors invert the warm-up transform.",
            sorted(set(warming_up)),
        )
    backbone_config = student.config.backbone_config.to_dict()
    backbone_config.pop("_name_or_path", None)  # a local path of this machine must not be published
    rungs = source.cls_heads[teachers[0]].rungs
    config = UnicAdaptorConfig(
        backbone_config=backbone_config,
        teachers=[
            {
                "name": teacher["name"],
                "summary_dim": teacher["summary_dim"],
                "patch_dim": teacher["patch_dim"],
                "standardization": student.config.standardization,
            }
            for teacher in student.config.teachers
            if teacher["name"] in teachers
        ],
        ladder_layers=student.config.ladder_block_indices,
        rung_input_sizes=[rung[0].in_features for rung in rungs],
        rung_hidden_sizes=[rung[0].out_features for rung in rungs],
        feature_map_backbone=is_feature_map_config(student.config.backbone_config),
        patch_size=student.config.patch_size,
        image_mean=student.config.image_mean,
        image_std=student.config.image_std,
    )
    model = UnicAdaptorModel(config)
    state = {f"backbone.{key}": value.detach().cpu() for key, value in source.backbone.state_dict().items()}
    state.update({key: value.cpu() for key, value in folded_heads(source, teachers).items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_adaptors(
    student,
    output_dir: str | os.PathLike,
    teachers: list[str] | None = None,
    image_size: int | None = None,
    state_dict: dict | None = None,
    **kwargs,
) -> str:
    """Write the adaptor model of `student` to `output_dir` (atomically: a staging folder renamed into place):
    weights, config with `auto_map`, its two code files (torch / transformers only) and the student's image
    processor.

    Args:
        student ([`UnicStudentModel`]): the trained student with its heads and standardizers.
        output_dir (`str` or `os.PathLike`): the export folder (replaced if it exists).
        teachers (`list[str]`, *optional*): names of the teachers whose adaptors are exported (default: all).
        image_size (`int`, *optional*): side of the images the processor produces (default: the student config's;
            required for a backbone whose config has no image size, e.g. ResNet).
        state_dict (`dict`, *optional*): the student's full state dict, when gathered from shards.
        kwargs: passed to `save_pretrained` (e.g. `max_shard_size`).

    Returns:
        `str`: the export folder.
    """
    image_size = image_size or getattr(student.config.backbone_config, "image_size", None)
    if image_size is None:
        raise ValueError(
            f"Pass image_size: the student's {student.config.backbone_config.model_type} config records no image size "
            "for the exported image processor."
        )
    model = adaptor_model(student, teachers, state_dict)
    UnicAdaptorConfig.register_for_auto_class()
    UnicAdaptorModel.register_for_auto_class("AutoModel")
    with atomic_folder(output_dir) as staging:
        model.save_pretrained(staging, **kwargs)
        student.image_processor(image_size).save_pretrained(staging)
    return os.fspath(output_dir)


__all__ = ["ADAPTORS_FOLDER", "adaptor_model", "export_adaptors", "folded_heads"]
