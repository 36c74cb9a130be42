"""k-NN classification accuracy of frozen features (DINO / UNIC protocol), as an `evaluate` module."""

import evaluate

from hf_distill.evaluation.knn import knn_accuracy
from hf_distill.evaluation.metric_modules import metric_info, split_tensors

_DESCRIPTION = "Temperature-weighted cosine k-NN accuracy (top-1, percent) of query features against a labelled index."
_KWARGS_DESCRIPTION = """
Args:
    predictions: query feature vectors (one list of floats per query).
    references: query labels (int).
    train_features: index feature vectors, `[N, D]`.
    train_labels: index labels, `[N]`.
    k: int or list of ints (default [10, 20, 100, 200]).
    temperature: vote temperature (default 0.07).
Returns:
    {"knn_top1@K": accuracy in percent} for every K.
"""
_CITATION = "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KnnAccuracy(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, train_features, train_labels, k=(10, 20, 100, 200), temperature=0.07):
        split = split_tensors(train_features, train_labels, predictions, references)
        return knn_accuracy(*split, k=k, temperature=temperature)
