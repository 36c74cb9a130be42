"""Evaluation of encoders: feature extraction with a cache, k-NN, linear probe, retrieval, dense probe; and teacher
emulation of a student's adaptors ([`evaluate_emulation`]).

The metrics are also shipped as `evaluate` modules that load offline by path:
`evaluate.load(hf_distill.evaluation.metric_path("knn_accuracy"))`.
"""

import os

from .emulation import evaluate_emulation
from .features import FeatureSet, extract_features, load_encoder
from .knn import knn_accuracy, knn_predict
from .linear_probe import linear_probe
from .retrieval import multi_domain_retrieval, retrieval_metrics
from .segmentation import dense_linear_probe, mean_iou
from .suite import EvalDataset, evaluate_encoder

METRICS = ("knn_accuracy", "linear_probe", "retrieval", "mean_iou")


def metric_path(name: str) -> str:
    """Folder of the packaged `evaluate` module `name` (one of `METRICS`), for `evaluate.load(path)`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; hf_distill ships {METRICS}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", name)


__all__ = [
    "METRICS",
    "EvalDataset",
    "FeatureSet",
    "dense_linear_probe",
    "evaluate_emulation",
    "evaluate_encoder",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "load_encoder",
    "mean_iou",
    "multi_domain_retrieval",
    "metric_path",
    "retrieval_metrics",
]
