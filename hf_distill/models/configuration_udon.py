"""Configuration of the UDON training model: shared backbone, per-domain teacher heads, one universal student head."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..losses.udon import MARGIN_TYPES
from .configuration_teacher import IMAGENET_MEAN, IMAGENET_STD


class UdonConfig(PreTrainedConfig):
    r"""
    Configuration of [`UdonModel`] (UDON, REFERENCE.md 2).

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            The shared vision backbone: a transformers ViT-family config or a CLIP vision tower config.
        domains (`list[dict]`):
            One entry per domain, `{"name": str, "num_classes": int}`, in the order of the training data.
        teacher_dim (`int`, defaults to 256): width of each per-domain teacher embedding.
        embedding_dim (`int`, defaults to 64): width of the universal student embedding (the exported product).
        logit_scale (`float`, defaults to 16.0): scale of the normalized-softmax logits.
        margin (`float`, defaults to 0.0), margin_type (`str`, defaults to `"none"`): `"arcface"` or `"cosface"`
            margin on the target class.
        distill_temperature (`float`, defaults to 0.1): temperature of the logit distillation (on cosines).
        distill_to_backbone (`bool`, defaults to `True`):
            `True`: distillation gradients reach the backbone (authors' code). `False`: they stop at the student
            head (paper).
        use_teacher_heads (`bool`, defaults to `True`):
            `False` gives the USCRR baseline: backbone + student projection + per-domain classifiers, no teacher
            heads, no distillation.
        image_mean, image_std (`list[float]`): pixel normalization (saved with the exported image processor).
        initializer_range (`float`, defaults to 0.02): std of the heads' and classifiers' initialization.
    """

    model_type = "hf_distill_udon"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    domains: list[dict] | None = None
    teacher_dim: int = 256
    embedding_dim: int = 64
    logit_scale: float = 16.0
    margin: float = 0.0
    margin_type: str = "none"
    distill_temperature: float = 0.1
    distill_to_backbone: bool = True
    use_teacher_heads: bool = True
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.domains = [dict(domain) for domain in (self.domains or [])]
        names = [domain.get("name") for domain in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"Domain names must be unique, got {names}.")
        for domain in self.domains:
            if not isinstance(domain.get("num_classes"), int) or domain["num_classes"] < 1:
                raise ValueError(f"Domain {domain} needs an integer num_classes >= 1.")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {self.margin_type!r}.")
        self.image_mean = [float(v) for v in self.image_mean]
        self.image_std = [float(v) for v in self.image_std]

    @property
    def domain_names(self) -> list[str]:
        return [domain["name"] for domain in self.domains]
