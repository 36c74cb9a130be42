"""Build the students of the recipes from their sources: the UNIC student's backbone config, the UDON model."""

from transformers import AutoConfig, PreTrainedConfig

from .configuration_udon import UdonModelConfig
from .modeling_udon import UdonModel
from .student_backbones import check_student_backbone_config


def load_student_backbone_config(source: str, image_size: int) -> PreTrainedConfig:
    """The student's transformers config (Hub id, folder or config.json), checked to be a ViT-family or feature-map
    backbone (ConvNeXt, ResNet, Swin) whose patch size / stride divides `image_size`, set to `image_size`."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load the student config {source!r} (a Hub id, a folder or a config.json): {error}"
        ) from error
    return check_student_backbone_config(config, image_size, source)


def build_udon_model(backbone: str, config: UdonModelConfig, image_size: int, random_init: bool = False) -> UdonModel:
    """A [`UdonModel`] with the settings of `config` on the backbone `backbone` (Hub id or folder of a ViT-family or
    CLIP model): its pretrained weights, or with `random_init` its config only, at `image_size`."""
    if not random_init:
        return UdonModel.from_backbone(backbone, config)
    backbone_config = AutoConfig.from_pretrained(backbone)
    if backbone_config.model_type == "clip":
        backbone_config = backbone_config.vision_config
    backbone_config.image_size = image_size
    config.backbone_config = backbone_config
    return UdonModel(config)
