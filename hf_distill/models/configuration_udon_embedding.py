"""Configuration of the exported UDON universal embedding model (backbone + 64-d head + L2 norm).

This file is copied next to the exported weights and loaded with `trust_remote_code=True`: it imports only
transformers, never hf_distill.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Backbones whose `last_hidden_state[:, 0]` is the CLS token after the final norm.
CLS_TOKEN_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "vit_msn")
# Backbones whose last_hidden_state is pre-norm: the normed CLS token is `pooler_output` (CLIP: `post_layernorm`
# of the CLS token, before the visual projection, which UDON does not use).
POOLER_MODEL_TYPES = ("clip_vision_model",)


def check_backbone_config(backbone_config: PreTrainedConfig | None) -> None:
    """Raise a clear error for a backbone whose normed CLS token this model cannot read."""
    if backbone_config is None:
        return
    model_type = backbone_config.model_type
    if model_type not in CLS_TOKEN_MODEL_TYPES + POOLER_MODEL_TYPES:
        raise ValueError(
            f"Unsupported backbone model_type {model_type!r}: UDON reads the CLS token after the final norm, known "
            f"for {CLS_TOKEN_MODEL_TYPES + POOLER_MODEL_TYPES} (a CLIP config is replaced by its vision config)."
        )


class UdonEmbeddingConfig(PreTrainedConfig):
    r"""
    Configuration of the exported universal embedding model ([`UdonEmbeddingModel`]).

    Args:
        backbone_config (`dict` or `PreTrainedConfig`): the vision backbone (ViT-family or CLIP vision tower).
        embedding_dim (`int`, defaults to 64): width of the universal embedding.
        image_mean, image_std (`list[float]`, *optional*): pixel normalization used in training (informative; the
            saved image processor applies it).
    """

    model_type = "hf_distill_udon_embedding"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    embedding_dim: int = 64
    image_mean: list[float] | None = None
    image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_backbone_config(self.backbone_config)

    @property
    def uses_pooler(self) -> bool:
        """Whether the normed CLS token is the backbone's `pooler_output` rather than `last_hidden_state[:, 0]`."""
        return self.backbone_config.model_type in POOLER_MODEL_TYPES
