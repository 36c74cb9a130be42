"""The student of task-specific distillation: a stock transformers image classifier with the task's labels."""

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from .configuration_teacher import IMAGENET_MEAN, IMAGENET_STD


def build_student_classifier(
    source: str, names: list[str], image_size: int, random_init: bool = False
) -> PreTrainedModel:
    """The image classifier `source` (Hub id or folder) with one output per class of `names`; with `random_init` it is
    built from its config only. One forward pass on an `image_size` input checks that it runs there (e.g. a
    pretrained ViT at another resolution does not), before any expensive work."""
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    if random_init:
        config = AutoConfig.from_pretrained(source, **labels)
        if hasattr(config, "image_size"):
            config.image_size = image_size
        student = AutoModelForImageClassification.from_config(config)
    else:
        student = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **labels)
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            shape = tuple(student(pixel_values=torch.zeros(1, 3, image_size, image_size)).logits.shape)
    except Exception as error:  # each architecture raises its own error type for a wrong input size
        native = getattr(student.config, "image_size", None)
        hint = f" (its input size is {native}: pass --image_size {native})" if native else ""
        raise ValueError(f"The student {source!r} cannot classify {image_size} px images{hint}: {error}") from error
    student.train(was_training)
    if shape != (1, len(names)):
        raise ValueError(f"The student outputs logits of shape {shape}, expected (1, {len(names)}).")
    return student


def student_normalization(
    source: str, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> tuple[list[float], list[float]]:
    """`(image_mean, image_std)` when both are given, else those of `source`'s image processor, else ImageNet's."""
    if image_mean and image_std:
        return list(image_mean), list(image_std)
    try:
        processor = AutoImageProcessor.from_pretrained(source)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
