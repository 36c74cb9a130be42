"""The exported UDON universal embedding model: `AutoModel.from_pretrained(dir, trust_remote_code=True)(pixel_values)`
returns the L2-normalized 64-d embedding in `image_embeds`.

This file is copied next to the exported weights: it imports only torch and transformers, never hf_distill. It
therefore repeats, on purpose, what it needs of the model code (the UDON embedding of `modeling_udon.py`, the
`PreTrainedModel` attributes of `modeling_unic_adaptors.py`): a change there must be made here too.
"""

import functools
import inspect
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


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@functools.cache
def _interpolates(backbone_class: type) -> bool:
    """Whether the backbone needs `interpolate_pos_encoding=True` for other image sizes (ViT, DeiT, BEiT, CLIP; DINOv2
    always interpolates and has no such argument)."""
    return "interpolate_pos_encoding" in inspect.signature(backbone_class.forward).parameters


def backbone_features(backbone: nn.Module, pixel_values: torch.Tensor, uses_pooler: bool) -> torch.Tensor:
    """The backbone's CLS token after its final norm, L2-normalized (UDON: the heads read the normalized CLS output).

    Args:
        backbone (`nn.Module`): a transformers vision model.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalized images.
        uses_pooler (`bool`): read `pooler_output` (CLIP: post-layernorm CLS) instead of `last_hidden_state[:, 0]`.
    """
    kwargs = {}
    native = getattr(backbone.config, "image_size", None)
    if native is not None and tuple(pixel_values.shape[-2:]) != _pair(native) and _interpolates(type(backbone)):
        kwargs["interpolate_pos_encoding"] = True  # e.g. a 224-px ViT trained or used at another size
    outputs = backbone(pixel_values=pixel_values, **kwargs)
    cls = outputs.pooler_output if uses_pooler else outputs.last_hidden_state[:, 0]
    return F.normalize(cls, dim=-1)


class UdonEmbeddingModel(PreTrainedModel):
    """Backbone + universal student head (linear) + L2 norm: the product of a UDON training run."""

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
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): images prepared by the
                image processor saved with the model.
        """
        features = backbone_features(self.backbone, pixel_values, self.config.uses_pooler)
        return UdonEmbeddingOutput(
            image_embeds=F.normalize(self.student_head(features), dim=-1), backbone_features=features
        )


__all__ = ["UdonEmbeddingModel", "UdonEmbeddingOutput"]
