"""The `model-index` of a model card: every evaluation protocol its own entry, results that round-trip through
huggingface_hub, numbers and dataset names fit to publish."""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from .provenance import publishable_name


def _plain_number(value: Any) -> Any:
    """Numpy / torch scalars as Python numbers, so that the YAML metadata stays loadable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def yaml_value(value: Any) -> Any:
    """A value that YAML metadata can hold: containers recursively, numbers as Python numbers, others as text."""
    if isinstance(value, dict):
        return {str(key): yaml_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [yaml_value(item) for item in value]
    value = _plain_number(value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _result_key(result: EvalResult) -> tuple:
    """What makes two results "the same measurement": protocol (task type and name), dataset (type, config, split,
    revision) and metric."""
    return (result.task_name, *result.unique_identifier, result.metric_type, result.metric_name, result.metric_config)


def _publishable_result(result: EvalResult) -> EvalResult:
    """`result` with a plain-number value and no local path in its dataset type / name."""
    return dataclasses.replace(
        result,
        metric_value=_plain_number(result.metric_value),
        dataset_type=publishable_name(result.dataset_type),
        dataset_name=publishable_name(result.dataset_name),
    )


def model_index(model_name: str, eval_results: list[EvalResult]) -> list[dict[str, Any]]:
    """The `model-index` of `eval_results`, with one entry per protocol: results are grouped by task name as well as
    by huggingface_hub's own key (task type, dataset type, config, split, revision).

    [`huggingface_hub.repocard_data.eval_results_to_model_index`] groups by that key only, so k-NN and linear-probe
    accuracies on one dataset split would land under the first one's task name; each group here goes through it on
    its own, and [`huggingface_hub.repocard_data.model_index_to_eval_results`] reads the result back unchanged.
    """
    groups: dict[tuple, list[EvalResult]] = defaultdict(list)
    for result in eval_results:
        groups[(result.task_name, *result.unique_identifier)].append(result)
    entries = [eval_results_to_model_index(model_name, results)[0]["results"][0] for results in groups.values()]
    return [{"name": model_name, "results": entries}]


class ProtocolCardData(ModelCardData):
    """[`huggingface_hub.ModelCardData`] whose `model-index` keeps every protocol apart ([`model_index`])."""

    def _to_dict(self, data_dict):
        super()._to_dict(data_dict)
        if self.eval_results is not None:
            data_dict["model-index"] = model_index(self.model_name, self.eval_results)


def validate_card_metadata(card: ModelCard | str | os.PathLike) -> list[EvalResult]:
    """Check a written model card with huggingface_hub's own (offline) metadata checks; returns its results.

    The YAML must parse and load into [`huggingface_hub.ModelCardData`] without errors (`ignore_metadata_errors=False`:
    an invalid `model-index` raises), every `EvalResult` must pass huggingface_hub's checks (required task, dataset and
    metric fields, `model_name` set), and the `model-index` must round-trip exactly through
    `model_index_to_eval_results`. [`huggingface_hub.ModelCard.validate`] needs the Hub's `/api/validate-yaml`; this is
    what can be checked without it.
    """
    if not isinstance(card, ModelCard):
        card = ModelCard.load(card, ignore_metadata_errors=False)
    data = card.data.to_dict()
    results = list(card.data.eval_results or [])
    if "model-index" in data or results:
        name, parsed = model_index_to_eval_results(model_index(card.data.model_name, results))
        if name != card.data.model_name or parsed != results:
            raise ValueError("The model-index does not round-trip through huggingface_hub.")
        ModelCardData(model_name=name, eval_results=parsed, ignore_metadata_errors=False)
    return results


def merge_eval_results(old: Iterable[EvalResult] | None, new: Iterable[EvalResult] | None) -> list[EvalResult]:
    """`old` updated with `new`: a result measuring the same thing replaces the old one in place, others are kept."""
    merged: dict[tuple, EvalResult] = {}
    for result in [*(old or []), *(new or [])]:
        if not isinstance(result, EvalResult):
            raise TypeError(f"eval_results must hold huggingface_hub.EvalResult objects, got {type(result)}.")
        result = _publishable_result(result)
        merged[_result_key(result)] = result
    return list(merged.values())
