"""Semantic segmentation metrics and the DINOv2-style linear probe on frozen patch tokens."""

import torch
import torch.nn.functional as F

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_masks(masks, name: str, num_classes: int, ignore_index: int) -> torch.Tensor:
    if not isinstance(masks, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(masks).__name__}.")
    if masks.ndim != 3:
        raise ValueError(f"`{name}` must have shape (num_images, height, width), got shape {tuple(masks.shape)}.")
    if masks.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"`{name}` must hold integer class ids (int64), got dtype {masks.dtype}.")
    masks = masks.long()
    invalid = (masks != ignore_index) & ((masks < 0) | (masks >= num_classes))
    if invalid.any():
        value = int(masks[invalid][0])
        raise ValueError(
            f"`{name}` holds class id {value}, outside [0, {num_classes}) and not the ignore_index {ignore_index}."
        )
    return masks


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")


def _confusion(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """`(num_classes, num_classes)` int64 confusion matrix, rows = target class, columns = predicted class."""
    valid = targets != ignore_index
    pairs = targets[valid] * num_classes + predictions[valid]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _metrics_from_confusion(confusion: torch.Tensor) -> dict:
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - intersection
    iou = intersection / union  # nan for classes absent from both predictions and targets
    total = confusion.sum()
    pixel_accuracy = 100.0 * float(intersection.sum() / total) if total > 0 else float("nan")
    return {
        "mIoU": 100.0 * float(iou.nanmean()),
        "pixel_accuracy": pixel_accuracy,
        "per_class_iou": (100.0 * iou).tolist(),
    }


def mean_iou(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = 255) -> dict:
    """Mean intersection over union from a confusion matrix (same conventions as `evaluate`'s `mean_iou`).

    Pixels whose target is `ignore_index` are left out. A class absent from both the predictions and the targets
    (empty union) has IoU `nan` and is excluded from the mean.

    Args:
        predictions (`torch.Tensor` of shape `(M, H, W)`): predicted class ids in `[0, num_classes)`.
        targets (`torch.Tensor` of shape `(M, H, W)`): ground-truth class ids in `[0, num_classes)` or `ignore_index`.
        num_classes (`int`): number of classes.
        ignore_index (`int`): target value of pixels to ignore.

    Returns:
        `dict`: `{"mIoU": %, "pixel_accuracy": %, "per_class_iou": list of num_classes IoUs in % (nan when absent)}`.
    """
    _check_num_classes(num_classes)
    targets = _check_masks(targets, "targets", num_classes, ignore_index)
    if not isinstance(predictions, torch.Tensor) or predictions.dtype not in _INTEGER_DTYPES:
        raise ValueError("`predictions` must be an integer torch.Tensor of class ids.")
    if predictions.shape != targets.shape:
        raise ValueError(
            f"`predictions` has shape {tuple(predictions.shape)} but `targets` has shape {tuple(targets.shape)}."
        )
    predictions = predictions.long()
    scored = predictions[targets != ignore_index]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= num_classes):
        raise ValueError(f"`predictions` must hold class ids in [0, {num_classes}).")
    return _metrics_from_confusion(_confusion(predictions, targets, num_classes, ignore_index))


def _check_patch_features(features, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(features).__name__}.")
    if features.ndim != 4:
        raise ValueError(f"`{name}` must have shape (num_images, h, w, dim), got shape {tuple(features.shape)}.")
    if not features.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {features.dtype}.")
    return features


def _upsampled_logits(head: torch.nn.Linear, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    logits = head(features.to(head.weight.dtype)).permute(0, 3, 1, 2)  # (B, C, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def dense_linear_probe(
    train_patch_features: torch.Tensor,
    train_masks: torch.Tensor,
    test_patch_features: torch.Tensor,
    test_masks: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Linear segmentation probe on frozen patch tokens (the DINOv2 "linear" head, without BatchNorm).

    A linear layer `D -> num_classes` is applied to every patch token; its logits are bilinearly upsampled
    (`align_corners=False`) to the mask resolution and trained with pixel-wise cross-entropy (pixels equal to
    `ignore_index` left out) using AdamW on mini-batches of images, shuffled each epoch. Test predictions are the
    argmax of the upsampled logits, scored with [`mean_iou`]. Deterministic given `seed` (initialization and
    shuffling use their own generator; the global RNG is not touched). Memory per step is about
    `batch_size * num_classes * H * W` floats.

    Args:
        train_patch_features (`torch.Tensor` of shape `(N, h, w, D)`): patch tokens of the training images (any float
            dtype; computed in float32, e.g. stored in float16 to save memory).
        train_masks (`torch.Tensor` of shape `(N, H, W)`): int64 class ids of the training pixels.
        test_patch_features (`torch.Tensor` of shape `(M, h', w', D)`): patch tokens of the test images.
        test_masks (`torch.Tensor` of shape `(M, H', W')`): int64 class ids of the test pixels.
        num_classes (`int`): number of classes (ids in `[0, num_classes)`).
        ignore_index (`int`): mask value of unlabelled pixels.
        epochs (`int`): passes over the training images.
        lr (`float`): AdamW learning rate.
        batch_size (`int`): images per step (training and evaluation).
        weight_decay (`float`): AdamW weight decay.
        seed (`int`): seed of the initialization and of the shuffling.

    Returns:
        `dict`: `{"mIoU": %, "pixel_accuracy": %, "per_class_iou": list of num_classes IoUs in % (nan when absent)}`
        on the test split.
    """
    _check_num_classes(num_classes)
    train_x = _check_patch_features(train_patch_features, "train_patch_features")
    test_x = _check_patch_features(test_patch_features, "test_patch_features")
    train_y = _check_masks(train_masks, "train_masks", num_classes, ignore_index)
    test_y = _check_masks(test_masks, "test_masks", num_classes, ignore_index)
    for features, masks, split in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if features.shape[0] != masks.shape[0]:
            raise ValueError(
                f"`{split}_patch_features` has {features.shape[0]} images but `{split}_masks` has {masks.shape[0]}."
            )
        if features.shape[0] == 0:
            raise ValueError(f"`{split}_patch_features` is empty.")
    if test_x.shape[3] != train_x.shape[3]:
        raise ValueError(
            f"`test_patch_features` has dimension {test_x.shape[3]} but `train_patch_features` has dimension "
            f"{train_x.shape[3]}."
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}.")

    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[3], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    size = tuple(train_y.shape[1:])
    num_train = train_x.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        head.train()
        for _ in range(epochs):
            order = torch.randperm(num_train, generator=generator)
            for start in range(0, num_train, batch_size):
                batch = order[start : start + batch_size]
                targets = train_y[batch]
                num_valid = int((targets != ignore_index).sum())
                if num_valid == 0:
                    continue
                logits = _upsampled_logits(head, train_x[batch], size)
                loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / num_valid
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    size = tuple(test_y.shape[1:])
    with torch.no_grad():
        for start in range(0, test_x.shape[0], batch_size):
            predictions = _upsampled_logits(head, test_x[start : start + batch_size], size).argmax(dim=1)
            confusion += _confusion(predictions, test_y[start : start + batch_size], num_classes, ignore_index)
    return _metrics_from_confusion(confusion)
