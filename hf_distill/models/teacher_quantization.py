"""Cheaper teachers (int8, bfloat16) and the fidelity guard that decides whether they may replace the float32 ones.

A teacher only produces targets, so it can run at lower precision as long as its outputs stay close to the float32
ones. Two cheaper forms exist:

- `int8` (CPU only): dynamic quantization of every `nn.Linear` with PyTorch's own
  `torch.ao.quantization.quantize_dynamic` (weights int8 per output channel, activations quantized per batch at run
  time, fbgemm / oneDNN kernels). Convolutions stay in float32: dynamic quantization has no convolution kernels, and
  static int8 convolutions need observers, calibration and per-model rewrites (FX / PT2E export) that a generic
  teacher wrapper cannot do safely.
- `bfloat16` / `float16` weights (`teacher_dtype`, see [`~hf_distill.precision.auto_dtype`]).

[`measure_fidelity`] compares a cheaper teacher with its float32 original on a calibration batch (cosine and relative
error of the summary and of the patch tokens) and [`check_fidelity`] refuses it above a threshold.
[`load_checked_teacher`] does all of it for a teacher to load: the online teachers of the UNIC trainer and the teachers
that build a teacher-output cache are the same, checked the same way.
"""

import copy
import itertools
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..data.augmentations import resize_center
from .teacher_loading import load_teacher

logger = logging.getLogger(__name__)

TEACHER_QUANTIZATIONS = ("none", "int8")


def quantize_teacher(teacher: nn.Module, quantization: str = "int8", inplace: bool = False) -> nn.Module:
    """A copy of `teacher` (or `teacher` itself with `inplace`) whose `nn.Linear` layers compute in int8.

    Args:
        teacher (`nn.Module`): a float32 teacher on the CPU.
        quantization (`str`, defaults to `"int8"`): `"int8"` (dynamic, per-channel weights) or `"none"` (returned
            unchanged).
        inplace (`bool`, defaults to `False`): quantize `teacher` itself instead of a deep copy.
    """
    if quantization not in TEACHER_QUANTIZATIONS:
        raise ValueError(f"teacher quantization must be one of {TEACHER_QUANTIZATIONS}, got {quantization!r}.")
    if quantization == "none":
        return teacher
    parameters = list(teacher.parameters())
    if any(parameter.device.type != "cpu" for parameter in parameters):
        raise ValueError(
            "int8 teachers run on the CPU only (PyTorch's dynamic quantization has CPU kernels only); on a GPU use "
            "teacher_dtype bfloat16 (or auto) instead of teacher_quantization int8."
        )
    if any(parameter.dtype != torch.float32 for parameter in parameters):
        raise ValueError("quantize a float32 teacher (load it with teacher_dtype float32), not a cast one.")
    if not any(isinstance(module, nn.Linear) for module in teacher.modules()):
        raise ValueError(
            f"{type(teacher).__name__} has no nn.Linear layer, so int8 dynamic quantization would change nothing "
            "(convolutions are not quantized): leave teacher_quantization at none."
        )
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; the API still works
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        quantized = torch.ao.quantization.quantize_dynamic(
            teacher, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=inplace
        )
    # int8 kernels take float32 inputs: the teacher runs outside any bf16 autocast of the training step
    quantized.register_forward_pre_hook(_enter_float32)
    quantized.register_forward_hook(_exit_float32, always_call=True)
    return quantized


def _enter_float32(module: nn.Module, args) -> None:
    context = torch.autocast("cpu", enabled=False)
    context.__enter__()
    module.__dict__.setdefault("_float32_contexts", []).append(context)


def _exit_float32(module: nn.Module, args, output) -> None:
    module.__dict__["_float32_contexts"].pop().__exit__(None, None, None)


def cheaper_teacher(teacher: nn.Module, dtype: torch.dtype, quantization: str = "none") -> nn.Module:
    """A copy of the float32 `teacher` in `dtype` (bfloat16 / float16) or quantized (`quantization="int8"`, which
    keeps float32 for the layers it does not quantize)."""
    if quantization != "none":
        if dtype != torch.float32:
            raise ValueError(
                f"teacher_quantization {quantization!r} replaces the teacher dtype: set teacher_dtype to float32 (or "
                f"auto on a CPU without native bfloat16), got {dtype}."
            )
        return quantize_teacher(teacher, quantization)
    return copy.deepcopy(teacher).to(dtype)


@dataclass
class TeacherFidelity:
    """How close a cheaper teacher's outputs are to the float32 teacher's on one batch.

    `*_cosine`: mean cosine similarity per output vector (summary per image, patch per token); `*_error`: relative
    error `||cheap - fp32|| / ||fp32||` over the batch (Frobenius norms).
    """

    summary_cosine: float
    patch_cosine: float
    summary_error: float
    patch_error: float

    @property
    def max_error(self) -> float:
        return max(self.summary_error, self.patch_error)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"summary cosine {self.summary_cosine:.4f} / relative error {self.summary_error:.4f}, patch cosine "
            f"{self.patch_cosine:.4f} / relative error {self.patch_error:.4f}"
        )


def _compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    reference, candidate = reference.double(), candidate.double()
    cosine = torch.nn.functional.cosine_similarity(candidate, reference, dim=-1).mean()
    error = torch.linalg.vector_norm(candidate - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-12)
    return float(cosine), float(error)


def measure_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    pixel_values: torch.Tensor,
    input_mean: torch.Tensor | None = None,
    input_std: torch.Tensor | None = None,
    grid_size: tuple[int, int] | None = None,
) -> TeacherFidelity | None:
    """Run both teachers (inference mode) on `pixel_values` (normalized with `input_mean` / `input_std`, as in
    training) and compare their summaries and patch tokens on the images where the float32 `reference` is finite;
    `None` when it is finite on none of them (nothing to compare)."""
    with torch.inference_mode():
        expected = reference(pixel_values, input_mean, input_std, grid_size=grid_size)
        got = candidate(pixel_values, input_mean, input_std, grid_size=grid_size)
    # images on which the float32 teacher itself is not finite are the non-finite guard's business, not precision's
    rows = torch.isfinite(expected.summary).flatten(1).all(1) & torch.isfinite(expected.patch_tokens).flatten(1).all(1)
    if not bool(rows.any()):
        return None
    summary_cosine, summary_error = _compare(expected.summary[rows], got.summary[rows])
    patch_cosine, patch_error = _compare(expected.patch_tokens[rows], got.patch_tokens[rows])
    return TeacherFidelity(summary_cosine, patch_cosine, summary_error, patch_error)


def check_fidelity(name: str, fidelity: TeacherFidelity | None, max_error: float, what: str) -> None:
    """Log the fidelity of teacher `name` (`what`: e.g. `"int8"`) and raise `ValueError` when its summary or patch
    relative error exceeds `max_error` (or is not finite)."""
    if fidelity is None:
        logger.warning(
            "Teacher %r in %s: its float32 outputs are not finite on any calibration image, nothing to compare with "
            "(the non-finite guard watches it during training).", name, what,
        )  # fmt: skip
        return
    logger.info("Teacher %r in %s vs float32 on the calibration batch: %s", name, what, fidelity)
    error = fidelity.max_error
    if not error <= max_error:  # also catches NaN
        raise ValueError(
            f"Teacher {name!r} in {what} is too far from its float32 outputs on the calibration batch ({fidelity}; "
            f"allowed relative error {max_error}). Its targets would differ from the float32 teacher's: run it in "
            "float32 (teacher_quantization none, teacher_dtype float32), or raise teacher_fidelity_max_error if this "
            "error is acceptable for your run."
        )


@dataclass
class Calibration:
    """The batch a cheaper teacher is compared on: `pixel_values` normalized with `mean` / `std` (the student's, as in
    training; the teachers renormalize), the teachers' outputs read on the student's `grid_size`."""

    pixel_values: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    grid_size: tuple[int, int]


def calibration_views(dataset, collator, count: int, size: int, mean, std, device) -> torch.Tensor | None:
    """Center crops at `size` of the first `count` images of `dataset` (map-style or streamed) as `collator` reads
    them, normalized with `mean` / `std`: the evaluation view of the training images; `None` without images."""
    if count <= 0 or dataset is None:
        return None
    examples = list(itertools.islice(iter(dataset), count))
    if not examples:
        return None
    views = resize_center(collator(examples)["pixel_values"].to(device), size)
    mean, std = torch.as_tensor(mean, device=device), torch.as_tensor(std, device=device)
    return (views - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def load_checked_teacher(
    source,
    name: str,
    dtype: torch.dtype,
    quantization: str,
    device: torch.device,
    calibration: Callable[[], Calibration | None],
    max_error: float,
    **options,
) -> nn.Module:
    """Load teacher `source` (see [`~hf_distill.models.load_teacher`], `options` are its loading options) in `dtype`,
    quantized with `quantization`. A cheaper form (bfloat16, float16 or int8) is derived from the float32 teacher and
    compared with it on `calibration()` (called only then): refused with a `ValueError` when a relative error exceeds
    `max_error`. A cheaper teacher is returned on `device` (int8: the CPU), a float32 one as loaded."""
    cheaper = dtype != torch.float32 or quantization != "none"
    teacher = load_teacher(source, dtype=torch.float32 if cheaper else dtype, **options)
    if not cheaper:  # left where it was loaded: the trainer places (or shards) it
        return teacher
    what = quantization if quantization != "none" else str(dtype).removeprefix("torch.")
    if quantization != "none" and device.type != "cpu":
        raise ValueError(
            f"--teacher_quantization {quantization} runs on the CPU only, this run uses {device}: use "
            "--teacher_dtype bfloat16 (or auto) on a GPU instead."
        )
    if any(hasattr(parameter, "ds_id") for parameter in teacher.parameters()):
        # loaded under ZeRO-3 (zero.Init): each process holds a shard of the weights, which cannot be cast or run
        # outside DeepSpeed's engine; the engine runs the teacher in the precision of the DeepSpeed config
        logger.warning(
            "Teacher %r is partitioned by DeepSpeed ZeRO-3: kept in float32 here (DeepSpeed's precision applies), "
            "its %s form is not checked against float32.", name, what,
        )  # fmt: skip
        return teacher
    teacher = teacher.to(device)
    cheap = cheaper_teacher(teacher, dtype, quantization)
    batch = calibration()
    if batch is None:
        logger.warning("Teacher %r in %s: no training images to check it against float32 with.", name, what)
        return cheap
    fidelity = measure_fidelity(
        teacher, cheap, batch.pixel_values.to(device), batch.mean.to(device), batch.std.to(device), batch.grid_size
    )
    check_fidelity(name, fidelity, max_error, what)
    return cheap
