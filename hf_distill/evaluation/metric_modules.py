"""What the `evaluate` modules shipped under `metrics/` share: their `MetricInfo` and the conversion of their inputs
to the tensors of the library functions they wrap. Load a module offline by path with
`evaluate.load(hf_distill.evaluation.metric_path(name))`."""

import datasets
import evaluate
import torch

FEATURE_VECTORS = datasets.Features(
    {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
)
"""Inputs of the feature metrics: one feature vector and one integer label per query."""


def metric_info(
    description: str, inputs_description: str, citation: str = "", features: datasets.Features = FEATURE_VECTORS
) -> evaluate.MetricInfo:
    """The `MetricInfo` of a packaged module (feature vectors and integer labels unless `features` says otherwise)."""
    return evaluate.MetricInfo(
        description=description, citation=citation, inputs_description=inputs_description, features=features
    )


def split_tensors(train_features, train_labels, features, labels) -> tuple[torch.Tensor, ...]:
    """A labelled training split and labelled queries as float32 features and int64 labels, in that order."""
    return (
        torch.as_tensor(train_features, dtype=torch.float32),
        torch.as_tensor(train_labels, dtype=torch.int64),
        torch.as_tensor(features, dtype=torch.float32),
        torch.as_tensor(labels, dtype=torch.int64),
    )
