"""Evaluation suites: which datasets, which protocols, and running them for one encoder.

A [`EvalDataset`] names a dataset (Hub id, image folder or `save_to_disk` folder), its splits and columns, and the
protocols to run on it: `knn` and `linear` (classification on the summary feature), `retrieval` (UnED-style merged
index over domains) and `segmentation` (dense linear probe on patch tokens, mIoU).
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from huggingface_hub import EvalResult
from PIL import Image

from ..data.image_datasets import load_image_dataset, resize_center_crop
from .features import _no_patch_tokens_message, extract_features, load_encoder
from .knn import knn_accuracy
from .linear_probe import linear_probe
from .retrieval import retrieval_metrics
from .segmentation import dense_linear_probe

PROTOCOLS = ("knn", "linear", "retrieval", "segmentation")
logger = logging.getLogger(__name__)


@dataclass
class EvalDataset:
    """One evaluation dataset and the protocols to run on it.

    Args:
        name: short name used in tables and metric keys (e.g. `fashion-mnist`).
        path: Hub id, local image folder or `save_to_disk` folder.
        protocols: subset of `knn`, `linear`, `retrieval`, `segmentation`.
        train_split, test_split: splits used to fit (k-NN index, probes) and to score. Retrieval uses `test_split`.
        image_column, label_column: columns of the images and of the class labels.
        domain_column: retrieval only: the domain of each image (labels are compared within a domain).
        mask_column, num_classes, ignore_index: segmentation only.
        max_train_samples, max_test_samples: optional caps (first N rows).
    """

    name: str
    path: str
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    domain_column: str | None = None
    mask_column: str | None = None
    num_classes: int | None = None
    ignore_index: int = 255
    max_train_samples: int | None = None
    max_test_samples: int | None = None

    def __post_init__(self):
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"Dataset {self.name!r}: unknown protocols {unknown}; choose from {PROTOCOLS}.")
        if "retrieval" in self.protocols and not self.domain_column:
            raise ValueError(f"Dataset {self.name!r}: retrieval needs `domain_column` (one domain per image).")
        if "segmentation" in self.protocols and (not self.mask_column or not self.num_classes):
            raise ValueError(f"Dataset {self.name!r}: segmentation needs `mask_column` and `num_classes`.")

    def load(self, split: str, limit: int | None):
        dataset = load_image_dataset(self.path, self.image_column, split)
        needed = [self.label_column] if {"knn", "linear", "retrieval"} & set(self.protocols) else []
        needed += [c for c in (self.domain_column, self.mask_column) if c]
        missing = [column for column in needed if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Dataset {self.name!r} ({self.path}, split {split!r}) has no column(s) {missing}; its columns are "
                f"{dataset.column_names}."
            )
        return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _masks(dataset, column: str, size: int) -> torch.Tensor:
    """Segmentation masks resized (nearest) and center-cropped exactly like the images: `[N, size, size]` int64."""
    masks = []
    for mask in dataset[column]:
        mask = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
        masks.append(np.asarray(resize_center_crop(mask, size, Image.NEAREST), dtype=np.int64))
    return torch.from_numpy(np.stack(masks))


def _split_features(encoder, spec: EvalDataset, split: str, limit: int | None, label: str, **options):
    """Load one split of `spec` and extract its features (patch tokens too when segmentation is asked for)."""
    dataset = spec.load(split, limit)
    return dataset, extract_features(
        encoder,
        dataset,
        image_column=spec.image_column,
        label_column=spec.label_column if spec.label_column in dataset.column_names else None,
        return_patch_tokens="segmentation" in spec.protocols,
        description=f"{label} | {spec.name}/{split}",
        **options,
    )


def evaluate_encoder(
    encoder,
    suite: list[EvalDataset],
    image_size: int | None = None,
    batch_size: int = 64,
    cache_dir: str | None = None,
    knn_k: tuple[int, ...] = (10, 20, 100, 200),
    knn_temperature: float = 0.07,
    device: str | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, float]:
    """Run every protocol of every dataset of `suite` on `encoder`; returns flat `{"dataset/metric": value}`.
    `trust_remote_code` allows models that ship their own code (see [`load_encoder`])."""
    results: dict[str, float] = {}
    label = name or (encoder if isinstance(encoder, str) else type(encoder).__name__)
    # loaded once for every dataset and split
    encoder, default_size = load_encoder(encoder, trust_remote_code=trust_remote_code)
    if not getattr(encoder, "has_patch_tokens", True) and any("segmentation" in s.protocols for s in suite):
        raise ValueError(_no_patch_tokens_message(label))
    image_size = image_size or default_size
    options = dict(image_size=image_size, batch_size=batch_size, cache_dir=cache_dir, device=device, label=label)
    for spec in suite:
        test, test_features = _split_features(encoder, spec, spec.test_split, spec.max_test_samples, **options)
        if {"knn", "linear", "segmentation"} & set(spec.protocols):
            train, train_features = _split_features(encoder, spec, spec.train_split, spec.max_train_samples, **options)
        if "knn" in spec.protocols:
            metrics = knn_accuracy(
                train_features.features,
                train_features.labels,
                test_features.features,
                test_features.labels,
                k=knn_k,
                temperature=knn_temperature,
            )
            results.update({f"{spec.name}/{key}": value for key, value in metrics.items()})
        if "linear" in spec.protocols:
            metrics = linear_probe(
                train_features.features, train_features.labels, test_features.features, test_features.labels
            )
            results[f"{spec.name}/linear_top1"] = metrics["linear_top1"]
        if "retrieval" in spec.protocols:
            domain_names = sorted(set(test[spec.domain_column]))
            domain_ids = torch.tensor([domain_names.index(d) for d in test[spec.domain_column]], dtype=torch.int64)
            metrics = retrieval_metrics(
                test_features.features, test_features.labels, domain_ids, domain_names=[str(d) for d in domain_names]
            )
            results[f"{spec.name}/R@1"] = metrics["mean"]["R@1"]
            results[f"{spec.name}/mMP@5"] = metrics["mean"]["mMP@5"]
            for domain, values in metrics["per_domain"].items():
                results[f"{spec.name}/{domain}/R@1"] = values["R@1"]
                results[f"{spec.name}/{domain}/mMP@5"] = values["mMP@5"]
        if "segmentation" in spec.protocols:
            size = test_features.image_size
            metrics = dense_linear_probe(
                train_features.patch_tokens,
                _masks(train, spec.mask_column, size),
                test_features.patch_tokens,
                _masks(test, spec.mask_column, size),
                num_classes=spec.num_classes,
                ignore_index=spec.ignore_index,
            )
            results[f"{spec.name}/mIoU"] = metrics["mIoU"]
        scores = {key: round(value, 2) for key, value in results.items() if key.startswith(f"{spec.name}/")}
        logger.info("%s on %s: %s", label, spec.name, scores)
    return results


_EMULATION_METRICS = {
    "summary_cosine": ("cosine_similarity", "summary cosine similarity"),
    "summary_r2": ("r_squared", "summary R^2"),
    "patch_cosine": ("cosine_similarity", "patch cosine similarity"),
    "patch_r2": ("r_squared", "patch R^2"),
    "top1_agreement": ("accuracy", "top-1 agreement with the teacher's head (%)"),
}


def _describe(metric: str) -> tuple[str, str, str, str] | None:
    """`(task_type, task_name, metric_type, metric_name)` of a flat metric key's last part, None for per-domain.
    Teacher emulation keys are `emulation/<teacher>/<metric>` ([`~hf_distill.evaluation.emulation`])."""
    if metric.startswith("emulation/"):
        teacher, _, name = metric.removeprefix("emulation/").rpartition("/")
        if name not in _EMULATION_METRICS:
            return None
        return ("image-feature-extraction", f"Teacher emulation ({teacher})", *_EMULATION_METRICS[name])
    if metric.startswith("knn_top1@"):
        k = metric.split("@")[1]
        return "image-classification", f"k-NN classification (k={k})", "accuracy", f"k-NN top-1 (k={k})"
    if metric == "linear_top1":
        return "image-classification", "Linear probe", "accuracy", "Linear probe top-1"
    if metric in ("R@1", "mMP@5"):
        return "image-retrieval", "Universal retrieval (merged index)", metric.lower().replace("@", "_at_"), metric
    if metric == "mIoU":
        return "image-segmentation", "Dense linear probe", "mean_iou", "mIoU"
    return None


def card_results(
    results: dict[str, dict[str, float]], suite: list[EvalDataset], student: str
) -> tuple[list[EvalResult], list[dict]]:
    """Turn `{model: {"dataset/metric": value}}` into the student's `EvalResult`s (for the card's `model-index`)
    and comparison rows with the other models' values (for the card's table). Per-domain retrieval scores stay out."""
    paths = {spec.name: spec for spec in suite}
    eval_results, comparison = [], []
    for key, value in results[student].items():
        dataset, _, metric = key.partition("/")
        described = _describe(metric)
        if described is None or dataset not in paths:
            continue
        task_type, task_name, metric_type, metric_name = described
        spec = paths[dataset]
        eval_results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=spec.path,
                dataset_name=dataset,
                dataset_split=spec.test_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 4 if metric_type in ("cosine_similarity", "r_squared") else 2),
            )
        )
        others = {name: round(values[key], 2) for name, values in results.items() if name != student and key in values}
        if others:
            comparison.append(
                {
                    "task": task_name,
                    "dataset": f"{dataset} ({spec.test_split})",
                    "metric": metric_name,
                    "teachers": others,
                }
            )
    return eval_results, comparison
