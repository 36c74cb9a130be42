"""Configuration of the UNIC student: a ViT-family backbone plus expendable per-teacher projector heads."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from .configuration_utils import check_named_entries, normalization_lists
from .standardization import STANDARDIZATION_MODES


class UnicStudentConfig(PreTrainedConfig):
    r"""
    Configuration of [`UnicStudentModel`].

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            Config of the student encoder, any transformers ViT-family config (ViT, DINOv2, ...). This is what gets
            exported: the heads below are expendable.
        teachers (`list[dict]`):
            One entry per teacher: `{"name": str, "summary_dim": int, "patch_dim": int}`.
        use_ladder (`bool`, defaults to `True`):
            Ladder of projectors (UNIC eq. 3): the prediction for each teacher is the sum of one MLP per selected
            block. When `False` only the last-layer heads are used.
        ladder_layers (`list[int]`, *optional*):
            1-based indices of the blocks that feed the ladder; the last block is always included. `None`: all blocks.
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
            statistics in training, EMA at eval), both with the cosine EMA schedule 1.0 -> 0.001, or `"none"`.
        image_mean, image_std (`list[float]`):
            Pixel normalization of the student (saved with the exported image processor).
        initializer_range (`float`, defaults to 0.02):
            Std of the truncated normal initialization of the heads.
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
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.teachers = check_named_entries(self.teachers, "Teacher", required=("summary_dim", "patch_dim"))
        if self.standardization not in STANDARDIZATION_MODES:
            raise ValueError(f"standardization must be one of {STANDARDIZATION_MODES}, got {self.standardization!r}.")
        if self.backbone_config is not None and self.ladder_layers is not None:
            num_layers = self.backbone_config.num_hidden_layers
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
        patch_size = self.backbone_config.patch_size
        return patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size

    @property
    def ladder_block_indices(self) -> list[int]:
        """1-based blocks whose outputs feed the heads; the last block always does."""
        num_layers = self.backbone_config.num_hidden_layers
        if not self.use_ladder:
            return [num_layers]
        layers = range(1, num_layers + 1) if self.ladder_layers is None else self.ladder_layers
        return sorted(set(layers) | {num_layers})
