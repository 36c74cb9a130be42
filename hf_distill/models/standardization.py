"""Per-teacher feature standardization with EMA statistics (UNIC Sec. 3.3; REFERENCE.md 1).

Each teacher has one standardizer per token type (CLS and patch kept apart). Statistics are per dimension, over the
GLOBAL batch (all processes; patch statistics over batch x tokens), computed in fp32 and tracked with an EMA that is
saved in checkpoints (the buffers live in the student model). Two training modes:

- `"unic"` (naver/unic code): normalize with the PREVIOUS EMA statistics, then update them; the EMA weight on the new
  batch follows a cosine schedule from 1.0 to 0.001 over training ([`ema_weight`]); divide by `std + 1e-6`.
- `"dune"` (naver/dune code): normalize with the current batch statistics (std clamped to >= 1e-3) and update the EMA
  with a fixed momentum; the EMA is used only at evaluation.

At evaluation both modes use the frozen EMA statistics. `"none"` disables standardization.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

STANDARDIZATION_MODES = ("unic", "dune", "none")
UNIC_EPS = 1e-6
DUNE_MIN_STD = 1e-3


def global_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (population) std of `features [..., D]` over all leading dims and all processes.

    Computed in fp32 from the sums of `x` and `x**2`, all-reduced when torch.distributed is initialized, so every
    process gets the statistics of the global batch. Returns two `[D]` tensors.
    """
    flat = features.detach().float().reshape(-1, features.shape[-1])
    count = torch.tensor([flat.shape[0]], dtype=torch.float32, device=flat.device)
    sums = torch.cat([flat.sum(0), flat.square().sum(0), count])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    dim = features.shape[-1]
    total = sums[-1]
    mean = sums[:dim] / total
    var = (sums[dim : 2 * dim] / total - mean.square()).clamp_min(0.0)
    return mean, var.sqrt()


def ema_weight(mode: str, step: int, total_steps: int, momentum: float = 0.1) -> float:
    """Weight of the new batch in the EMA update at `step` (0-based) of `total_steps`.

    `"unic"`: cosine from 1.0 at step 0 to 0.001 at the end. `"dune"`: the fixed `momentum`.
    """
    if mode == "dune":
        return momentum
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    final = 0.001
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class FeatureStandardizer(nn.Module):
    """Standardizes `[..., D]` teacher features per dimension; its EMA `mean` / `std` buffers are checkpointed."""

    def __init__(self, dim: int, mode: str = "unic"):
        super().__init__()
        if mode not in STANDARDIZATION_MODES:
            raise ValueError(f"standardization mode must be one of {STANDARDIZATION_MODES}, got {mode!r}.")
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def _apply_stats(self, features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        if self.mode == "dune":
            return (features - mean) / std.clamp_min(DUNE_MIN_STD)
        return (features - mean) / (std + UNIC_EPS)

    @torch.no_grad()
    def forward(self, features: torch.Tensor, ema_weight: float | None = None) -> torch.Tensor:
        """Standardize `features` (fp32 result). With `ema_weight` (training), the global batch statistics update
        the EMA; without it, the frozen EMA statistics are applied."""
        features = features.float()
        if self.mode == "none":
            return features.clone()  # a fresh tensor, also for teacher outputs made under inference mode
        if ema_weight is None:
            return self._apply_stats(features, self.mean, self.std)
        batch_mean, batch_std = global_moments(features)
        if self.mode == "unic":
            out = self._apply_stats(features, self.mean, self.std)
        else:
            out = self._apply_stats(features, batch_mean, batch_std)
        self.mean.lerp_(batch_mean, ema_weight)
        self.std.lerp_(batch_std, ema_weight)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.mean.shape[0]}, mode={self.mode!r}"
