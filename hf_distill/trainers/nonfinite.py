"""Non-finite values (NaN, inf) never reach the statistics or the weights: the one guard the three trainers share.

Two levels, both decided on the device (no host sync in the training step):

- samples: [`finite_rows`] flags the rows of a teacher's outputs that are finite; the trainers leave the other rows
  out of that teacher's standardization statistics and loss, and [`NonFiniteGuard.count_samples`] counts them.
- steps: [`NonFiniteGuard.poison`] turns a non-finite loss into NaN gradients (so under DDP every process sees them
  after the all-reduce and all skip the same step), and a pre-step hook on the optimizer checks the gradients (after
  clipping) and skips the update: fused torch optimizers (`--optim adamw_torch_fused`, the default) get the
  `found_inf` flag `torch.amp.GradScaler` uses, so weights, moments and the step count stay exactly as they were;
  other torch optimizers get zeroed gradients, so no NaN reaches the weights but their own state moves as on a step
  with a zero gradient (Adam: the moments decay and the weights move by the remaining momentum and weight decay).
  The learning-rate schedule advances on a skipped step in both cases.

Counters (skipped samples per teacher, skipped steps, non-finite loss terms) are device tensors, reduced across
processes together with the logged metrics ([`NonFiniteGuard.log_values`], one sync per log) and shown in the logs
under `nonfinite/`. When a teacher's non-finite fraction in a logging window passes `--max_nonfinite_fraction`, or more
than `--max_skipped_steps` optimizer steps in a row are skipped, training stops with a [`NonFiniteError`] naming the
teacher / domain / loss term, before anything is exported; the final export also refuses non-finite weights.
"""

import logging
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced non-finite values too often to go on (see [`NonFiniteGuard`])."""


@dataclass
class NonFiniteArguments:
    r"""
    Limits of the non-finite guard, shared by the UNIC, UDON and task-specific configurations.

    Parameters:
        max_nonfinite_fraction (`float`, defaults to 0.25):
            Largest fraction of a teacher's samples with non-finite outputs in one logging window; above it training
            stops with an error naming the teacher. Those samples are left out of the teacher's loss and statistics.
        max_skipped_steps (`int`, defaults to 10):
            Largest number of consecutive optimizer steps skipped because the loss or the gradients were not finite;
            above it training stops with an error naming the non-finite loss terms.
    """

    max_nonfinite_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Stop when more than this fraction of a teacher's samples in a logging window is non-finite."
        },
    )
    max_skipped_steps: int = field(
        default=10,
        metadata={"help": "Stop after more than this many consecutive steps skipped for non-finite loss / gradients."},
    )


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """`[B]` bool: the rows (first dim) whose values are all finite in every tensor (each `[B, ...]`)."""
    valid = None
    for tensor in tensors:
        rows = torch.isfinite(tensor.detach().reshape(tensor.shape[0], -1)).all(dim=-1)
        valid = rows if valid is None else valid & rows
    return valid


def assert_finite_weights(state_dict: dict, what: str) -> None:
    """Raise [`NonFiniteError`] when a floating tensor of `state_dict` holds NaN / inf (one host sync, at export)."""
    items = [(name, t) for name, t in state_dict.items() if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not items:
        return
    device = items[0][1].device
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in items]).tolist()
    bad = [name for (name, _), ok in zip(items, flags) if not ok]
    if bad:
        raise NonFiniteError(
            f"Refusing to export {what}: {len(bad)} of {len(items)} tensors hold NaN or inf (e.g. {bad[:3]})."
        )


class NonFiniteGuard(TrainerCallback):
    """Counts and skips non-finite samples and steps of one trainer (see the module docstring).

    Args:
        sources (`list[str]`): what produces per-sample outputs that may be non-finite (UNIC: the teacher names; KD:
            the probed teacher; UDON: none), for the counters and the error messages.
        args ([`NonFiniteArguments`]): the limits.
        device (`torch.device`): where the counters live.
        kind (`str`, defaults to `"teacher"`): what a source is, in messages.
    """

    def __init__(self, sources: list[str], args: NonFiniteArguments, device: torch.device, kind: str = "teacher"):
        if not 0.0 <= args.max_nonfinite_fraction <= 1.0:
            raise ValueError(f"--max_nonfinite_fraction must be in [0, 1], got {args.max_nonfinite_fraction}.")
        if args.max_skipped_steps < 0:
            raise ValueError(f"--max_skipped_steps must be >= 0, got {args.max_skipped_steps}.")
        self.sources = list(sources)
        self.kind = kind
        self.max_fraction = args.max_nonfinite_fraction
        self.max_skipped_steps = args.max_skipped_steps
        self.device = device
        self._bad_samples = torch.zeros(len(self.sources), device=device)
        self._samples = torch.zeros(len(self.sources), device=device)
        self._terms: dict[str, torch.Tensor] = {}  # non-finite occurrences of named loss terms in the window
        self._skipped = torch.zeros((), device=device)  # skipped steps in the window
        self._consecutive = torch.zeros((), device=device)  # current run of skipped steps
        self._max_consecutive = torch.zeros((), device=device)  # longest run ending in the window
        self.totals = {"skipped_steps": 0.0, **{f"{name}_skipped_samples": 0.0 for name in self.sources}}
        self._optimizer = None

    # ------------------------------------------------------------------ in the training step (device only)

    def count_samples(self, index: int, valid: torch.Tensor) -> None:
        """Count the `[B]` bool `valid` flags of source `index` (invalid rows are the skipped samples)."""
        self._bad_samples[index] += (~valid).sum()
        self._samples[index] += valid.numel()

    def count_terms(self, terms: dict[str, torch.Tensor]) -> None:
        """Count the non-finite values among named loss terms (names the culprit when steps are skipped)."""
        for name, value in terms.items():
            bad = (~torch.isfinite(value.detach())).any()
            self._terms[name] = self._terms[name] + bad if name in self._terms else bad.float()

    @staticmethod
    def poison(loss: torch.Tensor) -> torch.Tensor:
        """`loss` unchanged when finite; else a loss whose gradients are all NaN, so the step is skipped on every
        process (DDP all-reduces the NaN), even when the non-finite value would have had finite gradients."""
        scale = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
        return loss * scale

    # ------------------------------------------------------------------ the optimizer step

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.attach(optimizer)

    def attach(self, optimizer) -> None:
        """Install the step skip on `optimizer` (a torch optimizer, possibly wrapped by Accelerate); once."""
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner is None or inner is self._optimizer:
            return
        if not isinstance(inner, torch.optim.Optimizer):
            logger.warning(
                "%s is not a torch optimizer: steps with non-finite gradients are not skipped by hf_distill (DeepSpeed "
                "skips them only under fp16 loss scaling).",
                type(inner).__name__,
            )
            return
        self._optimizer = inner
        self._fused = bool(inner.defaults.get("fused")) and getattr(inner, "_step_supports_amp_scaling", False)
        if not self._fused:
            logger.warning(
                "%s is not a fused torch optimizer: a step with non-finite gradients is applied with zero gradients "
                "(momentum and weight decay still move the weights). Use --optim adamw_torch_fused to skip it exactly.",
                type(inner).__name__,
            )
        inner.register_step_pre_hook(self._before_step)
        inner.register_step_post_hook(self._after_step)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            found = (~torch.isfinite(torch.stack([n.to(self.device) for n in norms]))).any().float()
        else:
            found = torch.zeros((), device=self.device)
        if self._fused:
            previous = getattr(optimizer, "found_inf", None)  # set by a GradScaler (fp16)
            flag = found if previous is None else torch.maximum(previous.reshape(()), found.to(previous.device))
            optimizer.found_inf = flag
            self._set_grad_scale = not hasattr(optimizer, "grad_scale")
            if self._set_grad_scale:
                optimizer.grad_scale = None
        else:
            keep = 1.0 - found
            for grad in grads:
                grad.nan_to_num_(0.0, 0.0, 0.0).mul_(keep.to(grad.device, grad.dtype))
        self._skipped += found
        self._consecutive = (self._consecutive + 1.0) * found
        self._max_consecutive = torch.maximum(self._max_consecutive, self._consecutive)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._fused:
            del optimizer.found_inf
            if self._set_grad_scale:
                del optimizer.grad_scale

    # ------------------------------------------------------------------ at log time (one sync)

    def log_values(
        self, metrics: dict[str, list[torch.Tensor]], accelerator, prefix: str = "", counters: bool = True
    ) -> dict[str, float]:
        """Means of `metrics` (lists of device scalars) and the guard's counters, reduced across processes in ONE
        collective and read in ONE host sync; checks the limits (raises [`NonFiniteError`]) and resets the window.
        With `counters=False` (an evaluation's log), only the means: the training window is left as it is.

        Returns the logs: `{prefix}{metric}` (mean over steps and processes), `nonfinite/skipped_steps` and
        `nonfinite/{source}_skipped_samples` (totals since the start), `nonfinite/{term}` (non-finite occurrences of a
        loss term in the window, when any).
        """
        names = sorted(metrics)
        terms = sorted(self._terms)
        pieces = [torch.stack(metrics[name]).float().mean().to(self.device) for name in names]
        if counters:
            pieces += [self._bad_samples, self._samples, torch.stack([self._skipped, self._max_consecutive])]
            pieces += [torch.stack([self._terms[term] for term in terms])] if terms else []
        if not pieces:
            return {}
        vector = torch.cat([piece.reshape(-1).float() for piece in pieces])
        world = accelerator.num_processes
        if world > 1:
            vector = accelerator.reduce(vector, reduction="sum")
        values = vector.tolist()  # the one host sync
        num_sources = len(self.sources)
        means, values = values[: len(names)], values[len(names) :]
        logs = {f"{prefix}{name}": value / world for name, value in zip(names, means)}
        if not counters:
            return logs
        bad, seen, values = values[:num_sources], values[num_sources : 2 * num_sources], values[2 * num_sources :]
        (skipped, max_consecutive), term_counts = [v / world for v in values[:2]], values[2:]
        self.totals["skipped_steps"] += skipped
        for name, count in zip(self.sources, bad):
            self.totals[f"{name}_skipped_samples"] += count
        logs.update({f"nonfinite/{key}": value for key, value in self.totals.items()})
        culprits = {term: count for term, count in zip(terms, term_counts) if count > 0}
        logs.update({f"nonfinite/{term}": count for term, count in culprits.items()})
        self._reset_window()

        for name, count, total in zip(self.sources, bad, seen):
            if total > 0 and count / total > self.max_fraction:
                raise NonFiniteError(
                    f"{self.kind.capitalize()} {name!r} returned NaN or inf for {count:.0f} of its {total:.0f} samples "
                    f"since the last log ({count / total:.0%}, limit --max_nonfinite_fraction {self.max_fraction}). "
                    "These samples were left out of its loss and statistics, but a teacher this broken is a bug: "
                    "check its weights, its dtype (float16 overflows) and its inputs. Nothing was exported."
                )
        if max_consecutive > self.max_skipped_steps:
            where = ", ".join(f"{term} ({count:.0f}x)" for term, count in culprits.items()) or "the gradients"
            raise NonFiniteError(
                f"{max_consecutive:.0f} consecutive optimizer steps were skipped because the loss or the gradients "
                f"were NaN or inf (limit --max_skipped_steps {self.max_skipped_steps}); non-finite: {where}. The "
                "weights were not updated by these steps and nothing was exported: lower the learning rate, check "
                "the data and the teachers."
            )
        return logs

    def _reset_window(self) -> None:
        self._bad_samples.zero_()
        self._samples.zero_()
        self._skipped = torch.zeros((), device=self.device)
        self._max_consecutive = self._consecutive.clone()
        self._terms = {}
