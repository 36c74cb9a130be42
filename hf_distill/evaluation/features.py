"""Feature extraction from any encoder, batched, in inference mode, with an on-disk cache.

An encoder is anything `AutoModel.from_pretrained` loads (Hub id or local path, e.g. an exported student or a teacher
backbone; the vision tower of CLIP / SigLIP checkpoints), a prepared [`TeacherModel`], a [`ModuleTeacher`], or a
transformers model object. All of them are read through hf_distill's teacher wrapper, which knows how to take the
summary token (`cls`, `pooler` or `mean_patch`) and the patch tokens of ViT-family backbones.
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
from transformers import PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin

from ..data.image_datasets import ImageCollator
from ..io_utils import save_safetensors_atomically
from ..models.configuration_teacher import TeacherConfig
from ..models.fingerprint import encoder_fingerprint
from ..models.modeling_teacher import ModuleTeacher, TeacherModel, freeze_teacher, load_teacher

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


def load_encoder(encoder, pooling: str | None = None) -> tuple[nn.Module, int | None]:
    """Wrap `encoder` for feature extraction; returns `(wrapped, default image size or None)`.

    `pooling` (`cls`, `pooler`, `mean_patch`) overrides the summary definition of the encoder.
    """
    options = {"summary": pooling} if pooling else {}
    if isinstance(encoder, str):
        wrapped = load_teacher(encoder, **options)
        return wrapped, _processor_settings(encoder).get("image_size")
    if isinstance(encoder, TeacherModel):
        if pooling:
            encoder.config.summary = pooling
        return freeze_teacher(encoder), None
    if isinstance(encoder, ModuleTeacher):
        return encoder, None
    if isinstance(encoder, PreTrainedModel):
        # a model object: its normalization is read from the image processor saved beside its weights, if any
        settings = _processor_settings(encoder.config.name_or_path)
        image_size = settings.pop("image_size", getattr(encoder.config, "image_size", None))
        config = TeacherConfig(
            backbone_config=encoder.config,
            source=encoder.config.name_or_path or None,
            summary=pooling or "cls",
            **settings,
        )
        return freeze_teacher(TeacherModel(config, backbone=encoder)), image_size
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
) -> FeatureSet:
    """Extract summary features (and optionally patch tokens) of every image of `dataset`.

    Images are resized (shorter side) and center-cropped to `image_size` (default: the encoder's image processor
    crop size, else its config's image size, else 224) and normalized with the encoder's own mean/std. With
    `cache_dir`, results are stored under a key made of the encoder's weights fingerprint, the dataset fingerprint
    and the options, so a second evaluation of the same model on the same data reads them back instead.
    """
    wrapped, default_size = load_encoder(encoder, pooling)
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


__all__ = ["FeatureSet", "encoder_fingerprint", "extract_features", "load_encoder"]
