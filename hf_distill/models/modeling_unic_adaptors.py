"""The exported UNIC student with its per-teacher adaptors: `AutoModel.from_pretrained(dir, trust_remote_code=True)`
returns, per teacher, the student's estimate of that teacher's summary token and patch tokens, in the teacher's own
feature space (the training-time standardization is folded into the last layers of the heads):

    outputs = model(pixel_values)
    outputs.adaptors["dinov2-base"].summary       # (batch_size, teacher_dim)
    outputs.adaptors["dinov2-base"].patch_tokens  # (batch_size, num_patches, teacher_dim), on the student's grid

The encoder is a ViT-family model (the ladder reads its blocks' hidden states) or a feature-map backbone (ConvNeXt,
ResNet, Swin: the ladder reads its stages).

This file is copied next to the exported weights: it imports only torch and transformers, never hf_distill. It
therefore repeats, on purpose, the pieces of hf_distill's student it needs (the ladder MLPs, how the ladder reads a
ViT's blocks), which must compute exactly what the training-time student computes; the training-time student
imports `feature_map_ladder_features` from here rather than keeping a copy. A change to the repeated pieces in
`modeling_unic.py` (or to the `PreTrainedModel` attributes shared with `modeling_udon_embedding.py`) must be made here
too.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_unic_adaptors import UnicAdaptorConfig


@dataclass
class AdaptorOutput(ModelOutput):
    """
    Args:
        summary (`torch.FloatTensor` of shape `(batch_size, summary_dim)`): the teacher's summary token, estimated.
        patch_tokens (`torch.FloatTensor` of shape `(batch_size, num_patches, patch_dim)`): the teacher's patch
            tokens on the student's token grid, estimated.
    """

    summary: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None


@dataclass
class UnicAdaptorModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the encoder's
            normed final output (a feature-map backbone: its last feature map flattened).
        adaptors (`dict[str, AdaptorOutput]`): per adaptor (teacher name), its [`AdaptorOutput`].
    """

    last_hidden_state: torch.FloatTensor | None = None
    adaptors: dict[str, AdaptorOutput] | None = None


class AdaptorMLP(nn.Sequential):
    """Linear(d, hidden) -> GELU -> Linear(hidden, d_teacher)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class LadderAdaptor(nn.Module):
    """Sum over the selected encoder blocks (stages) of one MLP per block, of input widths `in_sizes`."""

    def __init__(self, in_sizes: list[int], out_dim: int, hidden_sizes: list[int]):
        super().__init__()
        self.rungs = nn.ModuleList(AdaptorMLP(d, hidden, out_dim) for d, hidden in zip(in_sizes, hidden_sizes))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        output = self.rungs[0](features[0])
        for rung, feature in zip(self.rungs[1:], features[1:]):
            output = output + rung(feature)
        return output


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def feature_map_ladder_features(
    backbone: nn.Module, pixel_values: torch.Tensor, blocks: list[int], grid: tuple[int, int]
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run a feature-map backbone (ConvNeXt, ResNet, Swin); return its final patch tokens `[B, h * w, C]` and, per
    1-based stage of `blocks`, the summary `[B, C_s]` and patch tokens `[B, h * w, C_s]` the adaptors read on the
    final grid `grid = (h, w)`: the last stage gives `pooler_output` and its `last_hidden_state` flattened, an earlier
    stage the mean of its map and its map average-pooled to `grid` (Swin: the map before the stage's patch merging).

    The training-time student (`hf_distill.models.UnicStudentModel`) uses this very function: a feature-map student's
    adaptors read the features its heads were trained on.
    """
    swin = backbone.config.model_type == "swin"
    num_stages = len(backbone.config.depths)
    intermediate = [block for block in blocks if block < num_stages]
    kwargs = {}
    if intermediate:
        kwargs["output_hidden_states"] = True
        if swin:
            kwargs["output_hidden_states_before_downsampling"] = True
    outputs = backbone(pixel_values=pixel_values, **kwargs)
    last = outputs.last_hidden_state
    patches = last if last.dim() == 3 else last.flatten(2).transpose(1, 2)  # Swin: already [B, h * w, C]
    summary = outputs.pooler_output.flatten(1)
    maps = (outputs.reshaped_hidden_states if swin else outputs.hidden_states) if intermediate else None
    summary_features, patch_features = [], []
    for block in blocks:
        if block == num_stages:
            summary_features.append(summary)
            patch_features.append(patches)
        else:
            feature_map = maps[block]  # maps[0] is the stem
            summary_features.append(feature_map.mean(dim=(-2, -1)))
            patch_features.append(F.adaptive_avg_pool2d(feature_map, grid).flatten(2).transpose(1, 2))
    return patches, summary_features, patch_features


@functools.cache
def _interpolates(backbone_class: type) -> bool:
    """Whether the backbone needs `interpolate_pos_encoding=True` for other image sizes (ViT, DeiT; DINOv2 always
    interpolates and has no such argument)."""
    return "interpolate_pos_encoding" in inspect.signature(backbone_class.forward).parameters


class UnicAdaptorModel(PreTrainedModel):
    """Student encoder + one summary adaptor and one patch adaptor per teacher."""

    config_class = UnicAdaptorConfig
    base_model_prefix = "unic"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: UnicAdaptorConfig):
        super().__init__(config)
        config.check_adaptors()
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.summary_heads = nn.ModuleDict()
        self.patch_heads = nn.ModuleDict()
        teachers = {teacher["name"]: teacher for teacher in config.teachers}
        for name in config.adaptor_names:
            teacher = teachers[name]
            for heads, dim in ((self.summary_heads, teacher["summary_dim"]), (self.patch_heads, teacher["patch_dim"])):
                heads[name] = LadderAdaptor(config.rung_input_sizes, dim, config.rung_hidden_sizes)
        # the weights of adaptors left out at load time are in the checkpoint: expected, not worth a warning
        left_out = [name for name in teachers if name not in config.adaptor_names]
        self._keys_to_ignore_on_load_unexpected = [
            rf"^(summary|patch)_heads\.{name.replace('.', '[.]')}\." for name in left_out
        ]
        self.post_init()

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the student's patch size (stride) {patch}."
            )
        return height // patch, width // patch

    def forward(self, pixel_values: torch.Tensor, adaptors: list[str] | None = None, **kwargs):
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images prepared by the
                image processor saved with the model.
            adaptors (`list[str]`, *optional*): the adaptors to run (default: all that were loaded).
        """
        names = list(self.summary_heads) if adaptors is None else list(adaptors)
        missing = [name for name in names if name not in self.summary_heads]
        if missing:
            raise ValueError(f"Adaptors {missing} are not loaded; loaded: {list(self.summary_heads)}.")
        grid = self.grid_size(*pixel_values.shape[-2:])
        if self.config.feature_map_backbone:
            ladder = feature_map_ladder_features(self.backbone, pixel_values, self.config.ladder_layers, grid)
        else:
            ladder = self.hidden_state_ladder_features(pixel_values, grid)
        last_hidden_state, summary_features, patch_features = ladder
        return UnicAdaptorModelOutput(
            last_hidden_state=last_hidden_state,
            adaptors={
                name: AdaptorOutput(
                    summary=self.summary_heads[name](summary_features),
                    patch_tokens=self.patch_heads[name](patch_features),
                )
                for name in names
            },
        )

    def hidden_state_ladder_features(
        self, pixel_values: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run a ViT-family encoder; return its normed output and, per block of `ladder_layers`, its summary (CLS)
        token and patch tokens."""
        options = {}
        native = getattr(self.config.backbone_config, "image_size", None)
        if (
            native is not None
            and tuple(pixel_values.shape[-2:]) != _pair(native)
            and _interpolates(type(self.backbone))
        ):
            options["interpolate_pos_encoding"] = True
        outputs = self.backbone(pixel_values=pixel_values, output_hidden_states=True, **options)
        # hidden_states = (embeddings, block 1, ..., block L); block L is read after the final norm
        num_layers = len(outputs.hidden_states) - 1
        blocks = [
            outputs.last_hidden_state if layer == num_layers else outputs.hidden_states[layer]
            for layer in self.config.ladder_layers
        ]
        num_prefix = blocks[0].shape[1] - grid[0] * grid[1]
        summary_features = [block[:, 0] for block in blocks]
        patch_features = [block[:, num_prefix:] for block in blocks]
        return outputs.last_hidden_state, summary_features, patch_features


__all__ = ["AdaptorOutput", "UnicAdaptorModel", "UnicAdaptorModelOutput"]
