"""PHI-S standardization of teacher features (Ranzinger et al., "PHI-S: Distribution Balancing for Label-Free
Multi-Teacher Distillation", 2024; docs/methods.md).

Per teacher and token type, the features are centred, rotated onto their principal axes (the eigenvectors `U` of
their covariance, largest eigenvalue first), rotated again by a normalized Hadamard matrix `H` and scaled by ONE
factor for all dimensions:

    x' = alpha * H U^T (x - mu),    alpha = 1 / sqrt(mean eigenvalue)

A normalized Hadamard matrix has every entry equal to `+-1 / sqrt(n)`, so each output dimension receives exactly
`1 / n` of every eigenvalue: all output dimensions have the same variance (1 after `alpha`), whatever the spectrum,
and the transform is a rotation times one scale, so it is inverted exactly (`x = U H^T x' / alpha + mu`) and distorts
no distance. It is not whitening: the output dimensions stay correlated (their covariance is `H diag(lambda) H^T /
mean(lambda)`, unit diagonal), which is what keeps it stable for low-rank teachers.

Hadamard matrices are built by Sylvester's construction (sizes `2^k`), Paley's constructions I (`q + 1`, `q` a prime
`= 3 mod 4`) and II (`2 (q + 1)`, `q` a prime `= 1 mod 4`) and Kronecker products of these: every feature width of the
usual teachers (384, 768, 1024, 1152, 1280, 1536, ...). A width without such a construction (e.g. an odd one) is
padded with zero dimensions to the next size that has one ([`hadamard_size`]): the targets then have that many
dimensions (the student's heads predict them) and `alpha` is taken over the padded width, so every output dimension
still has unit variance.

The statistics (count, mean and the scatter matrix, in float64) are accumulated over the GLOBAL batch (all
processes) during the first `warmup_steps` training batches; during the warm-up the features are only centred and
scaled by the current isotropic factor (no eigendecomposition per step: it costs seconds on a CPU for 1280
dimensions). After the last warm-up batch the eigendecomposition is done once and the transform is frozen. All of it
is stored in buffers, so checkpoints resume with the frozen transform.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

# ---------------------------------------------------------------------------------------------- Hadamard matrices


def _is_prime(number: int) -> bool:
    if number < 2:
        return False
    return all(number % divisor for divisor in range(2, math.isqrt(number) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """`Q[i, j] = chi(j - i)` with `chi` the Legendre symbol modulo the prime `q` (0 at 0, 1 on nonzero squares,
    -1 elsewhere)."""
    squares = {(value * value) % q for value in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if value in squares else -1.0 for value in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index.view(1, -1) - index.view(-1, 1)) % q]


def _paley_one(size: int) -> torch.Tensor:
    """Paley's construction I, order `q + 1` for a prime `q = 3 mod 4`: `I + [[0, 1^T], [-1, Q]]`."""
    q = size - 1
    skew = torch.zeros(size, size, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(size, dtype=torch.float64) + skew


def _paley_two(size: int) -> torch.Tensor:
    """Paley's construction II, order `2 (q + 1)` for a prime `q = 1 mod 4`: in the symmetric conference matrix
    `[[0, 1^T], [1, Q]]`, every 0 becomes `[[1, -1], [-1, -1]]` and every `+-1` becomes `+-[[1, 1], [1, -1]]`."""
    q = size // 2 - 1
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, sign) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _sylvester(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return matrix


def _construction(size: int):
    """`(power of two, core builder, core size)` of a known construction of order `size`, or `None`."""
    if size in (1, 2):
        return size, None, 1
    if size < 1 or size % 4:
        return None
    power = size & -size  # the largest power of two dividing size
    while power >= 1:
        core = size // power
        if core == 1:
            return power, None, 1
        if _is_prime(core - 1) and (core - 1) % 4 == 3:
            return power, _paley_one, core
        if core % 2 == 0 and _is_prime(core // 2 - 1) and (core // 2 - 1) % 4 == 1:
            return power, _paley_two, core
        power //= 2
    return None


def hadamard_size(dim: int) -> int:
    """The smallest order `>= dim` for which [`hadamard_matrix`] has a construction (`dim` itself for every usual
    feature width)."""
    if dim < 1:
        raise ValueError(f"A feature width is a positive integer, got {dim}.")
    size = dim
    while _construction(size) is None:
        size += 1
    return size


def hadamard_matrix(size: int) -> torch.Tensor:
    """A normalized Hadamard matrix of order `size` (float64, entries `+-1 / sqrt(size)`, orthogonal), from
    Sylvester's and Paley's constructions (see the module docstring).

    Raises:
        ValueError: when no construction of that order is known here; [`hadamard_size`] gives the next order that
            has one.
    """
    construction = _construction(size)
    if construction is None:
        raise ValueError(
            f"No Hadamard matrix construction of order {size} is known here (orders 1, 2 and multiples of 4 of the "
            f"form 2^k, 2^k (q + 1) or 2^k 2 (q + 1) with q prime); the next order with one is {hadamard_size(size)}."
        )
    power, build, core = construction
    matrix = _sylvester(power)
    if build is not None:
        matrix = torch.kron(matrix, build(core))
    return matrix / math.sqrt(size)


# ---------------------------------------------------------------------------------------------- the standardizer


def _global_batch_moments(
    features: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count (0-d), mean `[D]` and scatter matrix `[D, D]` (sum of outer products of deviations from that mean), all
    float64, of the valid rows of all processes. Two all-reduces: the counts and sums give the global mean, then each
    process sums its deviations from it (so the precision does not depend on the features' offset)."""
    dim = features.shape[-1]
    flat = features.detach().float().reshape(-1, dim)
    if valid is None:
        mask = None
    else:
        tokens = flat.shape[0] // max(features.shape[0], 1)
        mask = valid.to(flat.device).repeat_interleave(tokens).unsqueeze(1)
        flat = torch.where(mask, flat, 0.0)  # non-finite values of invalid rows never reach the sums
    count = flat.new_full((1,), flat.shape[0], dtype=torch.float64) if mask is None else mask.sum().double().view(1)
    sums = torch.cat([count, flat.double().sum(0)])
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        dist.all_reduce(sums)
    count, mean = sums[0], sums[1:] / sums[0].clamp_min(1.0)
    deviations = flat - mean.float()
    if mask is not None:
        deviations = torch.where(mask, deviations, 0.0)
    scatter = (deviations.T @ deviations).double()
    if distributed:
        dist.all_reduce(scatter)
    return count, mean, scatter


class PhiSStandardizer(nn.Module):
    """PHI-S standardization of `[B, D]` / `[B, N, D]` teacher features (see the module docstring). Same call as
    [`FeatureStandardizer`]: `ema_weight` given means a training batch (its statistics are accumulated during the
    warm-up), `None` applies the current transform.

    Args:
        dim (`int`): the teacher's feature width `D`.
        warmup_steps (`int`, defaults to 100): training batches whose statistics are accumulated before the
            transform is computed and frozen.

    Buffers (saved with the student): the accumulated `stat_count`, `stat_mean`, `stat_scatter` (float64), the
    number of warm-up batches seen (`num_updates`), `frozen`, and the applied `mean` `[D]`, `transform` `[out_dim,
    D]` (`alpha H U^T`, zero-padded columns of `H` left out) and `scale` (`alpha`).
    """

    mode = "phi-s"

    def __init__(self, dim: int, warmup_steps: int = 100):
        super().__init__()
        if warmup_steps < 1:
            raise ValueError(f"PHI-S needs at least one warm-up batch to estimate its statistics, got {warmup_steps}.")
        self.dim, self.out_dim, self.warmup_steps = dim, hadamard_size(dim), warmup_steps
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("stat_mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("stat_scatter", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("transform", torch.eye(self.out_dim, dim))
        self.register_buffer("scale", torch.ones(()))
        self._progress = None  # (frozen, num_updates) mirrored on the host: no device read per step

    def reset_statistics(self) -> None:
        """Back to the initial state: no statistics, identity transform."""
        with torch.no_grad():
            for name in ("stat_count", "stat_mean", "stat_scatter", "num_updates", "frozen", "mean"):
                getattr(self, name).zero_()
            self.transform.copy_(torch.eye(self.out_dim, self.dim))
            self.scale.fill_(1.0)
        self._progress = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._progress = None  # read again from the loaded buffers

    def _host_progress(self) -> tuple[bool, int]:
        if self._progress is None:  # once after construction or loading: one small host read
            self._progress = (bool(self.frozen), int(self.num_updates))
        return self._progress

    @property
    def is_frozen(self) -> bool:
        return self._host_progress()[0]

    def covariance(self) -> torch.Tensor:
        """The accumulated covariance `[D, D]` (float64, unbiased)."""
        return self.stat_scatter / (self.stat_count - 1).clamp_min(1.0)

    @torch.no_grad()
    def _accumulate(self, features: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Chan et al.'s merge of the global batch's moments into the accumulated ones (no host sync)."""
        count, mean, scatter = _global_batch_moments(features, valid)
        total = self.stat_count + count
        delta = mean - self.stat_mean
        weight = count / total.clamp_min(1.0)
        self.stat_scatter.add_(scatter + torch.outer(delta, delta) * (self.stat_count * weight))
        self.stat_mean.add_(delta * weight)
        self.stat_count.copy_(total)
        self.num_updates.add_(1)

    @torch.no_grad()
    def _set_isotropic(self) -> None:
        """Warm-up transform: centre and scale by the current `alpha` (no rotation)."""
        alpha = (torch.diagonal(self.covariance()).sum() / self.out_dim).clamp_min(1e-12).rsqrt()
        self.mean.copy_(self.stat_mean)
        self.scale.copy_(alpha)
        self.transform.copy_(torch.eye(self.out_dim, self.dim, dtype=torch.float64, device=alpha.device) * alpha)

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute `alpha H U^T` from the accumulated statistics (one float64 eigendecomposition) and freeze it."""
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance())
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)  # largest first
        # a deterministic sign per eigenvector: its largest entry positive
        largest = eigenvectors.gather(0, eigenvectors.abs().argmax(dim=0, keepdim=True))
        eigenvectors = eigenvectors * torch.sign(largest)
        alpha = (eigenvalues.sum() / self.out_dim).clamp_min(1e-12).rsqrt()
        hadamard = hadamard_matrix(self.out_dim).to(eigenvectors.device)[:, : self.dim]
        self.mean.copy_(self.stat_mean)
        self.scale.copy_(alpha)
        self.transform.copy_(alpha * hadamard @ eigenvectors.T)
        self.frozen.fill_(True)
        self._progress = (True, int(self.num_updates))

    def forward(
        self, features: torch.Tensor, ema_weight: float | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Standardize `features` (`[B, D]` or `[B, N, D]`) to `[..., out_dim]` (fp32).

        Args:
            features (`torch.Tensor`): the teacher features.
            ema_weight (`float`, *optional*): set in training (its value is not used: PHI-S accumulates plain
                statistics over the warm-up); `None` (evaluation) applies the current transform.
            valid (`torch.Tensor` of shape `[B]` and dtype `bool`, *optional*): rows left out of the statistics;
                their output is 0.
        """
        if valid is not None and (valid.dtype != torch.bool or valid.shape != features.shape[:1]):
            raise ValueError(
                f"`valid` must be a bool tensor of shape [B] = {list(features.shape[:1])}, got dtype {valid.dtype} "
                f"and shape {list(valid.shape)}."
            )
        features = features.float()
        # fp32 matrix products even under the student's bf16 / fp16 autocast: targets and statistics keep full precision
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            if ema_weight is not None:
                frozen, updates = self._host_progress()
                if not frozen:
                    self._accumulate(features, valid)
                    self._progress = (False, updates + 1)
                    if updates + 1 >= self.warmup_steps:
                        self.freeze()
                    else:
                        self._set_isotropic()
            out = (features - self.mean) @ self.transform.T
        if valid is not None:
            out = torch.where(valid.to(out.device).view(-1, *([1] * (out.dim() - 1))), out, 0.0)
        return out

    def inverse_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A [D, out_dim], c [D])` in float64 with `x = A x' + c`: `A = transform^T / alpha^2` (the transform is
        `alpha` times an orthogonal map), `c = mean`."""
        transform = self.transform.double()
        return transform.T / self.scale.double().square(), self.mean.double()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim}, mode='phi-s', warmup_steps={self.warmup_steps}"
