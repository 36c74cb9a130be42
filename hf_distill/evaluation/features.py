"""Feature extraction from any encoder, batched, in inference mode, with an on-disk cache.

An encoder is anything `AutoModel.from_pretrained` loads (Hub id or local path), a prepared [`TeacherModel`], a
[`ModuleTeacher`], or a transformers model object. What is evaluated depends on the kind of model:

- ViT-family backbones (an exported UNIC student, a teacher backbone, the vision tower of CLIP / SigLIP checkpoints)
  and image classifiers built on one (the export of `recipes/task_distill.py`: its backbone is read, the classifier
  head is left out) go through hf_distill's teacher wrapper: the summary token (`cls` by default, `pooler` or
  `mean_patch`) and the patch tokens.
- Models that ship their own code (`auto_map` in their config, e.g. the UDON universal embedding model exported by
  `recipes/udon.py`) load only with `trust_remote_code=True`, since loading them runs that code. Their feature is
  the `image_embeds` of their output (UDON: the L2-normalized 64-d embedding), else their `pooler_output`; they give
  no patch tokens (no dense evaluation).
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..data.image_datasets import ImageCollator
from ..io_utils import save_safetensors_atomically
from ..models.configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from ..models.fingerprint import encoder_fingerprint
from ..models.modeling_teacher import ModuleTeacher, TeacherModel, TeacherOutput, freeze_teacher
from ..models.teacher_loading import load_teacher, teacher_from_backbone

logger = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features of one dataset under one encoder.

    Args:
        features (`torch.Tensor` of shape `(N, D)`): summary features (float32, CPU).
        labels (`torch.Tensor` of shape `(N,)`, *optional*): int64 labels when a label column was given.
        patch_tokens (`torch.Tensor` of shape `(N, h, w, D)`, *optional*): patch tokens when requested.
        image_size (`int`): side of the square images the features were computed at.
    """

    features: torch.Tensor
    labels: torch.Tensor | None = None
    patch_tokens: torch.Tensor | None = None
    image_size: int | None = None


def _processor_settings(source: str | None) -> dict:
    """Mean, std and crop size from the image processor saved at `source` (empty when there is none)."""
    if not source:
        return {}
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except OSError:
        return {}
    settings = {key: processor[key] for key in ("image_mean", "image_std") if processor.get(key)}
    for key in ("crop_size", "size"):
        size = processor.get(key)
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        if isinstance(size, int):
            settings["image_size"] = size
            break
    return settings


def remote_code_entry(source: str) -> str | None:
    """The class a model with its own code loads from (its config's `auto_map`, e.g.
    `modeling_udon_embedding.UdonEmbeddingModel`), or `None` for a model transformers or hf_distill knows. Reads
    `config.json` only; a source that cannot be read also gives `None` (the loader then reports it)."""
    try:
        config, _ = PreTrainedConfig.get_config_dict(source)
    except (OSError, ValueError):
        return None
    auto_map = config.get("auto_map") or {}
    if "AutoConfig" not in auto_map or config.get("model_type") in CONFIG_MAPPING:
        return None  # same rule as transformers: a known model_type is loaded with the installed code
    entry = auto_map.get("AutoModel") or auto_map["AutoConfig"]
    return entry[0] if isinstance(entry, (list, tuple)) else entry


def check_remote_code(source: str, trust_remote_code: bool = False, patch_tokens: bool = False) -> bool:
    """Whether `source` is a model with its own code; raises a `ValueError` saying what to do when loading it is not
    allowed (`trust_remote_code=False`) or when `patch_tokens` are needed (such models give none). Cheap: reads
    `config.json` only, so callers can check every model before any work."""
    entry = remote_code_entry(source)
    if entry is None:
        return False
    if not trust_remote_code:
        raise ValueError(
            f"{source!r} is a model with its own Python code ({entry}; e.g. a UDON embedding model exported by "
            "hf_distill): loading it runs that code, which is off by default. If you trust its source, pass "
            "--trust_remote_code to recipes/evaluate.py (`trust_remote_code=True` in Python)."
        )
    if patch_tokens:
        raise ValueError(_no_patch_tokens_message(source))
    return True


def _no_patch_tokens_message(name: str) -> str:
    return (
        f"{name!r} is evaluated on its embedding (`image_embeds` / `pooler_output`) and gives no patch tokens: "
        "dense protocols (segmentation) cannot run on it. Remove `segmentation` from the protocols for this model."
    )


class EmbeddingEncoder(nn.Module):
    """A model read through its own output rather than as a ViT-family backbone (e.g. the UDON universal embedding
    model): the summary feature is its `image_embeds` (embedding models), else its `pooler_output`. No patch tokens.

    Args:
        model (`nn.Module`): called as `model(pixel_values=...)`; frozen and put in `eval()`.
        image_mean, image_std (`Sequence[float]`): pixel normalization the model expects.
    """

    has_patch_tokens = False

    def __init__(self, model: nn.Module, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        super().__init__()
        self.model = freeze_teacher(model)
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]

    def forward(self, pixel_values: torch.Tensor) -> TeacherOutput:
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values=pixel_values.to(dtype))
        summary = getattr(outputs, "image_embeds", None)
        if summary is None:
            summary = getattr(outputs, "pooler_output", None)
        if summary is None:
            raise ValueError(
                f"{type(self.model).__name__} returns neither `image_embeds` nor `pooler_output`: wrap it in "
                "hf_distill.ModuleTeacher with a `summary_fn` that says which feature to evaluate."
            )
        return TeacherOutput(summary=summary.float(), patch_tokens=None)


def _embedding_encoder(model: PreTrainedModel, source: str | None) -> tuple[EmbeddingEncoder, int | None]:
    """Wrap a model that is not a ViT-family backbone, with the normalization of the image processor saved beside it
    (else its config's `image_mean` / `image_std`, else ImageNet's)."""
    settings = _processor_settings(source)
    mean = settings.get("image_mean") or getattr(model.config, "image_mean", None) or IMAGENET_MEAN
    std = settings.get("image_std") or getattr(model.config, "image_std", None) or IMAGENET_STD
    return EmbeddingEncoder(model, mean, std), settings.get("image_size")


def load_encoder(encoder, pooling: str | None = None, trust_remote_code: bool = False) -> tuple[nn.Module, int | None]:
    """Wrap `encoder` for feature extraction; returns `(wrapped, default image size or None)`.

    `pooling` (`cls`, `pooler`, `mean_patch`) overrides the summary definition of a ViT-family encoder.
    `trust_remote_code` allows a model that ships its own code (see the module docstring) to be loaded, which runs
    that code; without it such a model raises a `ValueError` saying so.
    """
    options = {"summary": pooling} if pooling else {}
    if isinstance(encoder, str):
        if check_remote_code(encoder, trust_remote_code):
            if pooling:
                raise ValueError(f"pooling={pooling!r} applies to ViT-family backbones, not to {encoder!r}.")
            return _embedding_encoder(AutoModel.from_pretrained(encoder, trust_remote_code=True), encoder)
        wrapped = load_teacher(encoder, **options)
        return wrapped, _processor_settings(encoder).get("image_size")
    if isinstance(encoder, TeacherModel):
        if pooling:
            encoder.config.summary = pooling
        return freeze_teacher(encoder), None
    if isinstance(encoder, (ModuleTeacher, EmbeddingEncoder)):
        return encoder, None
    if isinstance(encoder, PreTrainedModel):
        # a model object: its normalization is read from the image processor saved beside its weights, if any
        if not (hasattr(encoder.config, "patch_size") and hasattr(encoder.config, "hidden_size")):
            return _embedding_encoder(encoder, encoder.config.name_or_path)  # e.g. a UdonEmbeddingModel
        encoder = encoder.base_model  # a classifier (e.g. ViTForImageClassification) is read through its backbone
        settings = _processor_settings(encoder.config.name_or_path)
        image_size = settings.pop("image_size", getattr(encoder.config, "image_size", None))
        return teacher_from_backbone(
            encoder, pooling, settings.get("image_mean"), settings.get("image_std")
        ), image_size
    raise TypeError(
        f"Cannot extract features from a {type(encoder).__name__}: give a Hub id or path, a transformers model, a "
        "TeacherModel or a ModuleTeacher."
    )


@torch.inference_mode()
def extract_features(
    encoder,
    dataset,
    image_column: str = "image",
    label_column: str | None = None,
    pooling: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    return_patch_tokens: bool = False,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    description: str | None = None,
    trust_remote_code: bool = False,
) -> FeatureSet:
    """Extract summary features (and optionally patch tokens) of every image of `dataset`.

    Images are resized (shorter side) and center-cropped to `image_size` (default: the encoder's image processor
    crop size, else its config's image size, else 224) and normalized with the encoder's own mean/std. With
    `cache_dir`, results are stored under a key made of the encoder's weights fingerprint, the dataset fingerprint
    and the options, so a second evaluation of the same model on the same data reads them back instead.
    `trust_remote_code` is passed to [`load_encoder`].
    """
    wrapped, default_size = load_encoder(encoder, pooling, trust_remote_code=trust_remote_code)
    if return_patch_tokens and not getattr(wrapped, "has_patch_tokens", True):
        raise ValueError(
            _no_patch_tokens_message(encoder if isinstance(encoder, str) else type(wrapped.model).__name__)
        )
    image_size = image_size or default_size or 224
    for column in (image_column, label_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"Dataset has no column {column!r}; its columns are {dataset.column_names}.")

    cache_path = None
    if cache_dir is not None:
        key = {
            "encoder": encoder_fingerprint(wrapped),
            "dataset": getattr(dataset, "_fingerprint", None) or str(len(dataset)),
            "columns": [image_column, label_column],
            "image_size": image_size,
            "patches": return_patch_tokens,
        }
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        cache_path = os.path.join(cache_dir, f"{name}.safetensors")
        if os.path.exists(cache_path):
            logger.info("Reading cached features from %s", cache_path)
            cached = load_file(cache_path)
            return FeatureSet(cached["features"], cached.get("labels"), cached.get("patch_tokens"), image_size)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wrapped.to(device)
    mean = torch.tensor(wrapped.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(wrapped.image_std, device=device).view(1, 3, 1, 1)
    collate = ImageCollator(image_size, image_column=image_column)
    columns = [image_column] + ([label_column] if label_column else [])
    loader = DataLoader(
        dataset.select_columns(columns),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=lambda rows: (collate(rows), [row[label_column] for row in rows] if label_column else None),
    )
    features, labels, patches = [], [], []
    for batch, batch_labels in tqdm(loader, desc=description or "Extracting features", unit="batch"):
        pixels = (batch["pixel_values"].to(device).float() / 255.0 - mean) / std
        output = wrapped(pixels)
        features.append(output.summary.float().cpu())
        if return_patch_tokens:
            side = int(round(output.patch_tokens.shape[1] ** 0.5))
            patches.append(output.patch_tokens.float().cpu().unflatten(1, (side, -1)))
        if batch_labels is not None:
            labels.append(torch.as_tensor(batch_labels, dtype=torch.int64))
    result = FeatureSet(
        torch.cat(features),
        torch.cat(labels) if labels else None,
        torch.cat(patches) if return_patch_tokens else None,
        image_size,
    )
    if cache_path is not None:
        tensors = {"features": result.features}
        if result.labels is not None:
            tensors["labels"] = result.labels
        if result.patch_tokens is not None:
            tensors["patch_tokens"] = result.patch_tokens
        save_safetensors_atomically(tensors, cache_path, metadata={"image_size": str(image_size)})
    return result


__all__ = [
    "EmbeddingEncoder",
    "FeatureSet",
    "check_remote_code",
    "encoder_fingerprint",
    "extract_features",
    "load_encoder",
    "remote_code_entry",
]
