"""The encoders a UNIC student can be built on, and how each one gives the summary and patch tokens its heads read.

Two kinds of transformers backbones:

- ViT family (ViT, DeiT, DINOv2, ...): one token per patch plus prefix tokens (CLS, registers). The summary is the
  CLS token, the patch tokens are the rest; the ladder reads the output of every selected block.
- Feature-map backbones (ConvNeXt, ConvNeXt V2, ResNet, Swin): a pyramid of stages. The last stage's feature map
  flattened row-major gives the patch tokens `[B, h * w, C]`, its pooled vector (`pooler_output`) the summary; the
  token grid is the image size divided by the last stage's stride. The ladder has one rung per stage: a rung reads
  its stage's map (Swin: before the stage's patch merging), average-pooled to the last stage's grid for the patch
  tokens and over all positions for the summary, with an MLP of the stage's own input width
  ([`feature_map_ladder_features`], defined in the self-contained adaptor code that the adaptor export ships, so
  that training and export compute the same features).

Pretrained students (`load_pretrained_backbone`) are loaded at the training image size: ViT-family position
embeddings are resized once to the new patch grid, with the same bicubic resampling transformers applies under
`interpolate_pos_encoding=True`, so the exported model runs at that size without any flag.
"""

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .modeling_unic_adaptors import feature_map_ladder_features

logger = logging.getLogger(__name__)

# Feature-map backbones: `feature_map_stages` reads the width and stride (pixels per token) of each of their stages.
FEATURE_MAP_MODEL_TYPES = ("convnext", "convnextv2", "resnet", "swin")


def is_feature_map_config(config: PreTrainedConfig) -> bool:
    """Whether `config` is a feature-map backbone (ConvNeXt, ResNet, Swin) rather than a ViT-family encoder."""
    return config.model_type in FEATURE_MAP_MODEL_TYPES


def feature_map_stages(config: PreTrainedConfig) -> list[tuple[int, int]]:
    """`(width, stride)` of the feature map of every stage of a feature-map backbone (Swin: before patch merging)."""
    model_type = config.model_type
    if model_type in ("convnext", "convnextv2"):
        return [(width, config.patch_size * 2**stage) for stage, width in enumerate(config.hidden_sizes)]
    if model_type == "resnet":
        first = 8 if config.downsample_in_first_stage else 4  # stem: stride-2 conv and stride-2 max pool
        return [(width, first * 2**stage) for stage, width in enumerate(config.hidden_sizes)]
    if model_type == "swin":
        return [(config.embed_dim * 2**stage, config.patch_size * 2**stage) for stage in range(len(config.depths))]
    raise ValueError(f"{model_type!r} is not a feature-map backbone; supported: {FEATURE_MAP_MODEL_TYPES}.")


def _patch_size(config: PreTrainedConfig) -> int:
    patch_size = config.patch_size
    return patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size


def backbone_stride(config: PreTrainedConfig) -> int:
    """Pixels per student token: the patch size of a ViT, the stride of a feature-map backbone's last stage."""
    if is_feature_map_config(config):
        return feature_map_stages(config)[-1][1]
    return _patch_size(config)


def num_ladder_blocks(config: PreTrainedConfig) -> int:
    """Number of rungs the ladder can read: the transformer blocks of a ViT, the stages of a feature-map backbone."""
    if is_feature_map_config(config):
        return len(feature_map_stages(config))
    return config.num_hidden_layers


def ladder_widths(config: PreTrainedConfig, blocks: list[int]) -> list[int]:
    """Input width of the ladder rung of each 1-based block / stage of `blocks`."""
    if is_feature_map_config(config):
        stages = feature_map_stages(config)
        return [stages[block - 1][0] for block in blocks]
    return [config.hidden_size] * len(blocks)


def output_width(config: PreTrainedConfig) -> int:
    """Width of the student's final tokens (the last rung)."""
    if is_feature_map_config(config):
        return feature_map_stages(config)[-1][0]
    return config.hidden_size


def describe_backbone(config: PreTrainedConfig) -> str:
    """One line for logs and model cards, e.g. `vit (12 blocks, width 768, patch 16)`."""
    if is_feature_map_config(config):
        stages = feature_map_stages(config)
        widths = ", ".join(str(width) for width, _ in stages)
        return f"{config.model_type} ({len(stages)} stages, widths {widths}, stride {stages[-1][1]})"
    return (
        f"{config.model_type} ({config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"patch {_patch_size(config)})"
    )


def check_student_backbone_config(config: PreTrainedConfig, image_size: int, source: str) -> PreTrainedConfig:
    """A copy of `config` set to `image_size`, checked to be a supported student whose stride divides `image_size`."""
    if not is_feature_map_config(config) and not (hasattr(config, "patch_size") and hasattr(config, "hidden_size")):
        raise ValueError(
            f"The student {source!r} ({config.model_type}) is neither a ViT-family encoder (patch_size, hidden_size) "
            f"nor a feature-map backbone ({', '.join(FEATURE_MAP_MODEL_TYPES)})."
        )
    stride = backbone_stride(config)
    if image_size % stride:
        kind = "total stride" if is_feature_map_config(config) else "patch size"
        raise ValueError(
            f"--image_size {image_size} is not divisible by the student's {kind} {stride}: use a multiple of "
            f"{stride}, e.g. {image_size // stride * stride or stride} or {(image_size // stride + 1) * stride}."
        )
    config = copy.deepcopy(config)
    if hasattr(config, "image_size"):
        config.image_size = image_size
    return config


def resize_position_embeddings(
    position_embeddings: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample learned position embeddings `[1, P + h * w, D]` (or `[P + h * w, D]`, e.g. an `nn.Embedding`
    weight) from the patch grid `old_grid` to `new_grid`: the `P` prefix entries (CLS, distillation token) are kept,
    the patch entries are bicubically resampled in float32 (`align_corners=False`, no antialiasing), as transformers'
    `interpolate_pos_encoding` does at run time."""
    squeeze = position_embeddings.dim() == 2
    embeddings = position_embeddings.unsqueeze(0) if squeeze else position_embeddings
    num_prefix = embeddings.shape[1] - old_grid[0] * old_grid[1]
    if num_prefix < 0:
        raise ValueError(
            f"Position embeddings of length {embeddings.shape[1]} do not cover a {old_grid[0]}x{old_grid[1]} grid."
        )
    prefix, patches = embeddings[:, :num_prefix], embeddings[:, num_prefix:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(embeddings.dtype)
    resized = torch.cat([prefix, patches], dim=1)
    return resized[0] if squeeze else resized


def _grid(config: PreTrainedConfig) -> tuple[int, int]:
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    patch = _patch_size(config)
    return height // patch, width // patch


def build_backbone(config: PreTrainedConfig) -> nn.Module:
    """A randomly initialised backbone for `config` (e.g. a `ViTModel` for a `ViTConfig`), always built as a plain
    module: not through `AutoModel.from_config`, which under DeepSpeed ZeRO-3 creates it inside `zero.Init`, already
    partitioned and cast to the training dtype. The student's heads are plain modules; a student half-partitioned at
    construction (backbone in bf16, heads in fp32) makes DeepSpeed's ZeRO-3 optimizer fail on mixed dtypes. A student
    built plain is cast and partitioned as one model by the engine (students are small enough to build whole)."""
    return MODEL_MAPPING[type(config)](config)


def _gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s full state dict, also when DeepSpeed ZeRO-3 loaded it partitioned (each process holding a shard)."""
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    return model.state_dict()


def load_pretrained_backbone(
    source: str, image_size: int, revision: str | None = None
) -> tuple[PreTrainedConfig, dict[str, torch.Tensor]]:
    """The config (set to `image_size`) and weights of the pretrained student backbone `source` (Hub id or folder;
    a classification checkpoint gives its base model). Position embeddings learned for another image size are resized
    to the new grid ([`resize_position_embeddings`]); any other weight that does not fit is an error.

    Returns:
        `(config, state_dict)`: build the student from `config`, then `backbone.load_state_dict(state_dict)`.
    """
    try:
        native_config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the student model {source!r} (a Hub id or a folder with config.json and weights): {error}"
        ) from error
    config = check_student_backbone_config(native_config, image_size, source)
    model = AutoModel.from_pretrained(source, revision=revision, dtype=torch.float32)  # resized in float32
    if model.config.model_type != native_config.model_type:
        raise ValueError(
            f"--student_model {source!r} loads as {type(model).__name__}, not a {native_config.model_type} encoder: "
            "give the checkpoint of the vision encoder itself."
        )
    state_dict = _gathered_state_dict(model)
    with torch.device("meta"):  # the expected shapes at the new size, without allocating or initializing weights
        expected = build_backbone(config).state_dict()
    if expected.keys() != state_dict.keys():
        raise ValueError(f"--student_model {source!r}: its weights do not match its config's model.")
    for key, tensor in state_dict.items():
        if tensor.shape == expected[key].shape:
            continue
        if not key.endswith(("position_embeddings", "position_embedding.weight")):
            raise ValueError(
                f"--student_model {source!r}: weight {key} has shape {tuple(tensor.shape)}, the student at "
                f"--image_size {image_size} needs {tuple(expected[key].shape)}."
            )
        old_grid, new_grid = _grid(native_config), _grid(config)
        state_dict[key] = resize_position_embeddings(tensor, old_grid, new_grid)
        logger.info("Resized %s of %s from a %s to a %s patch grid", key, source, old_grid, new_grid)
        if state_dict[key].shape != expected[key].shape:
            raise ValueError(
                f"--student_model {source!r}: resizing {key} gave {tuple(state_dict[key].shape)}, expected "
                f"{tuple(expected[key].shape)}."
            )
    return config, state_dict


__all__ = [
    "FEATURE_MAP_MODEL_TYPES",
    "backbone_stride",
    "check_student_backbone_config",
    "describe_backbone",
    "feature_map_ladder_features",
    "feature_map_stages",
    "is_feature_map_config",
    "ladder_widths",
    "load_pretrained_backbone",
    "num_ladder_blocks",
    "output_width",
    "resize_position_embeddings",
]
