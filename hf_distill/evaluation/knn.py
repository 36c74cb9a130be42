"""Weighted k-nearest-neighbour classification on frozen features (the DINO / UNIC k-NN protocol).

Features are L2-normalized and compared by cosine similarity. Each query looks up its `max(k)` most similar training
items; a neighbour votes for its class with weight `exp(similarity / temperature)` and the class with the largest sum
of votes is the prediction. Queries are processed in chunks so that memory stays `O(chunk_size * N)`.
"""

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)


def _check_features(features, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(features).__name__}.")
    if features.ndim != 2:
        raise ValueError(f"`{name}` must have shape (num_items, dim), got shape {tuple(features.shape)}.")
    if not (features.is_floating_point() or features.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"`{name}` must hold real numbers, got dtype {features.dtype}.")
    # float64 stays float64; half, bfloat16 and integer features are computed in float32
    return features.to(torch.promote_types(features.dtype, torch.float32))


def _check_labels(labels, length: int, name: str, features_name: str) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must have shape (num_items,), got shape {tuple(labels.shape)}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must hold integer class ids (int64), got dtype {labels.dtype}.")
    if labels.shape[0] != length:
        raise ValueError(
            f"`{name}` has {labels.shape[0]} entries but `{features_name}` has {length} rows; they must match."
        )
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"`{name}` must hold non-negative class ids, found {int(labels.min())}.")
    return labels


def _check_ks(k) -> tuple[int, ...]:
    ks = [k] if not isinstance(k, Sequence) else list(k)
    if not ks:
        raise ValueError("`k` must be a positive int or a non-empty sequence of positive ints.")
    checked = []
    for value in ks:
        if isinstance(value, bool):
            raise ValueError(f"`k` values must be positive ints, got {value!r}.")
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"`k` values must be positive ints, got {value!r}.") from None
        if value < 1:
            raise ValueError(f"`k` values must be positive ints, got {value}.")
        if value not in checked:
            checked.append(value)
    return tuple(checked)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int | Sequence[int] = DEFAULT_KS,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict[int, torch.Tensor]:
    """Weighted k-NN predictions (DINO / UNIC protocol).

    Args:
        train_features (`torch.Tensor` of shape `(N, D)`): features of the labelled index (any real dtype; computed
            in float32, or float64 when given float64).
        train_labels (`torch.Tensor` of shape `(N,)`): integer (int64) class ids, non-negative.
        query_features (`torch.Tensor` of shape `(M, D)`): features to classify.
        k (`int` or sequence of `int`): number(s) of neighbours. A `k` larger than the number of available
            neighbours (`N`, or `N - 1` with `exclude_self`) is clamped to it.
        temperature (`float`): neighbour weights are `exp(cosine_similarity / temperature)`. (They are computed
            relative to each query's best similarity, which scales every vote of a query by the same factor and so
            leaves the prediction unchanged while avoiding overflow at small temperatures.)
        num_classes (`int`, *optional*): number of classes; defaults to `max(train_labels) + 1`.
        chunk_size (`int`): number of queries processed at once; memory is `O(chunk_size * N)`.
        exclude_self (`bool`): the query set is the training set (`M == N`, same order); each query's own item is
            removed from its neighbours (leave-one-out).

    Returns:
        `dict[int, torch.Tensor]`: for each requested `k` (as given, before clamping), the predicted class ids of
        the queries, int64 tensor of shape `(M,)`.
    """
    train = _check_features(train_features, "train_features")
    labels = _check_labels(train_labels, train.shape[0], "train_labels", "train_features")
    query = _check_features(query_features, "query_features")
    if query.shape[1] != train.shape[1]:
        raise ValueError(
            f"`query_features` has dimension {query.shape[1]} but `train_features` has dimension {train.shape[1]}."
        )
    ks = _check_ks(k)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    num_items, num_queries = train.shape[0], query.shape[0]
    if exclude_self and num_queries != num_items:
        raise ValueError(
            f"`exclude_self=True` needs the query set to be the training set, but there are {num_queries} queries "
            f"and {num_items} training items."
        )
    available = num_items - 1 if exclude_self else num_items
    if available < 1:
        raise ValueError(f"k-NN needs at least one neighbour, but the index has {num_items} item(s).")
    max_label = int(labels.max()) if num_items else -1
    if num_classes is None:
        num_classes = max_label + 1
    elif num_classes <= max_label:
        raise ValueError(f"`num_classes` is {num_classes} but `train_labels` holds class id {max_label}.")

    dtype = torch.promote_types(train.dtype, query.dtype)
    index = F.normalize(train.to(dtype), dim=1)
    max_k = min(max(ks), available)
    predictions = {value: torch.empty(num_queries, dtype=torch.long) for value in ks}
    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        similarity = F.normalize(query[start:end].to(dtype), dim=1) @ index.T  # (c, N)
        if exclude_self:
            rows = torch.arange(end - start)
            similarity[rows, rows + start] = float("-inf")
        top_similarity, top_index = similarity.topk(max_k, dim=1)  # sorted, most similar first
        del similarity
        weights = ((top_similarity - top_similarity[:, :1]) / temperature).exp()
        neighbour_labels = labels[top_index]
        for value in ks:
            used = min(value, available)
            scores = weights.new_zeros(end - start, num_classes)
            scores.scatter_add_(1, neighbour_labels[:, :used], weights[:, :used])
            predictions[value][start:end] = scores.argmax(dim=1)
    return predictions


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int | Sequence[int] = DEFAULT_KS,
    **options,
) -> dict[str, float]:
    """Top-1 accuracy of the weighted k-NN classifier of [`knn_predict`].

    Args:
        train_features (`torch.Tensor` of shape `(N, D)`): features of the labelled index.
        train_labels (`torch.Tensor` of shape `(N,)`): int64 class ids of the index.
        test_features (`torch.Tensor` of shape `(M, D)`): features to classify.
        test_labels (`torch.Tensor` of shape `(M,)`): int64 ground-truth class ids of the test items.
        k (`int` or sequence of `int`): number(s) of neighbours, see [`knn_predict`].
        options: `temperature`, `num_classes`, `chunk_size`, `exclude_self` of [`knn_predict`].

    Returns:
        `dict[str, float]`: `{"knn_top1@{k}": accuracy in percent (0..100)}` for each requested `k`.
    """
    test = _check_features(test_features, "test_features")
    targets = _check_labels(test_labels, test.shape[0], "test_labels", "test_features")
    if test.shape[0] == 0:
        raise ValueError("`test_features` is empty; accuracy is undefined.")
    predictions = knn_predict(train_features, train_labels, test, k=k, **options)
    return {
        f"knn_top1@{value}": 100.0 * (predicted == targets).double().mean().item()
        for value, predicted in predictions.items()
    }
