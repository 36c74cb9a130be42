"""Evaluation metrics as pure functions on tensors: k-NN, linear probe, UnED retrieval, segmentation."""

import math
import time

import pytest
import torch

from hf_distill.evaluation.knn import knn_accuracy, knn_predict
from hf_distill.evaluation.linear_probe import linear_probe
from hf_distill.evaluation.retrieval import retrieval_metrics
from hf_distill.evaluation.segmentation import dense_linear_probe, mean_iou

# ----------------------------------------------------------------------------------------------------------- k-NN


def reference_knn(train, labels, queries, k, temperature, num_classes, exclude_self=False):
    """Brute force: full similarity matrix, neighbours sorted one query at a time, weighted votes in Python floats."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    queries = queries.double() / queries.double().norm(dim=1, keepdim=True)
    similarity = (queries @ train.T).tolist()
    labels = labels.tolist()
    predictions = []
    for i, row in enumerate(similarity):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        if exclude_self:
            order = [j for j in order if j != i]
        votes = [0.0] * num_classes
        for j in order[:k]:
            votes[labels[j]] += math.exp(row[j] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: votes[c]))  # first maximum, like argmax
    return predictions


@pytest.fixture(scope="module")
def knn_data():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=generator)
    train_labels = torch.randint(0, 5, (200,), generator=generator)
    query_labels = torch.randint(0, 5, (50,), generator=generator)
    train = centers[train_labels] + 1.5 * torch.randn(200, 16, generator=generator)
    queries = centers[query_labels] + 1.5 * torch.randn(50, 16, generator=generator)
    return train, train_labels, queries, query_labels


@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_knn_matches_brute_force(knn_data, chunk_size, temperature):
    train, train_labels, queries, _ = knn_data
    ks = (1, 5, 20, 300)  # 300 > N = 200: clamped to all training items
    predictions = knn_predict(train, train_labels, queries, k=ks, temperature=temperature, chunk_size=chunk_size)
    assert set(predictions) == set(ks)
    for k in ks:
        assert predictions[k].dtype == torch.int64 and predictions[k].shape == (50,)
        assert predictions[k].tolist() == reference_knn(train, train_labels, queries, k, temperature, 5), k
    assert not torch.equal(predictions[1], predictions[20])  # the k values really differ on this data
    # an int k gives a one-entry dict; extra (empty) classes are never predicted
    single = knn_predict(
        train, train_labels, queries, k=20, temperature=temperature, chunk_size=chunk_size, num_classes=7
    )
    assert list(single) == [20] and torch.equal(single[20], predictions[20])


def test_knn_k_larger_than_index_is_all_neighbours(knn_data):
    train, train_labels, queries, _ = knn_data
    predictions = knn_predict(train, train_labels, queries, k=(200, 10_000))
    assert torch.equal(predictions[200], predictions[10_000])


def test_knn_exclude_self(knn_data):
    train, train_labels, _, _ = knn_data
    with_self = knn_predict(train, train_labels, train, k=1, chunk_size=64)[1]
    assert torch.equal(with_self, train_labels)  # each item is its own nearest neighbour
    loo = knn_predict(train, train_labels, train, k=(1, 10), chunk_size=64, exclude_self=True)
    for k in (1, 10):
        assert loo[k].tolist() == reference_knn(train, train_labels, train, k, 0.07, 5, exclude_self=True)
    assert not torch.equal(loo[1], train_labels)
    # k = N is clamped to the N - 1 other items
    assert torch.equal(
        knn_predict(train, train_labels, train, k=200, exclude_self=True)[200],
        knn_predict(train, train_labels, train, k=199, exclude_self=True)[199],
    )


def test_knn_accuracy_on_separated_clusters():
    generator = torch.Generator().manual_seed(1)
    centers = 10 * torch.eye(6, 32)
    train_labels = torch.arange(300) % 6
    test_labels = torch.arange(90) % 6
    train = centers[train_labels] + 0.5 * torch.randn(300, 32, generator=generator)
    test = centers[test_labels] + 0.5 * torch.randn(90, 32, generator=generator)
    result = knn_accuracy(train, train_labels, test, test_labels, chunk_size=16)
    assert result == {"knn_top1@10": 100.0, "knn_top1@20": 100.0, "knn_top1@100": 100.0, "knn_top1@200": 100.0}
    # wrong labels for the test split -> 0 %
    assert knn_accuracy(train, train_labels, test, (test_labels + 1) % 6, k=10) == {"knn_top1@10": 0.0}
    # half-precision features are accepted
    assert knn_accuracy(train.half(), train_labels, test.half(), test_labels, k=10) == {"knn_top1@10": 100.0}


def test_knn_validation_errors(knn_data):
    train, train_labels, queries, query_labels = knn_data
    with pytest.raises(ValueError, match="`train_labels` has 199 entries but `train_features` has 200 rows"):
        knn_predict(train, train_labels[:-1], queries)
    with pytest.raises(ValueError, match="`test_labels` has 49 entries but `test_features` has 50 rows"):
        knn_accuracy(train, train_labels, queries, query_labels[:-1])
    with pytest.raises(ValueError, match="dimension 8 but `train_features` has dimension 16"):
        knn_predict(train, train_labels, queries[:, :8])
    with pytest.raises(ValueError, match="integer class ids"):
        knn_predict(train, train_labels.float(), queries)
    with pytest.raises(ValueError, match="shape \\(num_items, dim\\)"):
        knn_predict(train[0], train_labels, queries)
    with pytest.raises(ValueError, match="exclude_self"):
        knn_predict(train, train_labels, queries, exclude_self=True)
    with pytest.raises(ValueError, match="`k` values must be positive"):
        knn_predict(train, train_labels, queries, k=(10, 0))
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(train, train_labels, queries, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, train_labels, queries, temperature=0.0)


# ------------------------------------------------------------------------------------------------------ retrieval


def reference_retrieval(features, labels, domains, queries, k):
    """Brute force with Python loops: full similarity matrix, one query at a time."""
    features = features.double() / features.double().norm(dim=1, keepdim=True)
    similarity = (features @ features.T).tolist()
    labels, domains = labels.tolist(), domains.tolist()
    n = len(labels)
    hits, precisions, skipped = {}, {}, 0
    for q in queries:
        positives = {j for j in range(n) if j != q and labels[j] == labels[q] and domains[j] == domains[q]}
        if not positives:
            skipped += 1
            continue
        ranked = sorted((j for j in range(n) if j != q), key=lambda j: -similarity[q][j])[:k]
        hits.setdefault(domains[q], []).append(float(ranked[0] in positives))
        precisions.setdefault(domains[q], []).append(sum(j in positives for j in ranked) / min(len(positives), k))
    per_domain = {
        str(d): {
            "R@1": 100 * sum(hits[d]) / len(hits[d]),
            f"mMP@{k}": 100 * sum(precisions[d]) / len(precisions[d]),
            "num_queries": len(hits[d]),
        }
        for d in sorted(hits)
    }
    mean = {key: sum(v[key] for v in per_domain.values()) / len(per_domain) for key in ("R@1", f"mMP@{k}")}
    return {"per_domain": per_domain, "mean": mean, "skipped_queries": skipped}


def assert_retrieval_close(result, expected):
    assert result["skipped_queries"] == expected["skipped_queries"]
    assert list(result["per_domain"]) == list(expected["per_domain"])
    for name, values in expected["per_domain"].items():
        assert result["per_domain"][name]["num_queries"] == values["num_queries"]
        for key in values:
            assert result["per_domain"][name][key] == pytest.approx(values[key], abs=1e-9), (name, key)
    assert result["mean"] == pytest.approx(expected["mean"], abs=1e-9)


@pytest.fixture(scope="module")
def retrieval_data():
    """3 domains reusing the same label ids; features depend mostly on the label, so the domain check matters.
    Group sizes vary from 1 (no positive: skipped) to well above 5."""
    generator = torch.Generator().manual_seed(0)
    n = 150
    domains = torch.randint(0, 3, (n,), generator=generator)
    labels = (torch.rand(n, generator=generator) ** 2 * 12).long()  # skewed: small labels are frequent
    label_centers = torch.randn(12, 24, generator=generator)
    domain_shift = 0.5 * torch.randn(3, 24, generator=generator)
    features = label_centers[labels] + domain_shift[domains] + 0.6 * torch.randn(n, 24, generator=generator)
    return features, labels, domains


def test_retrieval_matches_brute_force(retrieval_data):
    features, labels, domains = retrieval_data
    pair_sizes = torch.unique(torch.stack([domains, labels], 1), dim=0, return_counts=True)[1]
    assert (pair_sizes == 1).any() and ((pair_sizes > 1) & (pair_sizes < 6)).any() and (pair_sizes > 6).any()
    expected = reference_retrieval(features, labels, domains, range(len(labels)), k=5)
    assert expected["skipped_queries"] > 0
    for chunk_size in (1, 7, 4096):
        result = retrieval_metrics(features, labels, domains, chunk_size=chunk_size)
        assert_retrieval_close(result, expected)
        assert set(result["mean"]) == {"R@1", "mMP@5"}
    # other cut-off
    assert_retrieval_close(
        retrieval_metrics(features, labels, domains, k=3, chunk_size=10),
        reference_retrieval(features, labels, domains, range(len(labels)), k=3),
    )
    # ignoring the domain (a single domain) gives other numbers: same-label items of other domains are wrong hits
    merged = retrieval_metrics(features, labels, torch.zeros_like(domains))
    assert merged["mean"]["R@1"] != pytest.approx(expected["mean"]["R@1"])


def test_retrieval_query_mask_and_names(retrieval_data):
    features, labels, domains = retrieval_data
    query_mask = torch.arange(len(labels)) % 3 != 0
    expected = reference_retrieval(features, labels, domains, query_mask.nonzero().flatten().tolist(), k=5)
    names = ["photos", "sketches", "paintings"]
    result = retrieval_metrics(features, labels, domains, query_mask=query_mask, chunk_size=16, domain_names=names)
    expected["per_domain"] = {names[int(key)]: value for key, value in expected["per_domain"].items()}
    assert_retrieval_close(result, expected)
    # the index stays all items: a query's nearest neighbour may be a non-query item
    full = retrieval_metrics(features, labels, domains)
    assert result["per_domain"]["photos"]["num_queries"] < full["per_domain"]["0"]["num_queries"]


def test_retrieval_hand_computed():
    # unit vectors at these angles: cosine similarity decreases with the angle between them
    angles = torch.tensor([0.0, 3.0, 7.0, 10.0, 40.0, 180.0, 20.0])
    #                       A    B    C    D     E     F      G
    domains = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    labels = torch.tensor([0, 0, 1, 0, 0, 1, 0])
    radians = torch.deg2rad(angles)
    features = 3.0 * torch.stack([radians.cos(), radians.sin()], dim=1)  # not unit norm: normalized inside
    # groups: d0/l0 = {A, B, G}, d0/l1 = {C} (skipped), d1/l0 = {D, E}, d1/l1 = {F} (skipped); k = 2
    # A: B, C -> R@1 1, MP 1/2 | B: A, C -> 1, 1/2 | G: D, C -> 0, 0/2 | D: C, B -> 0, 0/1 | E: G, D -> 0, 1/1
    result = retrieval_metrics(features, labels, domains, k=2, domain_names=["photos", "sketches"])
    assert result["skipped_queries"] == 2
    assert result["per_domain"]["photos"] == pytest.approx({"R@1": 200 / 3, "mMP@2": 100 / 3, "num_queries": 3})
    assert result["per_domain"]["sketches"] == pytest.approx({"R@1": 0.0, "mMP@2": 50.0, "num_queries": 2})
    assert result["mean"] == pytest.approx({"R@1": 100 / 3, "mMP@2": (100 / 3 + 50) / 2})
    # only A and E as queries
    mask = torch.tensor([True, False, False, False, True, False, False])
    result = retrieval_metrics(features, labels, domains, query_mask=mask, k=2, chunk_size=1)
    assert result["per_domain"] == {
        "0": {"R@1": 100.0, "mMP@2": 50.0, "num_queries": 1},
        "1": {"R@1": 0.0, "mMP@2": 100.0, "num_queries": 1},
    }
    assert result["skipped_queries"] == 0
    # only queries without positives: nothing evaluated
    none = retrieval_metrics(features, labels, domains, query_mask=torch.tensor([False, False, True] + [False] * 4))
    assert none["per_domain"] == {} and none["skipped_queries"] == 1 and math.isnan(none["mean"]["R@1"])


def test_retrieval_scales_to_a_large_index():
    generator = torch.Generator().manual_seed(0)
    n = 100_000
    features = torch.randn(n, 64, generator=generator)
    labels = torch.randint(0, 5000, (n,), generator=generator)
    domains = torch.randint(0, 4, (n,), generator=generator)
    query_mask = torch.zeros(n, dtype=torch.bool)
    query_mask[torch.randperm(n, generator=generator)[:2000]] = True
    start = time.perf_counter()
    result = retrieval_metrics(features, labels, domains, query_mask=query_mask, chunk_size=2048)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    assert sum(v["num_queries"] for v in result["per_domain"].values()) + result["skipped_queries"] == 2000
    assert len(result["per_domain"]) == 4
    assert all(math.isfinite(value) for value in result["mean"].values())
    assert result["mean"]["R@1"] < 5  # random features: hits are rare


def test_retrieval_validation_errors(retrieval_data):
    features, labels, domains = retrieval_data
    with pytest.raises(ValueError, match="`labels` has 149 entries but `features` has 150 rows"):
        retrieval_metrics(features, labels[:-1], domains)
    with pytest.raises(ValueError, match="`domains` has 10 entries"):
        retrieval_metrics(features, labels, domains[:10])
    with pytest.raises(ValueError, match="`query_mask` has shape \\(3,\\)"):
        retrieval_metrics(features, labels, domains, query_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        retrieval_metrics(features, labels, domains, query_mask=torch.ones(150))
    with pytest.raises(ValueError, match="`domain_names` has 2 names"):
        retrieval_metrics(features, labels, domains, domain_names=["a", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        retrieval_metrics(features, labels, domains - 1)


# --------------------------------------------------------------------------------------------------- linear probe


def blobs(num_train, num_test, num_classes, dim, seed, spread=4.0):
    generator = torch.Generator().manual_seed(seed)
    centers = spread * torch.randn(num_classes, dim, generator=generator)
    train_labels = torch.randint(0, num_classes, (num_train,), generator=generator)
    test_labels = torch.randint(0, num_classes, (num_test,), generator=generator)
    train = centers[train_labels] + torch.randn(num_train, dim, generator=generator)
    test = centers[test_labels] + torch.randn(num_test, dim, generator=generator)
    return train, train_labels, test, test_labels


def test_linear_probe_separable_blobs():
    train, train_labels, test, test_labels = blobs(600, 300, 5, 32, seed=0)
    result = linear_probe(train, train_labels, test, test_labels, max_iter=100)
    assert set(result) == {"linear_top1", "weight_decay", "val_top1"}
    assert result["linear_top1"] >= 99.0 and result["val_top1"] >= 99.0
    assert result["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    again = linear_probe(train, train_labels, test, test_labels, max_iter=100)
    assert again == result  # deterministic given the seed
    raw = linear_probe(train, train_labels, test, test_labels, weight_decays=[1e-3], max_iter=100, standardize=False)
    assert raw["weight_decay"] == 1e-3 and raw["linear_top1"] >= 99.0


def test_linear_probe_random_labels_is_chance():
    generator = torch.Generator().manual_seed(3)
    train, test = torch.randn(800, 32, generator=generator), torch.randn(400, 32, generator=generator)
    train_labels = torch.randint(0, 5, (800,), generator=generator)
    test_labels = torch.randint(0, 5, (400,), generator=generator)
    result = linear_probe(train, train_labels, test, test_labels, weight_decays=(1e-4, 1e-2), max_iter=50, seed=1)
    assert 10.0 < result["linear_top1"] < 32.0  # chance is 20 %
    assert result["weight_decay"] in (1e-4, 1e-2)


def test_linear_probe_accepts_inference_tensors():
    train, train_labels, test, test_labels = blobs(200, 100, 3, 8, seed=2)
    with torch.inference_mode():
        train, train_labels, test, test_labels = (t.clone() for t in (train, train_labels, test, test_labels))
    with torch.no_grad():
        result = linear_probe(train, train_labels, test, test_labels, weight_decays=(1e-3,), max_iter=30)
    assert result["linear_top1"] >= 95.0


def test_linear_probe_validation_errors():
    train, train_labels, test, test_labels = blobs(50, 20, 3, 8, seed=0)
    with pytest.raises(ValueError, match="`train_labels` has 49 entries but `train_features` has 50 rows"):
        linear_probe(train, train_labels[:-1], test, test_labels)
    with pytest.raises(ValueError, match="`test_labels` has 21 entries"):
        linear_probe(train, train_labels, test, torch.cat([test_labels, test_labels[:1]]))
    with pytest.raises(ValueError, match="dimension 4 but `train_features` has dimension 8"):
        linear_probe(train, train_labels, test[:, :4], test_labels)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(train, train_labels, test, test_labels, val_fraction=1.0)
    with pytest.raises(ValueError, match="weight_decays"):
        linear_probe(train, train_labels, test, test_labels, weight_decays=[])


# --------------------------------------------------------------------------------------------------- segmentation


def test_mean_iou_hand_computed():
    predictions = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    targets = torch.tensor([[[0, 1, 1], [1, 255, 3]]])
    # valid pixels (target, prediction): (0,0) (1,0) (1,1) (1,1) (3,2); the ignored pixel's prediction 2 is not counted
    # IoU: class 0 = 1 / (2 + 1 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 0 / 1, class 3 = 0 / 1, class 4 absent
    result = mean_iou(predictions, targets, num_classes=5)
    expected_iou = [50.0, 200 / 3, 0.0, 0.0]
    assert result["per_class_iou"][:4] == pytest.approx(expected_iou)
    assert math.isnan(result["per_class_iou"][4])
    assert result["mIoU"] == pytest.approx(sum(expected_iou) / 4)
    assert result["pixel_accuracy"] == pytest.approx(60.0)
    perfect = mean_iou(targets.clamp(max=3), targets, num_classes=4)
    assert perfect["mIoU"] == 100.0 and perfect["pixel_accuracy"] == 100.0


def test_mean_iou_validation_errors():
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="`predictions` has shape \\(2, 4, 3\\) but `targets` has shape"):
        mean_iou(torch.zeros(2, 4, 3, dtype=torch.long), targets, num_classes=2)
    with pytest.raises(ValueError, match="class id 7"):
        mean_iou(targets, targets + 7, num_classes=2)
    with pytest.raises(ValueError, match="predictions"):
        mean_iou(targets + 5, targets, num_classes=2)


def synthetic_segmentation(num_images, num_classes, dim, seed, grid=4, patch=4):
    """Each patch region has one class; its token is the one-hot of that class plus noise. Some pixels ignored."""
    generator = torch.Generator().manual_seed(seed)
    patch_classes = torch.randint(0, num_classes, (num_images, grid // 2, grid // 2), generator=generator)
    patch_classes = patch_classes.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x2-patch blobs
    features = torch.zeros(num_images, grid, grid, dim)
    features[..., :num_classes] = 2.0 * torch.nn.functional.one_hot(patch_classes, num_classes).float()
    features += 0.3 * torch.randn(features.shape, generator=generator)
    masks = patch_classes.repeat_interleave(patch, 1).repeat_interleave(patch, 2).clone()
    masks[:, 0, :] = 255
    return features, masks


def test_dense_linear_probe_learns_synthetic_task():
    train_x, train_y = synthetic_segmentation(48, 4, 12, seed=0)
    test_x, test_y = synthetic_segmentation(16, 4, 12, seed=1)
    result = dense_linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=15, lr=0.05, batch_size=8)
    assert set(result) == {"mIoU", "pixel_accuracy", "per_class_iou"} and len(result["per_class_iou"]) == 4
    assert result["mIoU"] > 85.0 and result["pixel_accuracy"] > 90.0
    again = dense_linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=15, lr=0.05, batch_size=8)
    assert again == result  # deterministic given the seed
    # an untrained head (zero epochs are not allowed; one tiny step) is far worse
    weak = dense_linear_probe(train_x, train_y, test_x, test_y, num_classes=4, epochs=1, lr=1e-5, batch_size=64)
    assert weak["mIoU"] < result["mIoU"] - 30


def test_dense_linear_probe_validation_errors():
    train_x, train_y = synthetic_segmentation(4, 3, 6, seed=0)
    with pytest.raises(ValueError, match="`train_patch_features` has 4 images but `train_masks` has 3"):
        dense_linear_probe(train_x, train_y[:3], train_x, train_y, num_classes=3)
    with pytest.raises(ValueError, match="`test_patch_features` has dimension 5"):
        dense_linear_probe(train_x, train_y, train_x[..., :5], train_y, num_classes=3)
    with pytest.raises(ValueError, match="shape \\(num_images, h, w, dim\\)"):
        dense_linear_probe(train_x[0], train_y, train_x, train_y, num_classes=3)
    with pytest.raises(ValueError, match="class id 2, outside \\[0, 2\\)"):
        dense_linear_probe(train_x, train_y, train_x, train_y, num_classes=2)
