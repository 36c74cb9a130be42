"""Per-teacher feature standardization with EMA statistics (UNIC Sec. 3.3; docs/methods.md).

Each teacher has one standardizer per token type (CLS and patch kept apart). Statistics are per dimension, over the
GLOBAL batch (all processes; patch statistics over batch x tokens), with the unbiased std (divided by `n - 1`, `n` the
global count), and tracked with an EMA that is saved in checkpoints (the buffers live in the student model). The EMA
weight on the new batch follows a cosine schedule from 1.0 to 0.001 over training ([`ema_weight`]) in both training
modes:

- `"unic"` (naver/unic code): normalize with the PREVIOUS EMA statistics, then update them; divide by `std + 1e-6`.
- `"dune"` (naver/dune code): normalize with the current global batch statistics (std clamped to >= 1e-3), then update
  the EMA, which is used only at evaluation.

At evaluation both modes use the frozen EMA statistics. `"none"` disables standardization. `"phi-s"` (PHI-S: a PCA
rotation, a Hadamard rotation and one isotropic scale, estimated during a warm-up then frozen) is
[`~hf_distill.models.phi_s.PhiSStandardizer`]; [`build_standardizer`] makes the one a mode asks for.

The moments are computed without losing precision on dimensions with a large offset and a small spread (common in
ViT teachers): each process centres its rows on its own provisional mean (a corrected two-pass sum), and the
per-process `(count, mean, sum of squared deviations)` are combined with Chan et al.'s pairwise formula after one
small all-gather, so the features themselves are never gathered.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

STANDARDIZATION_MODES = ("unic", "dune", "none", "phi-s")
PER_DIMENSION_MODES = ("unic", "dune", "none")
UNIC_EPS = 1e-6
DUNE_MIN_STD = 1e-3
EMA_FINAL_WEIGHT = 0.001


def _check_valid(features: torch.Tensor, valid: torch.Tensor | None) -> None:
    if valid is None:
        return
    if valid.dtype != torch.bool or valid.shape != features.shape[:1]:
        raise ValueError(
            f"`valid` must be a bool tensor of shape [B] = {list(features.shape[:1])} (one flag per row of the "
            f"features), got dtype {valid.dtype} and shape {list(valid.shape)}."
        )


def _local_moments(features: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`[3 D + 1]` fp32 tensor `(count, provisional mean [D], mean correction [D], sum of squared deviations [D])` of
    this process's valid rows (all tokens of a valid row count)."""
    dim = features.shape[-1]
    flat = features.detach().float().reshape(-1, dim)
    if valid is None:
        mask = None
        count = torch.full((1,), flat.shape[0], dtype=torch.float32, device=flat.device)
    else:
        tokens = flat.shape[0] // max(features.shape[0], 1)
        mask = valid.to(flat.device).repeat_interleave(tokens).unsqueeze(1)  # [B * tokens, 1]
        # torch.where, not a product: non-finite values in invalid rows must not reach the sums (NaN * 0 = NaN)
        flat = torch.where(mask, flat, 0.0)
        count = (valid.sum() * tokens).float().view(1).to(flat.device)
    shift = flat.sum(0) / count.clamp_min(1.0)  # provisional mean, off by a few ulps at large offsets
    deviations = flat - shift  # exact for rows close to the shift (Sterbenz), whatever the offset
    if mask is not None:
        deviations = torch.where(mask, deviations, 0.0)
    first = deviations.sum(0)
    correction = first / count.clamp_min(1.0)
    # corrected two-pass formula: the provisional mean's error cancels out of the sum of squares
    squares = (deviations.square().sum(0) - first * correction).clamp_min(0.0)
    return torch.cat([count, shift, correction, squares])


def _global_moments(
    features: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean `[D]`, unbiased std `[D]` and row count (0-d) of the valid rows of all processes; no host sync."""
    _check_valid(features, valid)
    dim = features.shape[-1]
    local = _local_moments(features, valid)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        stats = torch.stack(parts)
    else:
        stats = local.unsqueeze(0)
    counts = stats[:, :1]
    shifts, corrections, squares = stats[:, 1 : dim + 1], stats[:, dim + 1 : 2 * dim + 1], stats[:, 2 * dim + 1 :]
    total = counts.sum()
    # Chan et al.'s combination, centred on the provisional mean of the largest part so that the differences between
    # the parts' means stay small (and exact) even at large offsets
    reference = shifts.index_select(0, counts.view(-1).argmax().view(1))
    present = counts > 0
    offsets = torch.where(present, shifts - reference + corrections, 0.0)
    delta = (counts * offsets).sum(0) / total.clamp_min(1.0)
    spread = torch.where(present, offsets - delta, 0.0)
    sum_squares = squares.sum(0) + (counts * spread.square()).sum(0)
    nan = torch.full_like(delta, float("nan"))
    mean = torch.where(total >= 1, reference.squeeze(0) + delta, nan)
    std = torch.where(total >= 2, (sum_squares / (total - 1).clamp_min(1.0)).sqrt(), nan)
    return mean, std, total


def global_moments(features: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and unbiased std of `features` (`[B, D]` or `[B, N, D]`) over all leading dims and all
    processes.

    Accurate for any offset (as exact as a two-pass `torch.std` in fp32): each process sums deviations from its own
    provisional mean, and the per-process moments are combined with Chan et al.'s formula after one all-gather of
    `3 D + 1` numbers when torch.distributed is initialized, so every process gets the statistics of the global batch
    without gathering the features. No host sync.

    Args:
        features (`torch.Tensor` of shape `[B, D]` or `[B, N, D]`):
            The features (any float dtype; the statistics are computed in fp32).
        valid (`torch.Tensor` of shape `[B]` and dtype `bool`, *optional*):
            Rows to use. Rows whose flag is `False` (and all their tokens) are left out of the sums and of the count,
            on every process; their values may be non-finite.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the `[D]` mean and std (std divided by `n - 1`, `n` the global count of
        valid rows x tokens). Like `torch.std`, NaN where undefined (mean with `n = 0`, std with `n < 2`).
    """
    mean, std, _ = _global_moments(features, valid)
    return mean, std


def ema_weight(step: int, total_steps: int) -> float:
    """Weight of the new batch in the EMA update at `step` (0-based) of `total_steps`: a cosine from 1.0 at step 0 to
    0.001 at the end (the UNIC and DUNE codes)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return EMA_FINAL_WEIGHT + (1.0 - EMA_FINAL_WEIGHT) * 0.5 * (1.0 + math.cos(math.pi * progress))


class FeatureStandardizer(nn.Module):
    """Standardizes `[B, D]` / `[B, N, D]` teacher features per dimension; its EMA `mean` / `std` buffers are
    checkpointed."""

    def __init__(self, dim: int, mode: str = "unic"):
        super().__init__()
        if mode not in PER_DIMENSION_MODES:
            raise ValueError(
                f"FeatureStandardizer modes are {PER_DIMENSION_MODES}, got {mode!r} (PHI-S: `build_standardizer`)."
            )
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def _apply_stats(self, features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if self.mode == "dune":
            return (features - mean) / std.clamp_min(DUNE_MIN_STD)
        return (features - mean) / (std + UNIC_EPS)

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, ema_weight: float | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Standardize `features` (`[B, D]` or `[B, N, D]`; fp32 result).

        Args:
            features (`torch.Tensor`): the teacher features.
            ema_weight (`float`, *optional*):
                Training: the weight of the global batch statistics in the EMA update ([`ema_weight`]). `None`
                (evaluation): the frozen EMA statistics are applied and nothing is updated.
            valid (`torch.Tensor` of shape `[B]` and dtype `bool`, *optional*):
                Rows to use. Invalid rows are left out of the statistics on every process and their output is 0.
                When fewer than 2 valid rows (x tokens) remain over all processes, the EMA is left unchanged and the
                `"dune"` mode normalizes with the EMA statistics. No host sync either way.
        """
        _check_valid(features, valid)
        features = features.float()
        if self.mode == "none":
            out = features.clone()  # a fresh tensor, also for teacher outputs made under inference mode
        elif ema_weight is None:
            out = self._apply_stats(features, self.mean, self.std)
        else:
            batch_mean, batch_std, count = _global_moments(features, valid)
            enough = count >= 2
            if self.mode == "unic":
                out = self._apply_stats(features, self.mean, self.std)
            else:
                mean = torch.where(enough, batch_mean, self.mean)
                std = torch.where(enough, batch_std, self.std)
                out = self._apply_stats(features, mean, std)
            self.mean.copy_(torch.where(enough, self.mean.lerp(batch_mean, ema_weight), self.mean))
            self.std.copy_(torch.where(enough, self.std.lerp(batch_std, ema_weight), self.std))
        if valid is not None:
            out = torch.where(valid.to(out.device).view(-1, *([1] * (out.dim() - 1))), out, 0.0)
        return out

    @property
    def out_dim(self) -> int:
        return self.mean.shape[0]

    def inverse_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A [D, D], c [D])` in float64 with `x = A x' + c`: the inverse of the evaluation-time standardization
        (diagonal `A`: the std as applied, `+ 1e-6` or clamped; identity for `"none"`)."""
        mean, std = self.mean.double(), self.std.double()
        if self.mode == "none":
            return torch.eye(mean.shape[0], dtype=torch.float64, device=mean.device), torch.zeros_like(mean)
        scale = std.clamp_min(DUNE_MIN_STD) if self.mode == "dune" else std + UNIC_EPS
        return torch.diag(scale), mean

    def extra_repr(self) -> str:
        return f"dim={self.mean.shape[0]}, mode={self.mode!r}"


def build_standardizer(dim: int, mode: str, warmup_steps: int = 100) -> nn.Module:
    """The standardizer of `mode` (one of `STANDARDIZATION_MODES`) for `dim`-wide teacher features; `warmup_steps`
    is used by `"phi-s"` only. Its `out_dim` is the width of the targets (PHI-S may pad, see
    [`~hf_distill.models.phi_s.hadamard_size`])."""
    if mode == "phi-s":
        from .phi_s import PhiSStandardizer

        return PhiSStandardizer(dim, warmup_steps)
    return FeatureStandardizer(dim, mode)
