"""Batches that mix real and synthetic images in a fixed ratio (task-specific distillation, docs/methods.md section 3).

The training data is one concatenated dataset: real rows `[0, num_real)`, synthetic rows `[num_real, num_real +
num_synthetic)`. Every batch holds `round(synthetic_ratio * batch_size)` synthetic rows and real rows for the rest.
An epoch is one pass over the real rows in a seeded permutation (full batches only); the synthetic rows are read as an
endless stream of seeded permutations that continues across epochs, so every synthetic image is used before any is
repeated. Everything is a function of `(seed, epoch)`: iterating an epoch again (as `Trainer` does to skip the
batches already seen when it resumes) reproduces the same batches.
"""

import numpy as np


class MixedBatchSampler:
    """Yield lists of row indices of the concatenated real + synthetic dataset.

    Args:
        num_real (`int`): number of real (labelled) rows, first in the dataset.
        num_synthetic (`int`): number of synthetic rows, after them (0: plain real batches).
        batch_size (`int`): rows per batch.
        synthetic_ratio (`float`): fraction of each batch taken from the synthetic rows, in `[0, 1)`.
        seed (`int`): seed of the permutations.
    """

    def __init__(
        self, num_real: int, num_synthetic: int, batch_size: int, synthetic_ratio: float = 0.0, seed: int = 0
    ):
        if not 0.0 <= synthetic_ratio < 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}.")
        self.synthetic_per_batch = int(round(synthetic_ratio * batch_size))
        if self.synthetic_per_batch and num_synthetic < 1:
            raise ValueError(f"synthetic_ratio={synthetic_ratio} needs synthetic images, but there are none.")
        self.real_per_batch = batch_size - self.synthetic_per_batch
        if self.real_per_batch < 1 or num_real < self.real_per_batch:
            raise ValueError(
                f"{num_real} real images cannot fill one batch with {self.real_per_batch} real rows (batch_size "
                f"{batch_size}, synthetic_ratio {synthetic_ratio})."
            )
        self.num_real, self.num_synthetic = int(num_real), int(num_synthetic)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def __len__(self) -> int:
        return self.num_real // self.real_per_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _synthetic_rows(self, start: int, count: int) -> np.ndarray:
        """Positions `start .. start + count` of the endless synthetic stream (cycle `c` = permutation `(seed, c)`)."""
        cycles, positions = np.divmod(np.arange(start, start + count), self.num_synthetic)
        rows = np.empty(count, dtype=np.int64)
        for cycle in np.unique(cycles):
            order = np.random.default_rng((self.seed, 1, int(cycle))).permutation(self.num_synthetic)
            selected = cycles == cycle
            rows[selected] = order[positions[selected]]
        return rows + self.num_real

    def __iter__(self):
        num_batches = len(self)
        real = np.random.default_rng((self.seed, 0, self.epoch)).permutation(self.num_real)
        real = real[: num_batches * self.real_per_batch].reshape(num_batches, self.real_per_batch)
        if self.synthetic_per_batch:
            count = num_batches * self.synthetic_per_batch
            synthetic = self._synthetic_rows(self.epoch * count, count).reshape(num_batches, -1)
            batches = np.concatenate([real, synthetic], axis=1)
        else:
            batches = real
        yield from batches.tolist()
