"""The UDON training model: one shared backbone, per-domain teacher heads (linear to 256 + L2), one universal student
head (linear to 64 + L2), per-domain cosine classifiers for both. Every batch holds ONE domain and uses its heads.

Only the backbone and the student head are exported ([`UdonModel.save_embedding_model`]), as a self-contained
[`UdonEmbeddingModel`] loaded with `AutoModel.from_pretrained(dir, trust_remote_code=True)`.
"""

import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPVisionModel, PreTrainedModel, ViTImageProcessor
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..losses.udon import class_cosines, udon_loss
from .configuration_udon import UdonConfig
from .configuration_udon_embedding import UdonEmbeddingConfig
from .modeling_udon_embedding import UdonEmbeddingModel, backbone_features


@dataclass
class UdonOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): the UDON loss (with `labels`).
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*): its terms.
        student_embeds (`torch.FloatTensor` `(batch_size, embedding_dim)`): universal embedding, L2-normalized.
        teacher_embeds (`torch.FloatTensor` `(batch_size, teacher_dim)`, *optional*): the domain's teacher embedding.
        student_cosines, teacher_cosines (`torch.FloatTensor` `(batch_size, num_classes)`): class cosines.
    """

    loss: torch.FloatTensor | None = None
    loss_terms: dict | None = None
    student_embeds: torch.FloatTensor | None = None
    teacher_embeds: torch.FloatTensor | None = None
    student_cosines: torch.FloatTensor | None = None
    teacher_cosines: torch.FloatTensor | None = None


class UdonPreTrainedModel(PreTrainedModel):
    config_class = UdonConfig
    base_model_prefix = "udon"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module):
        # the backbone initializes itself; this covers the heads and the classifiers
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.ParameterDict):
            for parameter in module.values():
                init.trunc_normal_(parameter, std=self.config.initializer_range)


class UdonModel(UdonPreTrainedModel):
    """Shared backbone + per-domain teacher heads + universal student head + per-domain cosine classifiers."""

    def __init__(self, config: UdonConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.backbone_config)
        for name, parameter in self.backbone.named_parameters():
            if name.startswith(("pooler.", "embeddings.mask_token")) and not self.uses_pooler:
                parameter.requires_grad_(False)  # never reached by the loss
        width = config.backbone_config.hidden_size
        self.student_head = nn.Linear(width, config.embedding_dim)
        self.student_classifiers = nn.ParameterDict(
            {d["name"]: nn.Parameter(torch.empty(d["num_classes"], config.embedding_dim)) for d in config.domains}
        )
        if config.use_teacher_heads:
            self.teacher_heads = nn.ModuleDict(
                {d["name"]: nn.Linear(width, config.teacher_dim) for d in config.domains}
            )
            self.teacher_classifiers = nn.ParameterDict(
                {d["name"]: nn.Parameter(torch.empty(d["num_classes"], config.teacher_dim)) for d in config.domains}
            )
        self.backbone_frozen = False  # set by the trainer during the first epochs: no backbone gradients at all
        self.post_init()

    @property
    def uses_pooler(self) -> bool:
        return self.config.backbone_config.model_type in ("clip_vision_model",)

    @classmethod
    def from_backbone(cls, source: str, config: UdonConfig, **kwargs) -> "UdonModel":
        """A UDON model whose backbone starts from pretrained weights: a Hub id or folder of a ViT-family model, or a
        CLIP checkpoint (its vision tower is used). `config.backbone_config` is replaced by the checkpoint's."""
        backbone_config = AutoConfig.from_pretrained(source, **kwargs)
        if backbone_config.model_type == "clip":
            backbone = CLIPVisionModel.from_pretrained(source, **kwargs)
        else:
            backbone = AutoModel.from_pretrained(source, **kwargs)
        config.backbone_config = backbone.config
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    def domain_name(self, domain: int | str) -> str:
        names = self.config.domain_names
        if isinstance(domain, str):
            if domain not in names:
                raise ValueError(f"Unknown domain {domain!r}; the model has {names}.")
            return domain
        return names[int(domain)]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone and p.requires_grad]

    def forward(self, pixel_values: torch.Tensor, domain: int | str, labels: torch.Tensor | None = None) -> UdonOutput:
        """`pixel_values` of ONE domain (`domain`: its index or name); with `labels` (in that domain's label space)
        the UDON loss (or the USCRR loss) is computed."""
        name = self.domain_name(domain)
        config = self.config
        with torch.no_grad() if self.backbone_frozen else nullcontext():
            features = backbone_features(self.backbone, pixel_values, self.uses_pooler)
        student = F.normalize(self.student_head(features), dim=-1)
        student_cosines = class_cosines(student, self.student_classifiers[name])
        if not config.use_teacher_heads:
            output = UdonOutput(student_embeds=student, student_cosines=student_cosines)
            if labels is not None:
                terms = udon_loss(labels, student_cosines, scale=config.logit_scale, margin=config.margin,
                                  margin_type=config.margin_type)  # fmt: skip
                output.loss, output.loss_terms = terms.loss, terms.terms()
            return output
        teacher = F.normalize(self.teacher_heads[name](features), dim=-1)
        teacher_cosines = class_cosines(teacher, self.teacher_classifiers[name])
        output = UdonOutput(
            student_embeds=student,
            teacher_embeds=teacher,
            student_cosines=student_cosines,
            teacher_cosines=teacher_cosines,
        )
        if labels is not None:
            distill_embeds = distill_cosines = None
            if not config.distill_to_backbone:  # paper: distillation reaches the student head, not the backbone
                distill_embeds = F.normalize(self.student_head(features.detach()), dim=-1)
                distill_cosines = class_cosines(distill_embeds, self.student_classifiers[name])
            terms = udon_loss(
                labels,
                student_cosines,
                teacher_cosines,
                student,
                teacher,
                distill_cosines,
                distill_embeds,
                scale=config.logit_scale,
                margin=config.margin,
                margin_type=config.margin_type,
                temperature=config.distill_temperature,
            )
            output.loss, output.loss_terms = terms.loss, terms.terms()
        return output

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Keys keep their live names: `Trainer` resumes with a raw `load_state_dict` (see `UnicStudentModel`)."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def embedding_model(self) -> UdonEmbeddingModel:
        """The universal embedding model (backbone + student head), sharing nothing with this model."""
        config = UdonEmbeddingConfig(
            backbone_config=self.config.backbone_config.to_dict(), embedding_dim=self.config.embedding_dim
        )
        config.image_mean, config.image_std = self.config.image_mean, self.config.image_std
        model = UdonEmbeddingModel(config)
        model.backbone.load_state_dict(self.backbone.state_dict())
        model.student_head.load_state_dict(self.student_head.state_dict())
        return model.eval()

    def save_embedding_model(self, output_dir: str | os.PathLike, image_size: int, **kwargs) -> None:
        """Write the universal embedding model (weights, config with `auto_map`, its two code files) and an image
        processor, atomically: `AutoModel.from_pretrained(output_dir, trust_remote_code=True)` returns a model whose
        `image_embeds` is the 64-d embedding. Teacher heads and classifiers are not exported."""
        output_dir = os.fspath(output_dir)
        parent = os.path.dirname(os.path.abspath(output_dir))
        os.makedirs(parent, exist_ok=True)
        model = self.embedding_model()
        UdonEmbeddingConfig.register_for_auto_class()
        UdonEmbeddingModel.register_for_auto_class("AutoModel")
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.")
        try:
            model.save_pretrained(staging, **kwargs)
            ViTImageProcessor(
                size={"height": image_size, "width": image_size},
                image_mean=self.config.image_mean,
                image_std=self.config.image_std,
            ).save_pretrained(staging)
            if os.path.isdir(output_dir):
                # keep files written next to the model before (model card, evaluation results)
                for name in os.listdir(output_dir):
                    if not os.path.exists(os.path.join(staging, name)):
                        shutil.move(os.path.join(output_dir, name), os.path.join(staging, name))
                shutil.rmtree(output_dir)
            os.replace(staging, output_dir)
        finally:
            if os.path.isdir(staging):
                shutil.rmtree(staging)


__all__ = ["UdonModel", "UdonOutput", "UdonPreTrainedModel"]
