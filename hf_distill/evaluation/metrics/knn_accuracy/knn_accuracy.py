"""k-NN classification accuracy of frozen features (DINO / UNIC protocol), as an `evaluate` module.

Load it offline by path: `evaluate.load(hf_distill.evaluation.metric_path("knn_accuracy"))`.
"""

import datasets
import evaluate
import torch

from hf_distill.evaluation.knn import knn_accuracy

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
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, train_features, train_labels, k=(10, 20, 100, 200), temperature=0.07):
        return knn_accuracy(
            torch.as_tensor(train_features, dtype=torch.float32),
            torch.as_tensor(train_labels, dtype=torch.int64),
            torch.as_tensor(predictions, dtype=torch.float32),
            torch.as_tensor(references, dtype=torch.int64),
            k=k,
            temperature=temperature,
        )
