"""Frozen teachers: any transformers vision backbone, or any plain `torch.nn.Module`, behind one interface.

A teacher receives the *student's* batch of pixels (normalized with the student's mean/std), re-normalizes it to its
own mean/std, resizes it if its grid alignment asks for it, and returns a summary token `[B, D]` and patch tokens
`[B, h * w, D]` on the student's token grid `(h, w)`. One batch of student pixels feeds every teacher.
"""

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput

from .configuration_teacher import GRID_ALIGNMENTS, IMAGENET_MEAN, IMAGENET_STD, SUMMARY_TYPES, TeacherConfig

logger = logging.getLogger(__name__)


class TeacherNotFoundError(ValueError):
    """A teacher id or path that cannot be resolved (not a local folder, not in the Hub cache when offline)."""


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

    Subclasses provide `image_mean`, `image_std`, `patch_size`, `grid_alignment`, `input_size` and
    `_encode(pixels) -> (summary [B, D], patch grid [B, h, w, D])`.
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

    @property
    def summary_dim(self) -> int:
        return self.hidden_size

    @property
    def patch_dim(self) -> int:
        return self.hidden_size


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

    Build one from any Hub id or local checkpoint with [`load_teacher`]; a prepared
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

    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.backbone(pixel_values=pixels, **self._interpolate_kwargs)
        tokens = outputs.last_hidden_state
        height, width = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
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


def _default_summary(backbone_config) -> str:
    # SigLIP-style towers have no CLS token: their summary is the attention-pooled output.
    return "pooler" if backbone_config.model_type.startswith("siglip") else "cls"


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
    if not (hasattr(backbone_config, "patch_size") and hasattr(backbone_config, "hidden_size")):
        raise ValueError(
            f"Teacher {source!r} ({config.model_type}) is not a ViT-family vision backbone (no patch_size / "
            "hidden_size in its config). Wrap other networks in hf_distill.ModuleTeacher."
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
    ([`hf_distill.cli.parse_with_yaml`]); one typed on the command line is explicit."""
    return isinstance(teacher, str) and teacher.startswith(FACTORY_PREFIX)


def _build_from_factory(spec: str) -> nn.Module:
    import importlib

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


__all__ = [
    "ModuleTeacher",
    "TeacherModel",
    "TeacherNotFoundError",
    "TeacherOutput",
    "TeacherPreTrainedModel",
    "freeze_teacher",
    "is_factory_spec",
    "interpolate_tokens",
    "load_teacher",
    "load_teacher_config",
    "renormalize_pixels",
    "resize_pixels",
    "teacher_name",
    "teacher_source",
]
