"""Linear probe (logistic regression on frozen features) top-1 accuracy, as an `evaluate` module.

Load it offline by path: `evaluate.load(hf_distill.evaluation.metric_path("linear_probe"))`.
"""

import datasets
import evaluate
import torch

from hf_distill.evaluation.linear_probe import linear_probe

_DESCRIPTION = (
    "Top-1 accuracy (percent) of a multinomial logistic regression fitted on frozen training features, with its L2 "
    "regularization chosen on a held-out part of the training split."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: test feature vectors.
    references: test labels (int).
    train_features, train_labels: the training split.
Returns:
    {"linear_top1": percent, "weight_decay": chosen value, "val_top1": percent on the held-out part}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LinearProbe(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, train_features, train_labels, seed=0):
        return linear_probe(
            torch.as_tensor(train_features, dtype=torch.float32),
            torch.as_tensor(train_labels, dtype=torch.int64),
            torch.as_tensor(predictions, dtype=torch.float32),
            torch.as_tensor(references, dtype=torch.int64),
            seed=seed,
        )
