"""Configuration of the exported UDON universal embedding model (backbone + 64-d head + L2 norm).

This file is copied next to the exported weights and loaded with `trust_remote_code=True`: it imports only
transformers, never hf_distill.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Vision towers whose CLS token is normed only in `pooler_output` (their last_hidden_state is pre-norm).
POOLER_MODEL_TYPES = ("clip_vision_model",)


class UdonEmbeddingConfig(PreTrainedConfig):
    r"""
    Args:
        backbone_config (`dict` or `PreTrainedConfig`): the vision backbone (ViT-family or CLIP vision tower).
        embedding_dim (`int`, defaults to 64): width of the universal embedding.
        image_mean, image_std (`list[float]`): pixel normalization used in training.
    """

    model_type = "hf_distill_udon_embedding"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    embedding_dim: int = 64

    @property
    def uses_pooler(self) -> bool:
        return self.backbone_config.model_type in POOLER_MODEL_TYPES
