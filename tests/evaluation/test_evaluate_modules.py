"""The metrics load offline by path with `evaluate.load` and agree with the library functions."""

import evaluate
import pytest
import torch

from hf_distill.evaluation import METRICS, knn_accuracy, linear_probe, mean_iou, metric_path, retrieval_metrics


@pytest.fixture(scope="module")
def blobs():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=generator) * 3
    labels = torch.arange(120) % 4
    features = centers[labels] + torch.randn(120, 8, generator=generator)
    return features, labels


@pytest.mark.parametrize("name", METRICS)
def test_modules_load_offline(name):
    module = evaluate.load(metric_path(name))
    assert isinstance(module, evaluate.Metric)


def test_knn_module_matches_function(blobs):
    features, labels = blobs
    module = evaluate.load(metric_path("knn_accuracy"))
    result = module.compute(
        predictions=features[80:].tolist(), references=labels[80:].tolist(),
        train_features=features[:80], train_labels=labels[:80], k=[5, 20],
    )  # fmt: skip
    assert result == knn_accuracy(features[:80], labels[:80], features[80:], labels[80:], k=[5, 20])


def test_linear_probe_module_matches_function(blobs):
    features, labels = blobs
    module = evaluate.load(metric_path("linear_probe"))
    result = module.compute(
        predictions=features[80:].tolist(), references=labels[80:].tolist(),
        train_features=features[:80], train_labels=labels[:80],
    )  # fmt: skip
    assert result["linear_top1"] == linear_probe(features[:80], labels[:80], features[80:], labels[80:])["linear_top1"]


def test_retrieval_module_matches_function(blobs):
    features, labels = blobs
    domains = (torch.arange(120) // 60).tolist()
    module = evaluate.load(metric_path("retrieval"))
    result = module.compute(predictions=features.tolist(), references=labels.tolist(), domains=domains)
    expected = retrieval_metrics(features, labels, torch.tensor(domains))
    assert result["R@1"] == expected["mean"]["R@1"] and result["mMP@5"] == expected["mean"]["mMP@5"]


def test_mean_iou_module_matches_function():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 3, (2, 6, 6), generator=generator)
    references = torch.randint(0, 3, (2, 6, 6), generator=generator)
    module = evaluate.load(metric_path("mean_iou"))
    result = module.compute(predictions=predictions.tolist(), references=references.tolist(), num_classes=3)
    assert result["mIoU"] == pytest.approx(mean_iou(predictions, references, num_classes=3)["mIoU"])


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="ships"):
        metric_path("accuracy")
