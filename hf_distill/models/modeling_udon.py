"""The UDON training model: one shared backbone, per-domain teacher heads (linear to 256 + L2), one universal student
head (linear to 64 + L2), per-domain cosine classifiers for both. Every batch holds ONE domain and uses its heads.

Only the backbone and the student head are exported ([`UdonModel.save_embedding_model`]), as a self-contained
[`UdonEmbeddingModel`] loaded with `AutoModel.from_pretrained(dir, trust_remote_code=True)`.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPImageProcessorPil, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ..io_utils import atomic_folder, is_weight_file
from ..losses.udon import class_cosines, udon_loss
from .configuration_udon import UdonModelConfig
from .configuration_udon_embedding import POOLER_MODEL_TYPES, UdonEmbeddingConfig, check_backbone_config
from .modeling_udon_embedding import UdonEmbeddingModel, backbone_features


@dataclass
class UdonOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor`, *optional*): the UDON loss (USCRR: the student CE), with `labels`.
        loss_terms (`dict[str, torch.FloatTensor]`, *optional*): its terms (`student_classification`,
            `teacher_classification`, `logit_distillation`, `relational_distillation`), with `labels`.
        student_embeds (`torch.FloatTensor` of shape `(batch_size, embedding_dim)`): universal embedding,
            L2-normalized.
        teacher_embeds (`torch.FloatTensor` of shape `(batch_size, teacher_dim)`, *optional*): the domain teacher's
            embedding, L2-normalized (`None` for USCRR).
        student_cosines, teacher_cosines (`torch.FloatTensor` of shape `(batch_size, num_classes)`): class cosines of
            the domain's classifiers; the logits are `config.logit_scale * cosines` (margins only inside the loss).
    """

    loss: torch.FloatTensor | None = None
    loss_terms: dict | None = None
    student_embeds: torch.FloatTensor | None = None
    teacher_embeds: torch.FloatTensor | None = None
    student_cosines: torch.FloatTensor | None = None
    teacher_cosines: torch.FloatTensor | None = None


class UdonPreTrainedModel(PreTrainedModel):
    config_class = UdonModelConfig
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
    """Shared backbone + per-domain teacher heads + universal student head + per-domain cosine classifiers.

    The heads read the backbone's CLS token after its final norm (`last_hidden_state[:, 0]` for ViT-family models,
    `pooler_output` = `post_layernorm(CLS)` for CLIP, not ViT's tanh pooler), L2-normalized, as the authors' code.
    """

    def __init__(self, config: UdonModelConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError(
                "UdonModelConfig.backbone_config is required (or build the model with UdonModel.from_backbone)."
            )
        if not config.domains:
            raise ValueError("UdonModelConfig.domains is empty: UDON needs at least one domain.")
        self.backbone = AutoModel.from_config(config.backbone_config)
        self._freeze_unused_backbone_parameters()
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

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "UdonModel":
        """`PreTrainedModel.from_pretrained`, then the unused backbone parameters are frozen again."""
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_unused_backbone_parameters()  # loading replaces the parameters, and their flags
        return model

    def _freeze_unused_backbone_parameters(self) -> None:
        """ViT's tanh pooler and mask token are never reached by the loss: frozen, out of the optimizer, and not
        awaited by DDP."""
        for name, parameter in self.backbone.named_parameters():
            if name.startswith(("pooler.", "embeddings.mask_token")) and not self.uses_pooler:
                parameter.requires_grad_(False)

    @property
    def uses_pooler(self) -> bool:
        """Whether the normed CLS token is the backbone's `pooler_output` (CLIP) rather than `last_hidden_state`."""
        return self.config.backbone_config.model_type in POOLER_MODEL_TYPES

    @classmethod
    def from_backbone(cls, source: str | os.PathLike, config: UdonModelConfig, **kwargs) -> "UdonModel":
        """A UDON model whose backbone starts from pretrained weights; heads and classifiers are freshly initialized.

        Args:
            source (`str` or `os.PathLike`): a Hub id or folder of a ViT-family model, or of a CLIP model (its vision
                tower is used).
            config ([`UdonModelConfig`]): the UDON settings; its `backbone_config` is replaced by the checkpoint's.
            kwargs: passed to `from_pretrained` (`revision`, `cache_dir`, ...).
        """
        backbone_config = AutoConfig.from_pretrained(source, **kwargs)
        if backbone_config.model_type == "clip":
            backbone = CLIPVisionModel.from_pretrained(source, **kwargs)
        else:
            backbone = AutoModel.from_pretrained(source, **kwargs)
        config.backbone_config = backbone.config
        check_backbone_config(config.backbone_config)
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    def domain_name(self, domain: int | str) -> str:
        """The name of `domain` (an index into `config.domains`, or a name, checked)."""
        names = self.config.domain_names
        if isinstance(domain, str):
            if domain not in names:
                raise ValueError(f"Unknown domain {domain!r}; the model has {names}.")
            return domain
        index = int(domain)
        if not 0 <= index < len(names):
            raise ValueError(f"Domain index {index} out of range; the model has {len(names)} domains: {names}.")
        return names[index]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The trainable backbone parameters (their own learning rate and freezing schedule in UDON)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything trainable outside the backbone: student head, teacher heads, classifiers."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone and p.requires_grad]

    def forward(self, pixel_values: torch.Tensor, domain: int | str, labels: torch.Tensor | None = None) -> UdonOutput:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`): normalized images of ONE
                domain.
            domain (`int` or `str`): that domain, by index into `config.domains` or by name; its heads are used.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): targets in the domain's label space;
                with them the UDON loss (USCRR: the student CE) and its terms are computed.

        With `config.distill_to_backbone=False` the student head is applied a second time, to DETACHED backbone
        features, and only the distillation terms read that copy: distillation gradients reach the student head and
        classifier but not the backbone, which learns from the two classification terms alone (paper).
        """
        name = self.domain_name(domain)
        config = self.config
        with torch.no_grad() if self.backbone_frozen else nullcontext():
            features = backbone_features(self.backbone, pixel_values, self.uses_pooler)
        student = F.normalize(self.student_head(features), dim=-1)
        student_cosines = class_cosines(student, self.student_classifiers[name])
        output = UdonOutput(student_embeds=student, student_cosines=student_cosines)
        loss_settings = {"scale": config.logit_scale, "margin": config.margin, "margin_type": config.margin_type}
        if not config.use_teacher_heads:
            if labels is not None:
                terms = udon_loss(labels, student_cosines, **loss_settings)
                output.loss, output.loss_terms = terms.loss, terms.terms()
            return output
        teacher = F.normalize(self.teacher_heads[name](features), dim=-1)
        output.teacher_embeds = teacher
        output.teacher_cosines = class_cosines(teacher, self.teacher_classifiers[name])
        if labels is not None:
            distill_embeds = distill_cosines = None
            if not config.distill_to_backbone:
                distill_embeds = F.normalize(self.student_head(features.detach()), dim=-1)
                distill_cosines = class_cosines(distill_embeds, self.student_classifiers[name])
            terms = udon_loss(
                labels,
                student_cosines,
                teacher_cosines=output.teacher_cosines,
                student_embeddings=student,
                teacher_embeddings=teacher,
                distill_student_cosines=distill_cosines,
                distill_student_embeddings=distill_embeds,
                temperature=config.distill_temperature,
                relational_scale=config.relational_scale,
                **loss_settings,
            )
            output.loss, output.loss_terms = terms.loss, terms.terms()
        return output

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Keys keep their live names: `Trainer` resumes with a raw `load_state_dict` (see `UnicStudentModel`)."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    def embedding_model(self) -> UdonEmbeddingModel:
        """The universal embedding model (backbone + student head): a copy on the CPU, sharing nothing with this
        model."""
        backbone_config = self.config.backbone_config.to_dict()
        backbone_config.pop("_name_or_path", None)  # a local path of this machine must not be published
        config = UdonEmbeddingConfig(
            backbone_config=backbone_config,
            embedding_dim=self.config.embedding_dim,
            image_mean=self.config.image_mean,
            image_std=self.config.image_std,
        )
        model = UdonEmbeddingModel(config)
        model.backbone.load_state_dict(self.backbone.state_dict())
        model.student_head.load_state_dict(self.student_head.state_dict())
        return model.eval()

    def image_processor(self, image_size: int) -> CLIPImageProcessorPil:
        """The processor of the exported model, the evaluation transform of training: shorter side resized to
        `image_size` (bicubic), center crop `image_size`, the config's mean/std. Saved as `CLIPImageProcessor`, a
        generic resize/crop/normalize processor whatever the backbone."""
        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=self.config.image_mean,
            image_std=self.config.image_std,
        )

    def save_embedding_model(self, output_dir: str | os.PathLike, image_size: int, **kwargs) -> None:
        """Export the universal embedding model: weights (backbone + student head; no teacher heads, no
        classifiers), config with `auto_map`, its two code files (torch/transformers only) and an image processor, so
        that `AutoModel.from_pretrained(output_dir, trust_remote_code=True)(pixel_values).image_embeds` is the
        embedding.

        The export is written to a staging folder, then renamed into place. An existing `output_dir` is swapped for
        the new one and its other entries (checkpoints, logs, model card) are moved into it; nothing of them is
        deleted on any error (at worst they remain in the hidden `.<name>.*.old` folder next to it).

        Args:
            output_dir (`str` or `os.PathLike`): the export folder.
            image_size (`int`): side of the images the processor produces (the training crop size).
            kwargs: passed to `save_pretrained` (e.g. `safe_serialization`, `max_shard_size`).
        """
        model = self.embedding_model()
        UdonEmbeddingConfig.register_for_auto_class()
        UdonEmbeddingModel.register_for_auto_class("AutoModel")
        with atomic_folder(output_dir, keep=lambda name: not is_weight_file(name)) as staging:
            model.save_pretrained(staging, **kwargs)
            self.image_processor(image_size).save_pretrained(staging)


__all__ = ["UdonModel", "UdonOutput", "UdonPreTrainedModel"]
