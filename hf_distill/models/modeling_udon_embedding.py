"""The exported UDON universal embedding model: `AutoModel.from_pretrained(dir, trust_remote_code=True)(pixel_values)`
returns the L2-normalized 64-d embedding in `image_embeds`.

This file is copied next to the exported weights: it imports only torch and transformers, never hf_distill.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_udon_embedding import UdonEmbeddingConfig


@dataclass
class UdonEmbeddingOutput(ModelOutput):
    """
    Args:
        image_embeds (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`): the L2-normalized embedding.
        backbone_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): the L2-normalized CLS feature
            of the backbone (input of the heads).
    """

    image_embeds: torch.FloatTensor | None = None
    backbone_features: torch.FloatTensor | None = None


def backbone_features(backbone: nn.Module, pixel_values: torch.Tensor, uses_pooler: bool) -> torch.Tensor:
    """The backbone's normed CLS token, L2-normalized (UDON: the heads read the normalized CLS output)."""
    outputs = backbone(pixel_values=pixel_values)
    cls = outputs.pooler_output if uses_pooler else outputs.last_hidden_state[:, 0]
    return F.normalize(cls, dim=-1)


class UdonEmbeddingModel(PreTrainedModel):
    config_class = UdonEmbeddingConfig
    base_model_prefix = "udon"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: UdonEmbeddingConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        self.student_head = nn.Linear(config.backbone_config.hidden_size, config.embedding_dim)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> UdonEmbeddingOutput:
        features = backbone_features(self.backbone, pixel_values, self.config.uses_pooler)
        return UdonEmbeddingOutput(
            image_embeds=F.normalize(self.student_head(features), dim=-1), backbone_features=features
        )
