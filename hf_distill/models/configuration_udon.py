"""Configuration of the UDON training model: shared backbone, per-domain teacher heads, one universal student head."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..losses.udon import MARGIN_TYPES, RELATIONAL_SCALE
from .configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from .configuration_udon_embedding import check_backbone_config
from .configuration_utils import check_named_entries, normalization_lists


class UdonModelConfig(PreTrainedConfig):
    r"""
    Configuration of [`UdonModel`] (UDON, Ypsilantis et al., NeurIPS 2024; docs/methods.md).

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The shared vision backbone: a transformers ViT-family config (`vit`, `deit`, `dinov2`, ...) or a CLIP
            vision config (a full `CLIPConfig` is replaced by its `vision_config`). May be left out when the model is
            built with [`UdonModel.from_backbone`], which sets it from the checkpoint.
        domains (`list[dict]`):
            One entry per domain, `{"name": str, "num_classes": int}`, in the order of the training data. Names are
            unique, non-empty and contain no `.` (they key the per-domain modules).
        teacher_dim (`int`, defaults to 256): width of each per-domain teacher embedding.
        embedding_dim (`int`, defaults to 64): width of the universal student embedding (the exported product).
        logit_scale (`float`, defaults to 16.0): scale of the normalized-softmax logits.
        margin (`float`, defaults to 0.0): margin of the target class in both classification losses.
        margin_type (`str`, defaults to `"none"`): `"none"`, `"arcface"` (`cos(theta + m)`) or `"cosface"`
            (`cos - m`).
        distill_temperature (`float`, defaults to 0.1): temperature of the logit distillation (on cosines).
        relational_scale (`float`, defaults to 32.0):
            The relational distillation term is `relational_scale` x the mean over the B x B entries of
            `(S_s - S_t)^2`. 32 equals the authors' code at its reference setting (global batch 128 on 4 devices),
            whatever the batch size and number of processes; their code at per-device batch `b` on `n` devices is
            `b * n / 4`. 0 turns the relational term off.
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
    relational_scale: float = RELATIONAL_SCALE
    distill_to_backbone: bool = True
    use_teacher_heads: bool = True
    image_mean: list[float] | tuple[float, ...] = IMAGENET_MEAN
    image_std: list[float] | tuple[float, ...] = IMAGENET_STD
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.backbone_config is not None and self.backbone_config.model_type == "clip":
            self.backbone_config = self.backbone_config.vision_config
        check_backbone_config(self.backbone_config)
        self.domains = check_named_entries(self.domains, "Domain")
        for domain in self.domains:
            classes = domain.get("num_classes")
            if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
                raise ValueError(f"Domain {domain} needs an integer num_classes >= 1.")
        if self.margin_type not in MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {self.margin_type!r}.")
        for field in ("teacher_dim", "embedding_dim", "logit_scale", "distill_temperature"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}.")
        if self.relational_scale < 0:
            raise ValueError(
                f"relational_scale must be >= 0 (0 turns the relational term off), got {self.relational_scale}."
            )
        self.image_mean, self.image_std = normalization_lists(self.image_mean, self.image_std)

    @property
    def domain_names(self) -> list[str]:
        """The domain names, in order (domain index `i` is `domain_names[i]`)."""
        return [domain["name"] for domain in self.domains]
