"""Linear probe on frozen features: multinomial logistic regression trained full-batch with L-BFGS.

The L2 regularization strength is chosen on a held-out part of the training split; the probe is then retrained on the
whole training split with the chosen value and evaluated once on the test split. Pure torch (no scikit-learn).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .knn import _check_features, _check_labels

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class LinearProbeFit:
    """A fitted linear probe: logits = `((features - mean) / std) @ weight + bias`.

    Args:
        weight (`torch.Tensor` of shape `(D, C)`), bias (`(C,)`), mean and std (`(D,)`): the head and the feature
            standardization it was fitted with (zeros / ones without standardization).
        test_top1, val_top1 (`float`): accuracies in percent on the test split and on the held-out validation part.
        weight_decay (`float`): the chosen L2 strength.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    test_top1: float
    weight_decay: float
    val_top1: float


def _standardizer(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features are only centred


def _fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize `mean cross-entropy + weight_decay * ||W||^2` (bias unregularized) with L-BFGS; returns `(W, b)`."""
    dim = features.shape[1]
    if init is None:
        weight = torch.zeros(dim, num_classes, dtype=features.dtype)
        bias = torch.zeros(num_classes, dtype=features.dtype)
    else:
        weight, bias = (tensor.detach().clone() for tensor in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _top1(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    predictions = (features @ weight + bias).argmax(dim=1)
    return 100.0 * (predictions == labels).double().mean().item()


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
    standardize: bool = True,
) -> LinearProbeFit:
    """Multinomial logistic regression on frozen features, regularization chosen on a held-out validation split.

    The objective is `mean cross-entropy + weight_decay * ||W||^2` (the bias is not regularized), minimized full-batch
    with `torch.optim.LBFGS` (strong-Wolfe line search, at most `max_iter` iterations). A seeded random
    `val_fraction` of the training split is held out; every candidate weight decay is fitted on the rest (from the
    strongest to the weakest, each warm-started from the previous solution) and scored on the held-out part. The best
    one (ties go to the stronger regularization) is refitted from scratch on the whole training split and evaluated on
    the test split. With `standardize`, features are standardized with the mean / std of the data each model is fitted
    on. Deterministic given `seed`; the global RNG is not touched.

    Args:
        train_features (`torch.Tensor` of shape `(N, D)`): training features (computed in float32, or float64 when
            given float64).
        train_labels (`torch.Tensor` of shape `(N,)`): int64 class ids of the training items.
        test_features (`torch.Tensor` of shape `(M, D)`): test features.
        test_labels (`torch.Tensor` of shape `(M,)`): int64 class ids of the test items.
        weight_decays (sequence of `float`): candidate L2 strengths (`>= 0`).
        val_fraction (`float`): fraction of the training split held out to choose the weight decay, in `(0, 1)`.
        max_iter (`int`): maximum number of L-BFGS iterations per fit.
        seed (`int`): seed of the train / validation split.
        standardize (`bool`): standardize the features before fitting.

    Returns:
        [`LinearProbeFit`]: the fitted head (applied as `((features - mean) / std) @ weight + bias`) and its scores.
    """
    train = _check_features(train_features, "train_features")
    train_y = _check_labels(train_labels, train.shape[0], "train_labels", "train_features")
    test = _check_features(test_features, "test_features")
    test_y = _check_labels(test_labels, test.shape[0], "test_labels", "test_features")
    if test.shape[1] != train.shape[1]:
        raise ValueError(
            f"`test_features` has dimension {test.shape[1]} but `train_features` has dimension {train.shape[1]}."
        )
    if test.shape[0] == 0:
        raise ValueError("`test_features` is empty; accuracy is undefined.")
    candidates = [float(value) for value in weight_decays]
    if not candidates or any(not value >= 0 for value in candidates):
        raise ValueError(f"`weight_decays` must be a non-empty sequence of values >= 0, got {weight_decays!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")
    num_train = train.shape[0]
    num_val = int(round(val_fraction * num_train))
    if num_val < 1 or num_val >= num_train:
        raise ValueError(
            f"`val_fraction={val_fraction}` of {num_train} training items leaves {num_val} for validation and "
            f"{num_train - num_val} for fitting; both must be at least 1."
        )
    dtype = torch.promote_types(train.dtype, test.dtype)
    train, test = train.to(dtype), test.to(dtype)
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    def prepare(fit: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
        if not standardize:
            return [fit.clone(), *(other.clone() for other in others)]  # plain tensors even from inference mode
        mean, std = _standardizer(fit)
        return [(tensor - mean) / std for tensor in (fit, *others)]

    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(num_train, generator=generator)
    val_index, fit_index = permutation[:num_val], permutation[num_val:]
    # LBFGS needs autograd even when the caller runs under no_grad / inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        fit_x, val_x = prepare(train[fit_index], train[val_index])
        fit_y, val_y = train_y[fit_index], train_y[val_index]
        best_decay, best_val, params = None, -1.0, None
        for decay in sorted(set(candidates), reverse=True):
            params = _fit(fit_x, fit_y, num_classes, decay, max_iter, init=params)
            val_top1 = _top1(val_x, val_y, *params)
            if val_top1 > best_val:
                best_decay, best_val = decay, val_top1
        if standardize:
            mean, std = _standardizer(train)
        else:
            mean, std = torch.zeros(train.shape[1], dtype=dtype), torch.ones(train.shape[1], dtype=dtype)
        full_x, test_x = prepare(train, test)
        weight, bias = _fit(full_x, train_y.clone(), num_classes, best_decay, max_iter)
        test_top1 = _top1(test_x, test_y, weight, bias)
    return LinearProbeFit(weight, bias, mean, std, test_top1, best_decay, best_val)


def linear_probe(*args, **kwargs) -> dict:
    """[`fit_linear_probe`] (same arguments), scores only.

    Returns:
        `dict`: `{"linear_top1": test accuracy in percent, "weight_decay": the chosen value, "val_top1": validation
        accuracy in percent of the chosen value}`.
    """
    fit = fit_linear_probe(*args, **kwargs)
    return {"linear_top1": fit.test_top1, "weight_decay": fit.weight_decay, "val_top1": fit.val_top1}
