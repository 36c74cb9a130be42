"""A batch sampler over several domains: every batch holds images of ONE domain (UDON, REFERENCE.md 2).

The training data is one concatenated dataset in which domain `d` occupies the global rows `offsets[d]:offsets[d+1]`.
Batch `g` of the run (counted over epochs) comes from a domain chosen by the strategy:

- `round_robin`: domains in turn (`g mod D`);
- `proportional`: drawn with probability proportional to the domain's size;
- `balanced`: drawn uniformly;
- `dynamic` (UDON): round-robin until the first update; then, every `update_every` optimizer steps, the weights become
  proportional to each domain's mean teacher classification loss since the previous update and the domains of the
  following batches are drawn from them, so slow-learning domains get more batches.

Draws are stateless functions of `(seed, g)` and the weights in force at `g` (kept as a history), and each domain's
images follow a seeded permutation per epoch. Iterating an epoch again, as `Trainer` does to skip the batches already
seen when it resumes, therefore reproduces exactly the same batches once `load_state_dict` restored the history.
Losses are accumulated in tensors (no host sync); they are read, and summed over processes, only at updates.

Distributed runs: Accelerate hands batch `g` to process `g mod num_processes`; every process iterates the same
sequence (same seed, same weights because the loss sums are all-reduced before each update).
"""

import numpy as np
import torch

STRATEGIES = ("round_robin", "proportional", "balanced", "dynamic")


class DomainBatchSampler:
    """Yield lists of global row indices, each list from one domain.

    Args:
        domain_sizes (`list[int]`): number of training rows of each domain (in concatenation order).
        batch_size (`int`): images per batch.
        strategy (`str`): one of `round_robin`, `proportional`, `balanced`, `dynamic`.
        update_every (`int`): optimizer steps between two updates of the dynamic weights (UDON: 1000).
        seed (`int`): seed of every draw.
    """

    def __init__(
        self,
        domain_sizes: list[int],
        batch_size: int,
        strategy: str = "round_robin",
        update_every: int = 1000,
        seed: int = 0,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if any(size < batch_size for size in domain_sizes):
            raise ValueError(
                f"Every domain needs at least batch_size={batch_size} training images; sizes are {domain_sizes}."
            )
        self.sizes = [int(size) for size in domain_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.batch_size = batch_size
        self.strategy = strategy
        self.update_every = update_every
        self.seed = seed
        self.epoch = 0
        num_domains = len(self.sizes)
        if strategy == "proportional":
            initial = np.asarray(self.sizes, dtype=float) / sum(self.sizes)
        else:
            initial = np.full(num_domains, 1.0 / num_domains)
        # (first batch index, weights, round robin?) entries; the last one whose index <= g applies to batch g
        self.history: list[tuple[int, list[float], bool]] = [
            (0, initial.tolist(), strategy in ("round_robin", "dynamic"))
        ]
        self.loss_sums: torch.Tensor | None = None
        self.loss_counts: torch.Tensor | None = None
        self.last_yielded = -1

    def __len__(self) -> int:
        return sum(self.sizes) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def current_weights(self) -> list[float]:
        return list(self.history[-1][1])

    def _entry(self, batch_index: int) -> tuple[int, list[float], bool]:
        for entry in reversed(self.history):
            if entry[0] <= batch_index:
                return entry
        return self.history[0]

    def domain_of(self, batch_index: int) -> int:
        """The domain of batch `batch_index` of the run."""
        _, weights, round_robin = self._entry(batch_index)
        if round_robin:
            return batch_index % len(self.sizes)
        rng = np.random.default_rng((self.seed, 1, batch_index))
        return int(rng.choice(len(self.sizes), p=np.asarray(weights) / sum(weights)))

    def _domain_rows(self, domain: int, draw: int) -> list[int]:
        """The `draw`-th batch of `domain` in the current epoch: consecutive slices of seeded permutations."""
        size, rows = self.sizes[domain], []
        position = draw * self.batch_size
        while len(rows) < self.batch_size:
            cycle, start = divmod(position, size)
            permutation = np.random.default_rng((self.seed, 2, self.epoch, domain, cycle)).permutation(size)
            take = permutation[start : start + self.batch_size - len(rows)]
            rows.extend(int(self.offsets[domain] + row) for row in take)
            position += len(take)
        return rows

    def __iter__(self):
        draws = [0] * len(self.sizes)
        first = self.epoch * len(self)
        for batch_index in range(first, first + len(self)):
            domain = self.domain_of(batch_index)
            rows = self._domain_rows(domain, draws[domain])
            draws[domain] += 1
            self.last_yielded = batch_index
            yield rows

    # ------------------------------------------------------------------ dynamic weights

    def record_loss(self, domain: int, loss: torch.Tensor) -> None:
        """Add one batch's teacher classification loss (a scalar tensor, any device) to its domain's window."""
        if self.loss_sums is None or self.loss_sums.device != loss.device:
            self.loss_sums = torch.zeros(len(self.sizes), dtype=torch.float64, device=loss.device)
            self.loss_counts = torch.zeros(len(self.sizes), dtype=torch.float64, device=loss.device)
        self.loss_sums[domain] += loss.detach().to(torch.float64)
        self.loss_counts[domain] += 1

    def update(self, reduce=None) -> list[float] | None:
        """Dynamic strategy: weights proportional to each domain's mean recorded loss (domains without a recorded
        batch keep their previous weight share), applied from the next batch not yet drawn; the window restarts.
        `reduce` (e.g. `accelerator.reduce` with sum) combines the windows of all processes. Returns the new weights
        (or `None` if nothing changed)."""
        if self.strategy != "dynamic" or self.loss_sums is None:
            return None
        sums, counts = self.loss_sums, self.loss_counts
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
        previous = np.asarray(self.history[-1][1])
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if np.all(np.isnan(means)) or np.nansum(means) <= 0:
            return None
        # domains without a batch in the window keep their previous weight relative to the observed mean
        means = np.where(np.isnan(means), previous * np.nanmean(means) / previous.mean(), means)
        weights = (means / means.sum()).tolist()
        self.history.append((self.last_yielded + 1, weights, False))
        self.loss_sums.zero_()
        self.loss_counts.zero_()
        return weights

    def state_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "epoch": self.epoch,
            "history": [[index, weights, round_robin] for index, weights, round_robin in self.history],
            "loss_sums": None if self.loss_sums is None else self.loss_sums.cpu().tolist(),
            "loss_counts": None if self.loss_counts is None else self.loss_counts.cpu().tolist(),
            "last_yielded": self.last_yielded,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["strategy"] != self.strategy or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint's domain sampler used strategy {state['strategy']!r} / seed {state['seed']}, this run "
                f"uses {self.strategy!r} / {self.seed}: resume with the same settings."
            )
        self.epoch = state["epoch"]
        self.history = [(int(index), list(weights), bool(rr)) for index, weights, rr in state["history"]]
        self.last_yielded = state["last_yielded"]
        if state["loss_sums"] is not None:
            self.loss_sums = torch.tensor(state["loss_sums"], dtype=torch.float64)
            self.loss_counts = torch.tensor(state["loss_counts"], dtype=torch.float64)
