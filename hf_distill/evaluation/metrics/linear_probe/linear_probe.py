"""Linear probe (logistic regression on frozen features) top-1 accuracy, as an `evaluate` module."""

import evaluate

from hf_distill.evaluation.linear_probe import linear_probe
from hf_distill.evaluation.metric_modules import metric_info, split_tensors

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
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, train_features, train_labels, seed=0):
        return linear_probe(*split_tensors(train_features, train_labels, predictions, references), seed=seed)
