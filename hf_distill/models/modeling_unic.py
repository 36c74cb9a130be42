"""The UNIC student: an encoder with expendable per-teacher projector heads (UNIC Sec. 3.3-3.4).

Per teacher there are dedicated heads for the CLS token and for the patch tokens. With the ladder of projectors
(UNIC eq. 3) each head is a sum of MLPs, one on the output of every selected block: hidden width `d` for blocks
1..L-1 and `4d` for the last one. The last-layer MLP reads the encoder's *normed* final output (`last_hidden_state`),
so the final LayerNorm is trained (the UNIC code skips it in training and leaves it untrained). Feature-map students
(ConvNeXt, ResNet, Swin) have one rung per stage, of the stage's input width ([`~hf_distill.models.student_backbones`]).

The heads and the teacher-feature standardizers are part of this model (optimized, sharded and checkpointed with it);
[`UnicStudentModel.save_encoder`] writes only the backbone as a stock transformers model.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTImageProcessor
from transformers import initialization as init
from transformers.utils import ModelOutput

from .adaptors import export_adaptors
from .configuration_unic import UnicStudentConfig
from .phi_s import PhiSStandardizer
from .standardization import FeatureStandardizer, build_standardizer
from .student_backbones import (
    build_backbone,
    feature_map_ladder_features,
    is_feature_map_config,
    ladder_widths,
    output_width,
)

# Backbone parameters that never get a gradient from UNIC's objective: frozen so DDP needs no unused-parameter search.
_UNUSED_BACKBONE_PARAMETERS = ("pooler.", "embeddings.mask_token")


@dataclass
class UnicStudentOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            The encoder's normed final output (a feature-map student: its last feature map flattened).
        cls_predictions (`tuple[torch.FloatTensor]`): per teacher (in `config.teacher_names` order), the predicted
            summary token `(batch_size, teacher_dim)`.
        patch_predictions (`tuple[torch.FloatTensor]`): per teacher, the predicted patch tokens
            `(batch_size, num_patches, teacher_dim)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cls_predictions: tuple[torch.FloatTensor, ...] | None = None
    patch_predictions: tuple[torch.FloatTensor, ...] | None = None


class ProjectorMLP(nn.Sequential):
    """Linear(d, hidden) -> GELU -> Linear(hidden, d_teacher)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class LadderProjector(nn.Module):
    """Sum over the selected blocks of one MLP per block (UNIC eq. 3); a single MLP when the ladder is off. `in_dim`
    is the width of every rung's input, or one width per rung (the stages of a feature-map student)."""

    def __init__(self, in_dim: int | list[int], out_dim: int, num_rungs: int, ladder_hidden: int, last_hidden: int):
        super().__init__()
        hidden = [ladder_hidden] * (num_rungs - 1) + [last_hidden]
        in_dims = [in_dim] * num_rungs if isinstance(in_dim, int) else list(in_dim)
        self.rungs = nn.ModuleList(ProjectorMLP(d, h, out_dim) for d, h in zip(in_dims, hidden))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        output = self.rungs[0](features[0])
        for rung, feature in zip(self.rungs[1:], features[1:]):
            output = output + rung(feature)
        return output


def _second_layers(rungs: list[list[ProjectorMLP]], out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-layer weights of `rungs[r][t]` stacked as `[R, T, H, out_dim]` and their biases summed over the rungs
    `[T, out_dim]`. Output widths are zero-padded to `out_dim`, which leaves each teacher's own columns exact."""

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return F.pad(tensor, (0, out_dim - tensor.shape[-1]))

    weight = torch.stack([torch.stack([pad(mlp[2].weight.t()) for mlp in rung]) for rung in rungs])
    bias = torch.stack([torch.stack([pad(mlp[2].bias) for mlp in rung]) for rung in rungs]).sum(dim=0)
    return weight, bias


def _grouped_rungs(rungs: list[list[ProjectorMLP]], features: list[torch.Tensor], out_dim: int) -> torch.Tensor:
    """Sum over rungs of every teacher's MLP, for rungs of equal hidden width: per rung ONE matmul for the first
    layers of all teachers (weights concatenated), then per teacher ONE matmul for its second layers summed over the
    rungs. `features[r]` is `[M, d]`; returns `[M, T, out_dim]`."""
    num_teachers, num_tokens = len(rungs[0]), features[0].shape[0]
    # per rung [M, T * H] -> one tensor [T, M, R, H] (a single copy): each teacher's rungs side by side, so its
    # second layers and their sum over the rungs are one matmul with the stacked weights [R * H, out_dim]
    hidden = torch.stack(
        [
            F.linear(feature, torch.cat([mlp[0].weight for mlp in rung]), torch.cat([mlp[0].bias for mlp in rung]))
            .view(num_tokens, num_teachers, -1)
            .transpose(0, 1)
            for rung, feature in zip(rungs, features)
        ],
        dim=2,
    )
    hidden = F.gelu(hidden.view(num_teachers, num_tokens, -1))
    weight, bias = _second_layers(rungs, out_dim)  # [R, T, H, O], [T, O]
    weight = weight.transpose(0, 1).reshape(num_teachers, -1, out_dim)
    # unbind, not indexing: its backward stacks the gradients instead of filling a zero tensor per teacher
    return torch.stack([torch.addmm(*group) for group in zip(bias.unbind(), hidden.unbind(), weight.unbind())], dim=1)


def grouped_ladder_forward(projectors: list[LadderProjector], features: list[torch.Tensor]) -> list[torch.Tensor]:
    """All teachers' ladder projectors at once, with grouped matrix multiplies instead of `2 x blocks x teachers`
    small MLP calls. Same parameters and same numbers as calling each [`LadderProjector`].

    The intermediate rungs (equal hidden width) form one group and the last rung (wider hidden layer) another; each
    group costs one matmul per rung plus one per teacher (instead of two per rung and teacher).

    Args:
        projectors: one [`LadderProjector`] per teacher, built with the same rungs.
        features: per rung, the student tokens `[..., d]` (same shape for every rung).

    Returns:
        Per teacher, the prediction `[..., out_dim_t]`.
    """
    out_dims = [projector.rungs[-1][2].out_features for projector in projectors]
    out_dim = max(out_dims)
    lead = features[-1].shape[:-1]
    flat = [feature.reshape(-1, feature.shape[-1]) for feature in features]
    rungs = [[projector.rungs[r] for projector in projectors] for r in range(len(features))]
    output = _grouped_rungs(rungs[-1:], flat[-1:], out_dim)
    if len(rungs) > 1:
        output = output + _grouped_rungs(rungs[:-1], flat[:-1], out_dim)
    return [output[:, t, :dim].reshape(*lead, dim) for t, dim in enumerate(out_dims)]


class UnicStudentPreTrainedModel(PreTrainedModel):
    config_class = UnicStudentConfig
    base_model_prefix = "student"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    def _init_weights(self, module):
        # The backbone is a PreTrainedModel and initializes itself; this covers the heads and standardizers.
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, FeatureStandardizer):
            init.zeros_(module.mean)
            init.ones_(module.std)
        elif isinstance(module, PhiSStandardizer):
            for name in ("stat_count", "stat_mean", "stat_scatter", "num_updates", "frozen", "mean"):
                init.zeros_(getattr(module, name))
            init.eye_(module.transform)
            init.ones_(module.scale)


class UnicStudentModel(UnicStudentPreTrainedModel):
    """Student encoder + per-teacher CLS / patch projector heads + per-teacher feature standardizers."""

    def __init__(self, config: UnicStudentConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        for name, parameter in self.backbone.named_parameters():
            if name.startswith(_UNUSED_BACKBONE_PARAMETERS):
                parameter.requires_grad_(False)
        self._no_split_modules = list(getattr(self.backbone, "_no_split_modules", None) or [])

        width = output_width(config.backbone_config)
        widths = ladder_widths(config.backbone_config, config.ladder_block_indices)
        num_rungs = len(widths)
        ladder_hidden = int(config.ladder_hidden_ratio * width)
        last_hidden = int(config.head_hidden_ratio * width)
        self.cls_heads = nn.ModuleDict()
        self.patch_heads = nn.ModuleDict()
        self.cls_standardizers = nn.ModuleDict()
        self.patch_standardizers = nn.ModuleDict()
        mode, warmup = config.standardization, config.standardization_warmup_steps
        for teacher in config.teachers:
            name, summary_dim, patch_dim = teacher["name"], teacher["summary_dim"], teacher["patch_dim"]
            # the heads predict the standardized targets, whose width may differ from the teacher's (PHI-S padding)
            self.cls_standardizers[name] = build_standardizer(summary_dim, mode, warmup)
            self.patch_standardizers[name] = build_standardizer(patch_dim, mode, warmup)
            summary_out, patch_out = self.cls_standardizers[name].out_dim, self.patch_standardizers[name].out_dim
            self.cls_heads[name] = LadderProjector(widths, summary_out, num_rungs, ladder_hidden, last_hidden)
            self.patch_heads[name] = LadderProjector(widths, patch_out, num_rungs, ladder_hidden, last_hidden)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """None: the student has no token embedding to carve out as its own FSDP2 unit. Accelerate's FSDP2 preparation
        shards `get_input_embeddings()` separately after the auto-wrap policy; the backbone's patch embedding sits
        inside a module that policy already shards (`ViTEmbeddings` is in `_no_split_modules`), and sharding its
        parameters a second time fails inside torch's device mesh ("Invariant encountered: value was None")."""
        return None

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The student's token grid for an input of `height x width` pixels."""
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the student's patch size {patch}; use a multiple "
                f"of {patch}, e.g. {height // patch * patch} or {(height // patch + 1) * patch}."
            )
        return height // patch, width // patch

    def forward(self, pixel_values: torch.Tensor, return_predictions: bool = True) -> UnicStudentOutput:
        if not return_predictions:
            if is_feature_map_config(self.config.backbone_config):  # the last feature map, flattened
                return UnicStudentOutput(last_hidden_state=self.ladder_features(pixel_values)[0])
            self.grid_size(*pixel_values.shape[-2:])
            return UnicStudentOutput(last_hidden_state=self.backbone(pixel_values=pixel_values).last_hidden_state)
        last_hidden_state, cls_features, patch_features = self.ladder_features(pixel_values)
        return UnicStudentOutput(
            last_hidden_state=last_hidden_state,
            cls_predictions=self.project(self.cls_heads, cls_features),
            patch_predictions=self.project(self.patch_heads, patch_features),
        )

    def ladder_features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """Run the encoder; return its normed output and, per selected block, the CLS `[B, d]` and patch `[B, N, d]`
        tokens that feed the heads (the last block is read after the final LayerNorm). A feature-map student returns
        its last feature map flattened and per stage its pooled vector and map ([`feature_map_ladder_features`])."""
        height, width = self.grid_size(*pixel_values.shape[-2:])
        if is_feature_map_config(self.config.backbone_config):
            blocks = self.config.ladder_block_indices
            return feature_map_ladder_features(self.backbone, pixel_values, blocks, (height, width))
        outputs = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
        # hidden_states = (embeddings, block 1, ..., block L); block L is replaced by the normed final output.
        num_layers = len(outputs.hidden_states) - 1
        blocks = [
            outputs.last_hidden_state if layer == num_layers else outputs.hidden_states[layer]
            for layer in self.config.ladder_block_indices
        ]
        num_prefix = blocks[0].shape[1] - height * width
        cls_features = [block[:, 0] for block in blocks]
        patch_features = [block[:, num_prefix:] for block in blocks]
        return outputs.last_hidden_state, cls_features, patch_features

    def project(self, heads: nn.ModuleDict, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every teacher's prediction from the ladder features: grouped matmuls ([`grouped_ladder_forward`]) or one
        [`LadderProjector`] call per teacher (same numbers); see `config.grouped_heads`."""
        projectors = [heads[name] for name in self.config.teacher_names]
        grouped = self.config.grouped_heads
        if grouped is None:
            grouped = features[0].is_cuda
        if grouped:
            return tuple(grouped_ladder_forward(projectors, features))
        return tuple(projector(features) for projector in projectors)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Save the full student (heads and statistics). Keys keep their live names (`save_original_format=False`):
        `Trainer` resumes with a raw `load_state_dict`, which does not undo transformers' legacy key renaming."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def image_processor(self, image_size: int) -> ViTImageProcessor:
        """The image processor of the exported encoder: resize to `image_size`, student mean/std."""
        return ViTImageProcessor(
            do_resize=True,
            size={"height": image_size, "width": image_size},
            resample=3,  # bicubic, as in training
            image_mean=self.config.image_mean,
            image_std=self.config.image_std,
        )

    def save_encoder(self, output_dir: str | os.PathLike, image_size: int, **kwargs) -> None:
        """Write ONLY the student encoder, as its stock transformers class, plus its image processor.

        `AutoModel.from_pretrained(output_dir)` then returns e.g. a `ViTModel`, without `trust_remote_code` and
        without hf_distill installed. Projector heads and standardization statistics are not exported.
        """
        self.backbone.save_pretrained(output_dir, **kwargs)
        self.image_processor(image_size).save_pretrained(output_dir)

    def export_adaptors(
        self,
        output_dir: str | os.PathLike,
        teachers: list[str] | None = None,
        image_size: int | None = None,
        state_dict: dict | None = None,
        **kwargs,
    ) -> str:
        """Write the encoder WITH its per-teacher heads ("adaptors"), the standardization folded into their last
        layers so that each adaptor outputs its teacher's own features; see
        [`~hf_distill.models.adaptors.export_adaptors`]. Loads with `AutoModel.from_pretrained(output_dir,
        trust_remote_code=True)` without hf_distill."""
        return export_adaptors(self, output_dir, teachers, image_size, state_dict=state_dict, **kwargs)


__all__ = [
    "LadderProjector",
    "grouped_ladder_forward",
    "ProjectorMLP",
    "UnicStudentModel",
    "UnicStudentOutput",
    "UnicStudentPreTrainedModel",
]
