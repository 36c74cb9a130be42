"""Fingerprints of frozen models: the same weights and reading options give the same key, whatever they were loaded
from. They key the caches built from model outputs (extracted features, teacher outputs, probe heads)."""

import json

import torch
import xxhash
from torch import nn

from .teacher_loading import teacher_source


def module_weights_fingerprint(module: nn.Module) -> str:
    """XXH3-128 of every tensor of `module.state_dict()` (names, dtypes, shapes and bytes), in sorted order.

    XXH3 hashes at several GB/s, so fingerprinting a ViT-g teacher takes about a second (a cache key, not a security
    check)."""
    digest = xxhash.xxh3_128()
    for name, value in sorted(module.state_dict().items()):
        _update(digest, name, value)
    return digest.hexdigest()


def _update(digest, name: str, value) -> None:
    """Hash one `state_dict` entry: a tensor (a quantized one by its integers, scales and zero points), or what
    quantized modules store besides (a tuple of packed weight and bias, a dtype)."""
    if isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _update(digest, f"{name}.{index}", item)
        return
    if not isinstance(value, torch.Tensor):
        digest.update(f"{name}|{value!r}".encode())
        return
    tensor = value.detach().cpu()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
    if tensor.is_quantized:
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            parameters = [tensor.q_per_channel_scales(), tensor.q_per_channel_zero_points()]
        else:
            parameters = [torch.tensor([tensor.q_scale()]), torch.tensor([tensor.q_zero_point()])]
        for index, parameter in enumerate(parameters):
            _update(digest, f"{name}.q{index}", parameter)
        tensor = tensor.int_repr()
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def encoder_fingerprint(encoder: nn.Module) -> str:
    """Fingerprint of an encoder's weights and reading options (summary, normalization, class)."""
    options = {
        "weights": module_weights_fingerprint(encoder),
        "summary": getattr(getattr(encoder, "config", None), "summary", None),
        "mean": list(encoder.image_mean),
        "std": list(encoder.image_std),
        "class": type(encoder).__name__,
    }
    return xxhash.xxh3_128(json.dumps(options, sort_keys=True).encode()).hexdigest()


def _function_name(function) -> str | None:
    if function is None:
        return None
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"


def teacher_identity(teacher: nn.Module) -> dict:
    """Everything about a loaded teacher that determines its outputs for given pixels: a weights fingerprint, the
    weights' dtype and every reading option (summary, normalization, grid alignment, input size, patch size, and the
    feature/summary functions of a `ModuleTeacher`), plus where it was loaded from (`source`, `revision`), which is
    recorded but does not change the outputs."""
    config = getattr(teacher, "config", None)
    parameter = next(teacher.parameters(), None)
    return {
        "source": teacher_source(teacher),
        "revision": getattr(config, "revision", None),
        "class": type(teacher).__name__,
        "weights": module_weights_fingerprint(teacher),
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        # a ModuleTeacher's summary is its summary_fn, else the mean of the patch grid
        "summary": getattr(config, "summary", None)
        or _function_name(getattr(teacher, "summary_fn", None))
        or "mean_patch",
        "feature_fn": _function_name(getattr(teacher, "feature_fn", None)),
        "image_mean": [float(v) for v in teacher.image_mean],
        "image_std": [float(v) for v in teacher.image_std],
        "grid_alignment": teacher.grid_alignment,
        "image_size": teacher.input_size,
        "patch_size": teacher.patch_size,
    }


__all__ = ["encoder_fingerprint", "module_weights_fingerprint", "teacher_identity"]
