"""Configuration of the exported UNIC student WITH its per-teacher adaptors (encoder + heads mapping into each
teacher's own feature space).

This file is copied next to the exported weights and loaded with `trust_remote_code=True`: it imports only
transformers, never hf_distill.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class UnicAdaptorConfig(PreTrainedConfig):
    r"""
    Configuration of [`UnicAdaptorModel`].

    Args:
        backbone_config (`dict` or `PreTrainedConfig`): the student encoder: a ViT-family transformers config, or a
            feature-map backbone (ConvNeXt, ResNet, Swin; see `feature_map_backbone`).
        teachers (`list[dict]`): every exported adaptor, in order: `{"name": str, "summary_dim": int, "patch_dim":
            int}` (the teacher's own feature widths), plus informative keys (`standardization`, `source`).
        adaptors (`list[str]`, *optional*): the adaptors to build and run; `None` (default): all of `teachers`. Set it
            at load time to load only some: `AutoModel.from_pretrained(path, trust_remote_code=True,
            adaptors=["dinov2-base"])`.
        ladder_layers (`list[int]`): 1-based encoder blocks (stages of a feature-map backbone) whose outputs feed the
            heads (the last block is read after the final norm); one MLP per block, summed.
        rung_input_sizes (`list[int]`): input width of each of those MLPs (the encoder's width, or each stage's).
        rung_hidden_sizes (`list[int]`): hidden width of each of those MLPs.
        feature_map_backbone (`bool`, defaults to `False`): the encoder is a feature-map backbone: its last stage's
            map flattened gives the patch tokens and its `pooler_output` the summary; an earlier stage's rung reads
            its map average-pooled to the last stage's grid (patch tokens) and its mean (summary).
        patch_size (`int`): pixels per student token: the ViT patch size, or the last stage's stride of a
            feature-map backbone.
        image_mean, image_std (`list[float]`): pixel normalization of the student (the saved image processor
            applies it).
    """

    model_type = "hf_distill_unic_adaptors"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    teachers: list[dict] | None = None
    adaptors: list[str] | None = None
    ladder_layers: list[int] | None = None
    rung_input_sizes: list[int] | None = None
    rung_hidden_sizes: list[int] | None = None
    feature_map_backbone: bool = False
    patch_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.teachers = [dict(teacher) for teacher in (self.teachers or [])]
        self.check_adaptors()
        if not len(self.ladder_layers or []) == len(self.rung_input_sizes or []) == len(self.rung_hidden_sizes or []):
            raise ValueError(
                "ladder_layers, rung_input_sizes and rung_hidden_sizes must have one entry per block feeding the heads."
            )

    def check_adaptors(self) -> None:
        """Raise a clear error for an `adaptors` selection naming an adaptor this model does not have (also run by
        the model: `from_pretrained` sets config keyword arguments after the config is built)."""
        if self.adaptors is None:
            return
        self.adaptors = [self.adaptors] if isinstance(self.adaptors, str) else list(self.adaptors)
        names = [teacher["name"] for teacher in self.teachers]
        unknown = [name for name in self.adaptors if name not in names]
        if unknown:
            raise ValueError(f"Unknown adaptors {unknown}: this model has adaptors for {names}.")

    @property
    def adaptor_names(self) -> list[str]:
        """The adaptors built by the model: `adaptors`, else every teacher."""
        names = [teacher["name"] for teacher in self.teachers]
        return names if self.adaptors is None else [name for name in names if name in self.adaptors]
