"""UnED-style universal retrieval (R@1, mMP@5 over one index merged across domains), as an `evaluate` module."""

import evaluate
import torch

from hf_distill.evaluation.metric_modules import metric_info
from hf_distill.evaluation.retrieval import retrieval_metrics

_DESCRIPTION = (
    "Every item queries one index merged over all domains (itself excluded); a neighbour is correct when it has the "
    "query's label AND domain. R@1 and mMP@5 (correct in top 5 / min(positives, 5)) per domain and averaged."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: embedding vectors of all items (index and queries).
    references: labels (int), compared within a domain.
    domains: domain id (int) of every item.
    k: cut-off of mMP@k (default 5).
Returns:
    {"R@1": mean over domains, "mMP@5": mean over domains, "per_domain": {...}, "skipped_queries": int}.
"""
_CITATION = "Ypsilantis et al., Towards Universal Image Embeddings (UnED), ICCV 2023."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, _CITATION)

    def _compute(self, predictions, references, domains, k=5):
        metrics = retrieval_metrics(
            torch.as_tensor(predictions, dtype=torch.float32),
            torch.as_tensor(references, dtype=torch.int64),
            torch.as_tensor(domains, dtype=torch.int64),
            k=k,
        )
        return {**metrics["mean"], "per_domain": metrics["per_domain"], "skipped_queries": metrics["skipped_queries"]}
