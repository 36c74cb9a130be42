"""Frozen teachers: any transformers vision backbone, or any plain `torch.nn.Module`, behind one interface (the model
classes; loading them from ids, paths and `py:` factories is in `teacher_loading.py`).

A teacher receives the *student's* batch of pixels (normalized with the student's mean/std), re-normalizes it to its
own mean/std, resizes it if its grid alignment asks for it, and returns a summary token `[B, D]` and patch tokens
`[B, h * w, D]` on the student's token grid `(h, w)`. One batch of student pixels feeds every teacher.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_teacher import GRID_ALIGNMENTS, IMAGENET_MEAN, IMAGENET_STD, TeacherConfig
from .student_backbones import is_feature_map_config


@dataclass
class TeacherOutput(ModelOutput):
    """
    Args:
        summary (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): the teacher's summary token.
        patch_tokens (`torch.FloatTensor` of shape `(batch_size, height * width, hidden_size)`): patch tokens, row
            major, on the requested grid.
    """

    summary: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None


def renormalize_pixels(
    pixel_values: torch.Tensor,
    from_mean: torch.Tensor,
    from_std: torch.Tensor,
    to_mean: torch.Tensor,
    to_std: torch.Tensor,
) -> torch.Tensor:
    """Re-express pixels normalized with `(from_mean, from_std)` in the normalization `(to_mean, to_std)`.

    `pixel_values` is `[B, 3, H, W]`, the statistics are `[3]` tensors on the same device.
    """
    scale = (from_std / to_std).view(1, -1, 1, 1)
    shift = ((from_mean - to_mean) / to_std).view(1, -1, 1, 1)
    return pixel_values * scale + shift


def resize_pixels(pixel_values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a `[B, C, H, W]` batch (antialiased when shrinking); a no-op when the size matches."""
    if tuple(pixel_values.shape[-2:]) == tuple(size):
        return pixel_values
    return F.interpolate(pixel_values, size=size, mode="bicubic", align_corners=False, antialias=True)


def interpolate_tokens(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample a token grid `[B, h, w, D]` to `grid_size`, returned flattened as `[B, h' * w', D]`."""
    if tuple(tokens.shape[1:3]) != tuple(grid_size):
        tokens = tokens.permute(0, 3, 1, 2)
        tokens = F.interpolate(tokens, size=grid_size, mode="bilinear", align_corners=False, antialias=True)
        tokens = tokens.permute(0, 2, 3, 1)
    return tokens.flatten(1, 2)


class TeacherMixin:
    """The alignment logic shared by [`TeacherModel`] and [`ModuleTeacher`].

    Subclasses provide `image_mean`, `image_std`, `patch_size`, `grid_alignment`, `input_size`, the token sizes
    `summary_dim` and `patch_dim`, and `_encode(pixels) -> (summary [B, D], patch grid [B, h, w, D])`.
    """

    def _teacher_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.setdefault("_stats_cache", {})
        if device not in cache:
            cache[device] = (
                torch.tensor(self.image_mean, dtype=torch.float32, device=device),
                torch.tensor(self.image_std, dtype=torch.float32, device=device),
            )
        return cache[device]

    def teacher_input_size(self, height: int, width: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        """Pixel size the teacher runs at for a student image of `height x width` and student grid `grid_size`."""
        p = self.patch_size
        if grid_size is not None and self.grid_alignment == "resize":
            return grid_size[0] * p, grid_size[1] * p
        if self.input_size is not None:
            return self.input_size, self.input_size
        return max(p, height // p * p), max(p, width // p * p)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_mean: torch.Tensor | None = None,
        input_std: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> TeacherOutput:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, height, width)`):
                Pixels normalized with `(input_mean, input_std)` (the student's image processor), or already in the
                teacher's own normalization when these are `None`.
            input_mean, input_std (`torch.Tensor` of shape `(3,)`, *optional*): normalization of `pixel_values`.
            grid_size (`tuple[int, int]`, *optional*): token grid to return (the student's). `None` returns the
                teacher's native grid.
        """
        pixels = pixel_values.float()
        if input_mean is not None and input_std is not None:
            pixels = renormalize_pixels(pixels, input_mean, input_std, *self._teacher_stats(pixels.device))
        size = self.teacher_input_size(pixels.shape[-2], pixels.shape[-1], grid_size)
        pixels = resize_pixels(pixels, size)
        dtype = next(self.parameters()).dtype
        summary, patch_grid = self._encode(pixels.to(dtype))
        out_grid = grid_size if grid_size is not None else tuple(patch_grid.shape[1:3])
        patch_tokens = interpolate_tokens(patch_grid.float(), out_grid)
        return TeacherOutput(summary=summary.float(), patch_tokens=patch_tokens)


class TeacherPreTrainedModel(PreTrainedModel):
    config_class = TeacherConfig
    base_model_prefix = "teacher"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """The wrapper has no weights of its own; the backbone initializes (or loads) its own."""


class TeacherModel(TeacherMixin, TeacherPreTrainedModel):
    """A frozen transformers vision backbone that returns a summary token and patch tokens on a requested grid.

    Build one from any Hub id or local checkpoint with [`~hf_distill.models.teacher_loading.load_teacher`]; a prepared
    teacher is saved with `save_pretrained` and loaded back with `AutoModel.from_pretrained` like any model.
    """

    def __init__(self, config: TeacherConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        self._no_split_modules = list(getattr(self.backbone, "_no_split_modules", None) or [])
        forward_params = inspect.signature(self.backbone.forward).parameters
        self._interpolate_kwargs = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in forward_params else {}
        )
        self.post_init()

    # attributes read by TeacherMixin
    @property
    def image_mean(self):
        return self.config.image_mean

    @property
    def image_std(self):
        return self.config.image_std

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def grid_alignment(self) -> str:
        return self.config.grid_alignment

    @property
    def input_size(self) -> int | None:
        return self.config.image_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    summary_dim = patch_dim = hidden_size  # both tokens have the backbone's hidden size

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.backbone(pixel_values=pixels, **self._interpolate_kwargs)
        tokens = outputs.last_hidden_state
        height, width = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        if is_feature_map_config(self.config.backbone_config):  # ConvNeXt / ResNet: [B, C, h, w]; Swin: [B, h * w, C]
            grid = tokens.permute(0, 2, 3, 1) if tokens.dim() == 4 else tokens.unflatten(1, (height, width))
            if self.config.summary == "cls":
                raise ValueError(f"Teacher {self.config.source!r} has no CLS token; set its summary to 'pooler'.")
            summary = outputs.pooler_output.flatten(1) if self.config.summary == "pooler" else grid.mean(dim=(1, 2))
            return summary, grid
        num_prefix = tokens.shape[1] - height * width
        if num_prefix < 0:
            raise ValueError(
                f"Teacher {self.config.source!r} returned {tokens.shape[1]} tokens for a {height}x{width} patch grid; "
                "only ViT-family backbones with one token per patch are supported."
            )
        patches = tokens[:, num_prefix:]
        if self.config.summary == "cls":
            if num_prefix == 0:
                raise ValueError(
                    f"Teacher {self.config.source!r} has no CLS token (e.g. SigLIP); set its summary to 'pooler' or "
                    "'mean_patch'."
                )
            summary = tokens[:, 0]
        elif self.config.summary == "pooler":
            summary = outputs.pooler_output
            if summary is None:
                raise ValueError(f"Teacher {self.config.source!r} has no pooler output; use summary='cls'.")
        else:
            summary = patches.mean(dim=1)
        return summary, patches.unflatten(1, (height, width))


class ModuleTeacher(TeacherMixin, nn.Module):
    """Plug any `torch.nn.Module` in as a teacher, e.g. a CNN whose feature map gives the patch tokens.

    Args:
        module (`nn.Module`): the network; it is frozen and put in `eval()`.
        image_mean, image_std (`Sequence[float]`): pixel normalization the module expects.
        patch_size (`int`): pixels per output token (the feature map's stride, e.g. 32 for EfficientNet).
        feature_fn (`Callable[[nn.Module, Tensor], Tensor]`, *optional*): returns the feature map `[B, C, h, w]` (or
            tokens `[B, h * w, C]` on a square grid) for normalized pixels. Defaults to `module(pixels)`.
        summary_fn (`Callable[[nn.Module, Tensor, Tensor], Tensor]`, *optional*): returns the summary `[B, C']` from
            `(module, pixels, patch grid [B, h, w, C])`. Defaults to global average pooling of the feature map.
        grid_alignment (`str`, defaults to `"interpolate"`), image_size (`int`, *optional*): as in [`TeacherConfig`].
        name (`str`, *optional*): name used in logs; defaults to the module's class name.
    """

    def __init__(
        self,
        module: nn.Module,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        patch_size: int = 32,
        feature_fn: Callable | None = None,
        summary_fn: Callable | None = None,
        grid_alignment: str = "interpolate",
        image_size: int | None = None,
        name: str | None = None,
    ):
        super().__init__()
        if grid_alignment not in GRID_ALIGNMENTS:
            raise ValueError(f"grid_alignment must be one of {GRID_ALIGNMENTS}, got {grid_alignment!r}.")
        self.module = module
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.patch_size = int(patch_size)
        self.feature_fn = feature_fn
        self.summary_fn = summary_fn
        self.grid_alignment = grid_alignment
        self.input_size = image_size
        self.name = name or type(module).__name__.lower()
        self.source = None  # set by load_teacher for a py:module:function factory
        freeze_teacher(self)
        probe_size = image_size or 2 * self.patch_size
        param = next(self.module.parameters())
        with torch.inference_mode():
            summary, patches = self._encode(
                torch.zeros(1, 3, probe_size, probe_size, device=param.device, dtype=param.dtype)
            )
        self._summary_dim, self._patch_dim = summary.shape[-1], patches.shape[-1]

    @property
    def summary_dim(self) -> int:
        return self._summary_dim

    @property
    def patch_dim(self) -> int:
        return self._patch_dim

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.feature_fn(self.module, pixels) if self.feature_fn is not None else self.module(pixels)
        if features.dim() == 4:
            grid = features.permute(0, 2, 3, 1)
        elif features.dim() == 3:
            side = int(round(features.shape[1] ** 0.5))
            if side * side != features.shape[1]:
                raise ValueError(f"ModuleTeacher got {features.shape[1]} tokens, which is not a square grid.")
            grid = features.unflatten(1, (side, side))
        else:
            raise ValueError(f"ModuleTeacher features must be [B, C, h, w] or [B, N, C], got {tuple(features.shape)}.")
        summary = self.summary_fn(self.module, pixels, grid) if self.summary_fn is not None else grid.mean(dim=(1, 2))
        return summary, grid


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put a teacher in eval mode and stop gradients to all of its parameters."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


__all__ = [
    "ModuleTeacher",
    "TeacherModel",
    "TeacherOutput",
    "TeacherPreTrainedModel",
    "freeze_teacher",
    "interpolate_tokens",
    "renormalize_pixels",
    "resize_pixels",
]
