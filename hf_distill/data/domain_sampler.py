"""A batch sampler over several domains: every batch holds images of ONE domain (UDON; docs/methods.md section 2).

The training data is one concatenated dataset in which domain `d` occupies the global rows `offsets[d]:offsets[d+1]`;
the sampler yields lists of those global row indices, so it is a `DataLoader(dataset, batch_sampler=...)`. Batch `g`
of the run (counted over epochs) comes from a domain chosen by the strategy:

- `round_robin`: domains in turn (`g mod D`);
- `proportional`: drawn with probability proportional to the domain's size;
- `balanced`: drawn uniformly;
- `dynamic` (UDON): round-robin until the first update; then, every `update_every` optimizer steps ([`step`]), the
  weights become proportional to each domain's mean recorded loss (the teacher classification loss) since the
  previous update, and the domains of the following batches are drawn from them: slow-learning domains get more
  batches.

An epoch is `sum(sizes) // (batch_size * num_replicas)` batches, all full: each domain reads its rows in a seeded
permutation per epoch and, when it runs out (a domain drawn more often than its size allows), continues in a fresh
permutation, like the authors' endless per-domain streams. There is no partial last batch, hence no `drop_last`.

Determinism and resuming: the domain of batch `g` is a stateless function of `(seed, g)` and of the weights in force
at `g`, kept as a history of `(first batch, weights)` entries; the rows are a function of `(seed, epoch, domain, draw)`.
There is no generator state to carry: iterating an epoch again, as `Trainer` does to skip the batches already seen
when it resumes, reproduces exactly the same batches once [`load_state_dict`] restored the history, the loss window
and the step counter. An update applies from the first batch not yet handed to the `DataLoader` (which may prefetch a
few ahead); that index is recorded, so a resumed run replays it.

Distributed runs: one optimizer step must see ONE domain on every process (as in the authors' code, where a step's
global batch is split across devices), otherwise the per-domain heads would get gradients averaged with other
domains' steps. Two equivalent set-ups give process `r` the rows `[r * B, (r + 1) * B)` of a global batch of
`B * num_replicas` rows of the same domain:

- rank-aware: `DomainBatchSampler(..., batch_size=B, num_replicas=world_size, rank=r)` on every process (same seed,
  hence the same domain schedule) and a DataLoader that Accelerate does NOT re-shard (re-sharding would hand process
  `r` every `world_size`-th of its own batches);
- `DomainBatchSampler(..., batch_size=B * world_size)` (`num_replicas=1`) and Accelerate's `split_batches=True`,
  whose `BatchSamplerShard` slices every batch across processes in exactly this way (tested).

Losses are accumulated in tensors on the device (no host sync); they are read, and summed over processes with the
`reduce` function given, only at updates.
"""

import numpy as np
import torch

STRATEGIES = ("round_robin", "proportional", "balanced", "dynamic")


class DomainBatchSampler:
    """Yield lists of global row indices, each list from one domain.

    Args:
        domain_sizes (`list[int]`): number of training rows of each domain (in concatenation order).
        batch_size (`int`): rows per yielded batch (per process).
        strategy (`str`, defaults to `"round_robin"`): one of `round_robin`, `proportional`, `balanced`, `dynamic`.
        update_every (`int`, defaults to 1000): optimizer steps ([`step`] calls) between two updates of the dynamic
            weights (UDON: 1000).
        seed (`int`, defaults to 0): seed of every draw; the same on every process.
        num_replicas (`int`, defaults to 1): number of processes sharing each step's domain.
        rank (`int`, defaults to 0): this process; it yields its own disjoint part of each global batch.
    """

    def __init__(
        self,
        domain_sizes: list[int],
        batch_size: int,
        strategy: str = "round_robin",
        update_every: int = 1000,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        if not domain_sizes:
            raise ValueError("DomainBatchSampler needs at least one domain.")
        if batch_size < 1 or update_every < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"Need batch_size >= 1, update_every >= 1, num_replicas >= 1 and 0 <= rank < num_replicas; got "
                f"{batch_size}, {update_every}, {num_replicas}, {rank}."
            )
        global_batch = batch_size * num_replicas
        if any(size < global_batch for size in domain_sizes):
            raise ValueError(
                f"Every domain needs at least batch_size x num_replicas = {global_batch} training images; sizes are "
                f"{list(domain_sizes)}."
            )
        self.sizes = [int(size) for size in domain_sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.batch_size = batch_size
        self.strategy = strategy
        self.update_every = update_every
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
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
        self.steps = 0
        self.last_yielded = -1
        self._permutations: dict[int, tuple[tuple[int, int], np.ndarray]] = {}  # domain -> ((epoch, cycle), order)

    def __len__(self) -> int:
        return sum(self.sizes) // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate (its row permutations and its batch indices)."""
        self.epoch = int(epoch)

    @property
    def current_weights(self) -> list[float]:
        """The domain sampling weights now in force (for logging; round-robin shows uniform weights)."""
        return list(self.history[-1][1])

    def _entry(self, batch_index: int) -> tuple[int, list[float], bool]:
        for entry in reversed(self.history):
            if entry[0] <= batch_index:
                return entry
        return self.history[0]

    def domain_of(self, batch_index: int) -> int:
        """The domain of batch `batch_index` of the run (the same on every process)."""
        _, weights, round_robin = self._entry(batch_index)
        if round_robin:
            return batch_index % len(self.sizes)
        rng = np.random.default_rng((self.seed, 1, batch_index))
        return int(rng.choice(len(self.sizes), p=np.asarray(weights) / sum(weights)))

    def _permutation(self, domain: int, cycle: int) -> np.ndarray:
        """The `cycle`-th row order of `domain` in this epoch (cached: one permutation per domain and cycle)."""
        key = (self.epoch, cycle)
        cached = self._permutations.get(domain)
        if cached is None or cached[0] != key:
            order = np.random.default_rng((self.seed, 2, self.epoch, domain, cycle)).permutation(self.sizes[domain])
            cached = self._permutations[domain] = (key, order)
        return cached[1]

    def _domain_rows(self, domain: int, draw: int) -> list[int]:
        """This process's part of the `draw`-th global batch of `domain` in the current epoch: consecutive slices of
        the domain's permutations."""
        start = (draw * self.num_replicas + self.rank) * self.batch_size
        cycles, positions = np.divmod(np.arange(start, start + self.batch_size), self.sizes[domain])
        rows = np.empty(self.batch_size, dtype=np.int64)
        for cycle in np.unique(cycles):  # at most two: a domain holds at least one global batch
            selected = cycles == cycle
            rows[selected] = self._permutation(domain, int(cycle))[positions[selected]]
        return (rows + self.offsets[domain]).tolist()

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

    def record_loss(self, domain: int, loss: torch.Tensor | float) -> None:
        """Add one batch's loss (UDON: the teacher classification loss; a scalar tensor on any device, or a float) to
        its domain's window (a non-finite loss is left out). No host sync: the window lives on the loss's device."""
        loss = torch.as_tensor(loss).detach()
        if self.loss_sums is None:
            self.loss_sums = torch.zeros(len(self.sizes), dtype=torch.float64, device=loss.device)
            self.loss_counts = torch.zeros(len(self.sizes), dtype=torch.float64, device=loss.device)
        elif self.loss_sums.device != loss.device:  # e.g. a window restored on the CPU, losses on the GPU
            self.loss_sums, self.loss_counts = self.loss_sums.to(loss.device), self.loss_counts.to(loss.device)
        finite = torch.isfinite(loss)  # a NaN / inf loss (a skipped step) would poison the weights: not counted
        self.loss_sums[domain] += torch.where(finite, loss.to(torch.float64), 0.0)
        self.loss_counts[domain] += finite.to(torch.float64)

    def step(self, reduce=None) -> list[float] | None:
        """Count one optimizer step; every `update_every` steps, [`update`] the dynamic weights. Call it on every
        process (`reduce` is a collective). Returns the new weights, or `None`."""
        self.steps += 1
        if self.steps % self.update_every == 0:
            return self.update(reduce)
        return None

    def _window(self, reduce=None) -> tuple[np.ndarray, np.ndarray]:
        sums, counts = self.loss_sums, self.loss_counts
        if sums is None:
            zeros = np.zeros(len(self.sizes))
            return zeros, zeros.copy()
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        return sums.cpu().numpy(), counts.cpu().numpy()

    def update(self, reduce=None) -> list[float] | None:
        """Dynamic strategy: weights proportional to each domain's mean recorded loss (a domain without a recorded
        batch keeps its previous weight relative to the others), applied from the first batch not yet yielded; the
        window restarts. Other strategies: nothing happens.

        Args:
            reduce (`Callable[[torch.Tensor], torch.Tensor]`, *optional*): sums a tensor over processes (e.g.
                `lambda t: accelerator.reduce(t, reduction="sum")`); every process must then call `update` at the same
                step, and all get the same weights.

        Returns:
            The new weights, or `None` when nothing changed.
        """
        if self.strategy != "dynamic":
            return None
        sums, counts = self._window(reduce)
        previous = np.asarray(self.history[-1][1])
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if np.all(np.isnan(means)) or np.nansum(means) <= 0:
            return None
        means = np.where(np.isnan(means), previous * np.nanmean(means) / previous.mean(), means)
        weights = (means / means.sum()).tolist()
        self.history.append((self.last_yielded + 1, weights, False))
        self.loss_sums.zero_()
        self.loss_counts.zero_()
        return weights

    # ------------------------------------------------------------------ resuming

    def state_dict(self, reduce=None) -> dict:
        """Everything needed to resume exactly (JSON-serializable): settings checked on load, epoch, weight history,
        step counter, position (last batch yielded) and the loss window.

        Args:
            reduce (*optional*): as in [`update`]. In a distributed run pass it, on every process, so the saved window
                holds the losses of all processes (the main process then writes the state); without it the window
                is this process's own.
        """
        sums, counts = self._window(reduce)
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "domain_sizes": self.sizes,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "update_every": self.update_every,
            "epoch": self.epoch,
            "history": [[index, weights, round_robin] for index, weights, round_robin in self.history],
            "steps": self.steps,
            "last_yielded": self.last_yielded,
            "loss_sums": sums.tolist(),
            "loss_counts": counts.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore [`state_dict`]. The saved loss window is restored on process 0 only (the others start from zero),
        so that the next reduced update counts it once."""
        settings = {"strategy": self.strategy, "seed": self.seed, "domain_sizes": self.sizes}
        settings.update(batch_size=self.batch_size, num_replicas=self.num_replicas, update_every=self.update_every)
        changed = {key: (state[key], value) for key, value in settings.items() if key in state and state[key] != value}
        if changed:
            raise ValueError(
                "The checkpoint's domain sampler used other settings (saved, now): "
                + ", ".join(f"{key} {saved!r} vs {now!r}" for key, (saved, now) in changed.items())
                + ". Resume with the same settings."
            )
        self.epoch = int(state["epoch"])
        self.history = [(int(index), [float(w) for w in weights], bool(rr)) for index, weights, rr in state["history"]]
        self.steps = int(state.get("steps", 0))
        self.last_yielded = int(state["last_yielded"])
        self.loss_sums = self.loss_counts = None
        if state.get("loss_sums") is not None:
            sums = torch.tensor(state["loss_sums"], dtype=torch.float64)
            counts = torch.tensor(state["loss_counts"], dtype=torch.float64)
            keep = float(self.rank == 0)
            self.loss_sums, self.loss_counts = sums * keep, counts * keep
