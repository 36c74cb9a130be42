"""Configuration of the UNIC student: a ViT-family or feature-map backbone plus expendable per-teacher heads."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from .configuration_utils import check_named_entries, normalization_lists
from .standardization import STANDARDIZATION_MODES
from .student_backbones import backbone_stride, num_ladder_blocks


class UnicStudentConfig(PreTrainedConfig):
    r"""
    Configuration of [`UnicStudentModel`].

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            Config of the student encoder: a transformers ViT-family config (ViT, DINOv2, ...) or a feature-map
            backbone (ConvNeXt, ResNet, Swin; see [`~hf_distill.models.student_backbones`]). This is what gets
            exported: the heads below are expendable.
        teachers (`list[dict]`):
            One entry per teacher: `{"name": str, "summary_dim": int, "patch_dim": int}`.
        use_ladder (`bool`, defaults to `True`):
            Ladder of projectors (UNIC eq. 3): the prediction for each teacher is the sum of one MLP per selected
            block. When `False` only the last-layer heads are used.
        ladder_layers (`list[int]`, *optional*):
            1-based indices of the blocks (stages of a feature-map backbone) that feed the ladder; the last one is
            always included. `None`: all of them.
        head_hidden_ratio (`float`, defaults to 4.0):
            Hidden width of the last-layer heads, as a multiple of the student width (UNIC: 4d).
        ladder_hidden_ratio (`float`, defaults to 1.0):
            Hidden width of the intermediate ladder heads (UNIC: d).
        grouped_heads (`bool`, *optional*):
            Compute the heads of all teachers with grouped matrix multiplies (per group of rungs, one matmul per rung
            plus one per teacher) instead of two small matmuls per block per teacher. Same parameters, same numbers.
            `None` (default): grouped on GPU, where it saves kernel launches; per-teacher calls on CPU, where the
            per-rung matmuls are already large and the grouped path's bigger intermediates were measured slower
            (`make bench`).
        standardization (`str`, defaults to `"unic"`):
            Teacher feature standardization: `"unic"` (previous EMA statistics) or `"dune"` (current global batch
            statistics in training, EMA at eval), both with the cosine EMA schedule 1.0 -> 0.001, `"phi-s"` (PHI-S:
            PCA and Hadamard rotations and one isotropic scale, estimated during a warm-up then frozen; see
            [`~hf_distill.models.phi_s.PhiSStandardizer`]), or `"none"`.
        standardization_warmup_steps (`int`, defaults to 100):
            `"phi-s"` only: training batches whose global statistics are accumulated before the transform is
            computed and frozen (each micro-batch counts under gradient accumulation).
        image_mean, image_std (`list[float]`):
            Pixel normalization of the student (saved with the exported image processor).
        initializer_range (`float`, defaults to 0.02):
            Std of the truncated normal initialization of the heads.
        backbone_source (`str`, *optional*), backbone_revision (`str`, *optional*):
            Where the backbone's initial weights came from (`--student_model` and its revision); `None`: random
            initialization. Recorded for the model card and the run manifest; loading weights is the recipe's job.
    """

    model_type = "hf_distill_unic_student"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    teachers: list[dict] | None = None
    use_ladder: bool = True
    ladder_layers: list[int] | None = None
    head_hidden_ratio: float = 4.0
    ladder_hidden_ratio: float = 1.0
    grouped_heads: bool | None = None
    standardization: str = "unic"
    standardization_warmup_steps: int = 100
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    initializer_range: float = 0.02
    backbone_source: str | None = None
    backbone_revision: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.teachers = check_named_entries(self.teachers, "Teacher", required=("summary_dim", "patch_dim"))
        if self.standardization not in STANDARDIZATION_MODES:
            raise ValueError(f"standardization must be one of {STANDARDIZATION_MODES}, got {self.standardization!r}.")
        if self.standardization_warmup_steps < 1:
            raise ValueError(
                f"standardization_warmup_steps must be >= 1 (batches that estimate the PHI-S statistics), got "
                f"{self.standardization_warmup_steps}."
            )
        if self.backbone_config is not None and self.ladder_layers is not None:
            num_layers = num_ladder_blocks(self.backbone_config)
            bad = [layer for layer in self.ladder_layers if not 1 <= layer <= num_layers]
            if bad:
                raise ValueError(
                    f"ladder_layers {bad} are outside the student's blocks 1..{num_layers} (1-based block indices)."
                )
        self.image_mean, self.image_std = normalization_lists(self.image_mean, self.image_std)

    @property
    def teacher_names(self) -> list[str]:
        return [teacher["name"] for teacher in self.teachers]

    @property
    def patch_size(self) -> int:
        """Pixels per student token: the ViT patch size, or the last stage's stride of a feature-map backbone."""
        return backbone_stride(self.backbone_config)

    @property
    def ladder_block_indices(self) -> list[int]:
        """1-based blocks (stages) whose outputs feed the heads; the last one always does."""
        num_layers = num_ladder_blocks(self.backbone_config)
        if not self.use_ladder:
            return [num_layers]
        layers = range(1, num_layers + 1) if self.ladder_layers is None else self.ladder_layers
        return sorted(set(layers) | {num_layers})
