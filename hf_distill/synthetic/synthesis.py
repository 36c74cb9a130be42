"""Class-agnostic synthetic images for distillation (REFERENCE.md section 3): random pairs of training images mixed
by an [`ImageMixerPipeline`], written as a resumable, sharded `datasets` parquet set with provenance columns.

Synthetic image `i` is a pure function of `(seed, i)` and the settings: its two source images (distinct, drawn
uniformly whatever their classes), its mixing weights and its initial noise all come from generators seeded with
`(seed, i)`. So any subset of indices can be (re)generated alone: a killed run is completed by running the same
command again, which writes only the missing shards.
"""

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from tqdm.auto import tqdm

from ..data.synthetic_dataset import (
    CONFIG_FILE,
    DATA_DIR,
    expected_shards,
    is_synthesis_folder,
    read_synthesis_config,
    shard_name,
)
from ..io_utils import atomic_path, write_json_atomically
from .pipeline_image_mixer import ImageMixerPipeline

logger = logging.getLogger(__name__)

FEATURES = Features(
    {
        "image": ImageFeature(),
        "index": Value("int64"),
        "source_indices": Sequence(Value("int64")),
        "source_labels": Sequence(Value("int64")),
        "weights": Sequence(Value("float32")),
        "seed": Value("int64"),
        "num_inference_steps": Value("int64"),
        "guidance_scale": Value("float32"),
        "pipeline": Value("string"),
        "source_dataset": Value("string"),
    }
)


@dataclass
class SynthesisSettings:
    """Everything that determines the synthetic set (saved as `synthesis_config.json`; a rerun must match it).

    Args:
        source_dataset, split, image_column, label_column: the labelled source images (`label_column` may be `None`;
            labels are only recorded as provenance, pairs ignore them).
        pipeline: path or Hub id of the ImageMixer pipeline.
        num_images: size of the synthetic set.
        seed: seed of the pairs, weights and noise.
        num_inference_steps, guidance_scale, height, width: generation settings (`height` / `width` `None`: the
            pipeline's default).
        mix_weights: fixed weight of each of the two sources, or, with `random_weights`, the `[low, high]` range the
            weight of the first source is drawn from (the second gets `1 - w`).
        random_weights: draw the weights per image.
        shard_size: images per output file.
    """

    source_dataset: str
    pipeline: str
    num_images: int
    split: str = "train"
    image_column: str = "image"
    label_column: str | None = "label"
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    height: int | None = None
    width: int | None = None
    mix_weights: tuple[float, float] = (1.0, 1.0)
    random_weights: bool = False
    shard_size: int = 256

    def __post_init__(self):
        self.mix_weights = tuple(float(w) for w in self.mix_weights)
        problems = []
        if self.num_images < 1:
            problems.append(f"num_images must be >= 1, got {self.num_images}")
        if self.shard_size < 1:
            problems.append(f"shard_size must be >= 1, got {self.shard_size}")
        if self.num_inference_steps < 1:
            problems.append(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if len(self.mix_weights) != 2 or not all(np.isfinite(self.mix_weights)):
            problems.append(f"mix_weights must be two finite numbers, got {list(self.mix_weights)}")
        elif self.random_weights and not 0.0 <= self.mix_weights[0] <= self.mix_weights[1] <= 1.0:
            problems.append(
                f"with random_weights, mix_weights is a range 0 <= low <= high <= 1, got {self.mix_weights}"
            )
        if problems:
            raise ValueError("Invalid synthesis settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict:
        return {**asdict(self), "mix_weights": list(self.mix_weights)}


def mix_plan(settings: SynthesisSettings, indices: np.ndarray, num_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Source pairs `[n, 2]` (distinct rows of the source dataset) and weights `[n, 2]` of synthetic `indices`,
    each a function of `(seed, index)` only."""
    pairs = np.empty((len(indices), 2), dtype=np.int64)
    weights = np.empty((len(indices), 2), dtype=np.float32)
    for row, index in enumerate(indices):  # one tiny generator per image: independent of N and of the batching
        rng = np.random.default_rng((settings.seed, 0, int(index)))
        first = rng.integers(num_sources)
        second = (first + 1 + rng.integers(num_sources - 1)) % num_sources  # uniform over the other rows
        pairs[row] = first, second
        if settings.random_weights:
            w = rng.uniform(*settings.mix_weights)
            weights[row] = w, 1.0 - w
        else:
            weights[row] = settings.mix_weights
    return pairs, weights


def initial_latents(settings: SynthesisSettings, indices: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """The initial noise of every image in `indices`, `[n, *shape]`, each from its own generator seeded by
    `(seed, index)` (CPU, float32: the same on every device)."""
    latents = []
    for index in indices:
        seed = int(np.random.default_rng((settings.seed, 1, int(index))).integers(2**62))
        latents.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(latents)


def check_output_dir(output_dir: str, settings: SynthesisSettings) -> None:
    """Raise if `output_dir` holds a synthesis with other settings (before any model is loaded)."""
    if not is_synthesis_folder(output_dir):
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            raise ValueError(
                f"{output_dir} exists and is not a synthesis folder (no {CONFIG_FILE}): choose another --output_dir."
            )
        return
    saved = read_synthesis_config(output_dir)
    current = settings.to_dict()
    changed = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if changed:
        raise ValueError(
            f"{output_dir} holds a synthetic set made with other settings (saved vs now): "
            + ", ".join(f"{key} {old!r} vs {new!r}" for key, (old, new) in changed.items())
            + ". Rerun with the same options to complete it, or use another --output_dir."
        )


def _label_ids(sources: Dataset, label_column: str | None) -> np.ndarray:
    """Integer labels of the source rows (provenance only): int labels as they are, others numbered in sorted order,
    -1 without a label column."""
    if not label_column or label_column not in sources.column_names:
        return np.full(len(sources), -1, dtype=np.int64)
    values = np.asarray(sources[label_column])
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.unique(values, return_inverse=True)[1].astype(np.int64)


def _write_shard(path: str, rows: dict) -> None:
    with atomic_path(path) as temporary:
        Dataset.from_dict(rows, features=FEATURES).to_parquet(temporary)


def synthesize(
    settings: SynthesisSettings,
    output_dir: str,
    pipeline: ImageMixerPipeline,
    sources: Dataset,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Write the missing shards of the synthetic set to `output_dir/data`; returns the paths of all its shards.

    `sources` is the source split (already loaded and checked); `pipeline` is on its device.
    """
    if len(sources) < 2:
        raise ValueError(f"Mixing needs at least 2 source images; {settings.source_dataset} has {len(sources)}.")
    check_output_dir(output_dir, settings)
    os.makedirs(os.path.join(output_dir, DATA_DIR), exist_ok=True)
    write_json_atomically(os.path.join(output_dir, CONFIG_FILE), settings.to_dict())
    for name in os.listdir(os.path.join(output_dir, DATA_DIR)):  # leftovers of a killed write
        if not name.endswith(".parquet"):
            os.remove(os.path.join(output_dir, DATA_DIR, name))
    shards = expected_shards(settings.num_images, settings.shard_size)
    paths = [os.path.join(output_dir, DATA_DIR, shard_name(start, stop)) for start, stop in shards]
    todo = [(shard, path) for shard, path in zip(shards, paths) if not os.path.exists(path)]
    done_images = settings.num_images - sum(stop - start for (start, stop), _ in todo)
    logger.info(
        "%d of %d shards already written (%d images); generating %d images in %d shards",
        len(shards) - len(todo), len(shards), done_images, settings.num_images - done_images, len(todo),
    )  # fmt: skip
    scale = pipeline.vae_scale_factor
    height = settings.height or pipeline.unet.config.sample_size * scale
    width = settings.width or pipeline.unet.config.sample_size * scale
    latent_shape = (pipeline.unet.config.in_channels, height // scale, width // scale)
    label_ids = _label_ids(sources, settings.label_column)
    progress = tqdm(
        total=settings.num_images, initial=done_images, unit="img", desc="Synthesizing", disable=not show_progress
    )
    pipeline.set_progress_bar_config(disable=True)
    started, generated = time.perf_counter(), 0
    for (start, stop), path in todo:
        indices = np.arange(start, stop)
        pairs, weights = mix_plan(settings, indices, len(sources))
        images = []
        for first in range(0, len(indices), batch_size):
            batch = slice(first, first + batch_size)
            rows = sorted(set(pairs[batch].ravel().tolist()))
            loaded = dict(zip(rows, sources.select(rows)[settings.image_column]))  # each source decoded once
            mixes = [
                [(loaded[a], float(wa)), (loaded[b], float(wb))]
                for (a, b), (wa, wb) in zip(pairs[batch], weights[batch])
            ]
            images += pipeline(
                mixes,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=height,
                width=width,
                latents=initial_latents(settings, indices[batch], latent_shape),
            ).images
            progress.update(len(mixes))
            generated += len(mixes)
            progress.set_postfix(img_per_s=f"{generated / (time.perf_counter() - started):.2f}")
        source_labels = label_ids[pairs].tolist()
        _write_shard(
            path,
            {
                "image": images,
                "index": indices.tolist(),
                "source_indices": pairs.tolist(),
                "source_labels": source_labels,
                "weights": weights.tolist(),
                "seed": [settings.seed] * len(indices),
                "num_inference_steps": [settings.num_inference_steps] * len(indices),
                "guidance_scale": [settings.guidance_scale] * len(indices),
                "pipeline": [settings.pipeline] * len(indices),
                "source_dataset": [settings.source_dataset] * len(indices),
            },
        )
        logger.debug("Wrote %s", path)
    progress.close()
    if generated:
        logger.info("Generated %d images at %.2f img/s", generated, generated / (time.perf_counter() - started))
    return paths
