"""Configuration of a frozen teacher: any transformers vision backbone plus how to read and feed it."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .student_backbones import backbone_stride, output_width

SUMMARY_TYPES = ("cls", "pooler", "mean_patch")
GRID_ALIGNMENTS = ("resize", "interpolate")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherConfig(PreTrainedConfig):
    r"""
    Configuration of [`TeacherModel`], a frozen wrapper around a transformers vision backbone that returns one summary
    token and the patch tokens of an image.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            Config of the wrapped vision backbone (ViT, DeiT, DINOv2 with or without registers, CLIP / SigLIP vision
            towers, ...; or a feature-map backbone, ConvNeXt / ResNet / Swin, whose last feature map gives the patch
            tokens and `pooler_output` the summary). For a CLIP- or SigLIP-style checkpoint this is its
            `vision_config`.
        source (`str`, *optional*):
            Hub id or local path the backbone weights were taken from.
        revision (`str`, *optional*):
            Revision (branch, tag or commit) of `source` when known.
        summary (`str`, defaults to `"cls"`):
            Definition of the summary token: `"cls"` (first token of the last hidden state), `"pooler"` (the backbone's
            `pooler_output`, e.g. CLIP's post-layernorm CLS or SigLIP's attention pooling) or `"mean_patch"` (mean of
            the patch tokens). Register tokens and other prefix tokens are never used as patches.
        image_mean (`list[float]`), image_std (`list[float]`):
            Pixel normalization the backbone was trained with (from its image processor).
        grid_alignment (`str`, defaults to `"resize"`):
            How the teacher's token grid is matched to the student's: `"resize"` resizes the image so that the teacher
            produces exactly the student's grid (student grid x teacher patch size pixels); `"interpolate"` runs the
            teacher at `image_size` (or the student's resolution) and bilinearly interpolates its patch tokens to the
            student's grid.
        image_size (`int`, *optional*):
            Input resolution in `"interpolate"` mode. `None` uses the student's resolution (rounded down to a multiple
            of the teacher's patch size).
    """

    model_type = "hf_distill_teacher"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    source: str | None = None
    revision: str | None = None
    summary: str = "cls"
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    grid_alignment: str = "resize"
    image_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.summary not in SUMMARY_TYPES:
            raise ValueError(f"TeacherConfig.summary must be one of {SUMMARY_TYPES}, got {self.summary!r}.")
        if self.grid_alignment not in GRID_ALIGNMENTS:
            raise ValueError(
                f"TeacherConfig.grid_alignment must be one of {GRID_ALIGNMENTS}, got {self.grid_alignment!r}."
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("TeacherConfig.image_mean and image_std need one value per RGB channel.")
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]
        super().__post_init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the summary and patch tokens."""
        return output_width(self.backbone_config)

    @property
    def patch_size(self) -> int:
        """Pixels per patch token (a feature-map backbone's last-stage stride)."""
        return backbone_stride(self.backbone_config)
