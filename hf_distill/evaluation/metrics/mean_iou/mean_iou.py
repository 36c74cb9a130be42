"""Mean intersection-over-union of segmentation maps, as an `evaluate` module (works offline, unlike the Hub one)."""

import datasets
import evaluate
import torch

from hf_distill.evaluation.metric_modules import metric_info
from hf_distill.evaluation.segmentation import mean_iou

_LABEL_MAPS = datasets.Features(
    {
        "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
        "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    }
)

_DESCRIPTION = "mIoU and pixel accuracy (percent) from a confusion matrix; classes absent from both maps are skipped."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label maps (2-D lists of int).
    references: ground-truth label maps of the same size.
    num_classes: number of classes.
    ignore_index: label ignored in the references (default 255).
Returns:
    {"mIoU": percent, "pixel_accuracy": percent, "per_class_iou": list of percent}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, features=_LABEL_MAPS)

    def _compute(self, predictions, references, num_classes, ignore_index=255):
        return mean_iou(
            torch.as_tensor(predictions, dtype=torch.int64),
            torch.as_tensor(references, dtype=torch.int64),
            num_classes=num_classes,
            ignore_index=ignore_index,
        )
