"""Class-agnostic synthetic images for distillation (docs/methods.md section 3): random pairs of training images mixed
by an [`ImageMixerPipeline`], written as a resumable, sharded `datasets` parquet set with provenance columns.

Synthetic image `i` is a pure function of `(seed, i)` and the settings: its two source images (distinct, drawn
uniformly whatever their classes), its mixing weights and its diffusion noise (the initial latents and the noise of
stochastic scheduler steps) all come from generators seeded with `(seed, i)`. So any subset of indices can be
(re)generated alone: a killed run is completed by running the same command again, which writes only the missing
shards.

```python
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.synthetic import ImageMixerPipeline, SynthesisSettings, load_synthetic_dataset, synthesize

settings = SynthesisSettings(source_dataset="outputs/data/fashion-mnist", pipeline="outputs/image-mixer", num_images=64)
sources = load_image_dataset(settings.source_dataset, settings.image_column, settings.split)
pipeline = ImageMixerPipeline.from_pretrained(settings.pipeline).to("cuda")
synthesize(settings, "outputs/synthetic/mixes", pipeline, sources)
dataset = load_synthetic_dataset("outputs/synthetic/mixes")  # image, index, source_indices, weights, ...
write_dataset_card("outputs/synthetic/mixes", repo_id="me/fashion-mnist-mixes")  # README.md: the provenance
push_synthetic_dataset("outputs/synthetic/mixes", "me/fashion-mnist-mixes")  # shards + card + settings, nothing else
```

Published names: a Hub id is recorded as it is, a local path only as its folder name (`/data/me/mnist` -> `mnist`),
in the rows, the card and the uploaded `synthesis_config.json`; no absolute path of this machine is uploaded.
"""

import importlib.resources
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi
from tqdm.auto import tqdm

from ..data.image_datasets import to_rgb
from ..data.synthetic_dataset import (
    CONFIG_FILE,
    DATA_DIR,
    expected_shards,
    is_synthesis_folder,
    missing_shards,
    read_synthesis_config,
    shard_name,
)
from ..hub.provenance import is_hub_id, is_local_path, publishable_name, scrub_local_paths
from ..hub.push import _check_no_secret
from ..io_utils import atomic_path, write_json_atomically, write_text_atomically
from ..precision import DTYPES
from .pipeline_image_mixer import ImageMixerPipeline

logger = logging.getLogger(__name__)

TORCH_DTYPES = DTYPES  # the explicit dtypes; `auto` is resolved by the recipe ([`resolve_dtype`])

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
"""The columns of a synthetic set: the PNG image, its index, its provenance and the generation settings (`pipeline`
and `source_dataset` as published names: a Hub id, or the folder name of a local path)."""
CARD_FILE = "README.md"


@dataclass
class SynthesisSettings:
    """Everything that determines the synthetic set (saved as `synthesis_config.json`; a rerun must match it).

    Args:
        source_dataset, split, image_column, label_column: the labelled source images (`label_column` `None` or
            `""`: no labels, `source_labels` is -1; labels are only recorded as provenance, pairs ignore them).
        pipeline: path or Hub id of the ImageMixer pipeline.
        num_images: size of the synthetic set.
        seed: seed of the pairs, weights and noise (>= 0).
        num_inference_steps, guidance_scale, height, width: generation settings (`height` / `width` `None`: the
            pipeline's default).
        weights: the fixed weights of the two sources (ImageMixer's demo: equal weights), or, with `random_weights`,
            the `[low, high]` range the weight `w` of the first source is drawn from, uniformly; the second gets
            `1 - w`.
        random_weights: draw the weights per image.
        shard_size: images per output file.
        torch_dtype: dtype of the pipeline (one of `TORCH_DTYPES`): it changes the pixels, so a set is made in one.
    """

    source_dataset: str = field(
        metadata={
            "help": "Labelled source images: Hub id, image folder or save_to_disk folder.",
            "aliases": ["--dataset"],
        }
    )
    pipeline: str = field(
        metadata={"help": "ImageMixer pipeline: a converted folder (convert_image_mixer) or Hub id."}
    )
    num_images: int = field(metadata={"help": "Number of synthetic images N (indices 0..N-1)."})
    split: str = field(
        default="train", metadata={"help": "Split of the source dataset.", "aliases": ["--dataset_split"]}
    )
    image_column: str = field(default="image", metadata={"help": "Image column of the source dataset."})
    label_column: str | None = field(
        default="label", metadata={"help": "Label column, recorded as provenance only ('' for none)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the pairs, weights and noise (image i: (seed, i))."})
    num_inference_steps: int = field(default=30, metadata={"help": "Denoising steps (DDIM 30-40 in ImageMixer)."})
    guidance_scale: float = field(
        default=3.0, metadata={"help": "Classifier-free guidance scale (ImageMixer: 3-3.5)."}
    )
    height: int | None = field(default=None, metadata={"help": "Image height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the pipeline's)."})
    weights: list[float] = field(
        default_factory=lambda: (1.0, 1.0),
        metadata={"help": "Fixed weights of the two sources, or with --random_weights the [low, high] range of the "
                  "first one's weight w (the second gets 1 - w); stored as a tuple."},
    )  # fmt: skip
    random_weights: bool = field(default=False, metadata={"help": "Draw the weights per image: w ~ U(low, high)."})
    shard_size: int = field(default=256, metadata={"help": "Images per output shard (the unit of resuming)."})
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": f"Pipeline dtype, one of {list(TORCH_DTYPES)}, or (in recipes/synthesize.py) auto: bfloat16 "
            "where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else float32; "
            "resolved before it is recorded in the set."
        },
    )

    def __post_init__(self):
        self.weights = tuple(float(w) for w in self.weights)
        self.label_column = self.label_column or None
        problems = []
        for name in ("num_images", "shard_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(
                    f"{name} must be >= 1 (or unset for the pipeline's default), got {getattr(self, name)}"
                )
        if len(self.weights) != 2 or not all(np.isfinite(self.weights)):
            problems.append(f"weights must be two finite numbers, got {list(self.weights)}")
        elif self.random_weights and not 0.0 <= self.weights[0] <= self.weights[1] <= 1.0:
            problems.append(f"with random_weights, weights is a range 0 <= low <= high <= 1, got {list(self.weights)}")
        if self.torch_dtype not in TORCH_DTYPES:
            problems.append(f"torch_dtype must be one of {list(TORCH_DTYPES)}, got {self.torch_dtype!r}")
        if problems:
            raise ValueError("Invalid synthesis settings: " + "; ".join(problems) + ".")

    def to_dict(self) -> dict:
        return {**asdict(self), "weights": list(self.weights)}


def mix_plan(settings: SynthesisSettings, indices: np.ndarray, num_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """The source pairs `[n, 2]` (two distinct rows of the source dataset, classes ignored) and weights `[n, 2]` of
    the synthetic images `indices`, each a function of `(seed, index)` only (not of N nor of the batching)."""
    if num_sources < 2:
        raise ValueError(f"Mixing needs at least 2 source images, got {num_sources}.")
    pairs = np.empty((len(indices), 2), dtype=np.int64)
    weights = np.empty((len(indices), 2), dtype=np.float32)
    for row, index in enumerate(indices):  # one tiny generator per image
        rng = np.random.default_rng((settings.seed, 0, int(index)))
        first = rng.integers(num_sources)
        second = (first + 1 + rng.integers(num_sources - 1)) % num_sources  # uniform over the other rows
        pairs[row] = first, second
        if settings.random_weights:
            w = rng.uniform(*settings.weights)
            weights[row] = w, 1.0 - w
        else:
            weights[row] = settings.weights
    return pairs, weights


def noise_generators(settings: SynthesisSettings, indices: np.ndarray) -> list[torch.Generator]:
    """One CPU generator per image of `indices`, seeded by `(seed, index)`: it draws the image's initial latents,
    then the noise of stochastic scheduler steps (DDPM, Euler ancestral, DDIM with eta > 0)."""
    seeds = [int(np.random.default_rng((settings.seed, 1, int(index))).integers(2**62)) for index in indices]
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def check_output_dir(output_dir: str, settings: SynthesisSettings, num_source_images: int | None = None) -> None:
    """Raise if `output_dir` holds a synthesis made with other settings (cheap: call it before loading any model),
    or, given `num_source_images`, from a source dataset of another size (the pairs would differ)."""
    if not is_synthesis_folder(output_dir):
        if os.path.isdir(output_dir) and os.listdir(output_dir):
            raise ValueError(
                f"{output_dir} exists and is not a synthesis folder (no {CONFIG_FILE}): choose another --output_dir."
            )
        return
    saved = read_synthesis_config(output_dir)
    changed = {key: (saved.get(key), value) for key, value in settings.to_dict().items() if saved.get(key) != value}
    if changed:
        raise ValueError(
            f"{output_dir} holds a synthetic set made with other settings (saved vs now): "
            + ", ".join(f"{key} {old!r} vs {new!r}" for key, (old, new) in changed.items())
            + ". Rerun with the same options to complete it, or use another --output_dir."
        )
    saved_sources = saved.get("num_source_images")
    if num_source_images is not None and saved_sources is not None and saved_sources != num_source_images:
        raise ValueError(
            f"{output_dir} was made from {saved_sources} source images but {settings.source_dataset} split "
            f"{settings.split!r} now has {num_source_images}: the pairs would differ. Use another --output_dir."
        )


def check_sources(sources: Dataset, settings: SynthesisSettings) -> None:
    """Raise before any generation if the source split cannot be mixed: fewer than 2 images or a missing column."""
    if len(sources) < 2:
        raise ValueError(
            f"Mixing needs at least 2 source images; {settings.source_dataset} split {settings.split!r} has "
            f"{len(sources)}."
        )
    for option, column in (("--image_column", settings.image_column), ("--label_column", settings.label_column)):
        if column is not None and column not in sources.column_names:
            hint = " (or --label_column '' to record no labels)" if option == "--label_column" else ""
            raise ValueError(
                f"{settings.source_dataset} has no column {column!r}; its columns are {sources.column_names}. "
                f"Pass the right name with {option}{hint}."
            )


def _label_ids(sources: Dataset, label_column: str | None) -> np.ndarray:
    """Integer labels of the source rows (provenance only): int labels as they are, others numbered in sorted order,
    -1 without a label column."""
    if label_column is None:
        return np.full(len(sources), -1, dtype=np.int64)
    values = np.asarray(sources[label_column])
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.unique(values, return_inverse=True)[1].astype(np.int64)


def _write_shard(path: str, rows: dict) -> None:
    """Write one shard atomically: a hidden temporary file in the same folder, renamed when complete."""
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # one "Creating parquet" bar per shard would break the images bar
    try:
        with atomic_path(path) as temporary:
            Dataset.from_dict(rows, features=FEATURES).to_parquet(temporary)
    finally:
        if not quiet:
            enable_progress_bars()


def _remove_stray_temporary_files(data_dir: str) -> None:
    """Remove the hidden temporary files that a killed run left (`atomic_path` names them `.NAME.XXXX.tmp`)."""
    for name in os.listdir(data_dir):
        if name.startswith(".shard-") and name.endswith(".tmp"):
            logger.info("Removing %s, left by an interrupted run", name)
            os.remove(os.path.join(data_dir, name))


def synthesize(
    settings: SynthesisSettings,
    output_dir: str,
    pipeline: ImageMixerPipeline,
    sources: Dataset,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Write the missing shards of the synthetic set to `output_dir/data`; returns the paths of all its shards.

    Args:
        settings: what to generate; checked against `output_dir/synthesis_config.json` when it exists.
        output_dir: the synthesis folder (created; an existing non-synthesis folder must be empty).
        pipeline: the ImageMixer pipeline, already on its device and in `settings.torch_dtype`.
        sources: the source split (`load_image_dataset(settings.source_dataset, ...)`).
        batch_size: mixes per pipeline call; the CLIP embedding of a source image used twice in a batch is computed
            once. It does not change which images are made (only float rounding).
        show_progress: show a progress bar over the images with the generation speed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_sources(sources, settings)
    check_output_dir(output_dir, settings, len(sources))
    data_dir = os.path.join(output_dir, DATA_DIR)
    os.makedirs(data_dir, exist_ok=True)
    write_json_atomically(
        os.path.join(output_dir, CONFIG_FILE), {**settings.to_dict(), "num_source_images": len(sources)}
    )
    _remove_stray_temporary_files(data_dir)
    shards = expected_shards(settings.num_images, settings.shard_size)
    paths = [os.path.join(data_dir, shard_name(start, stop)) for start, stop in shards]
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
            # one object per source: one CLIP embedding; 8-bit RGB as in training (16-bit images scaled, not clipped)
            loaded = {row: to_rgb(image) for row, image in zip(rows, sources.select(rows)[settings.image_column])}
            mixes = [
                [(loaded[a], float(wa)), (loaded[b], float(wb))]
                for (a, b), (wa, wb) in zip(pairs[batch], weights[batch])
            ]
            generators = noise_generators(settings, indices[batch])
            latents = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])  # CPU float32
            images += pipeline(
                mixes,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=height,
                width=width,
                latents=latents,
                generator=generators,  # the same per-image streams go on with the scheduler's step noise
            ).images
            progress.update(len(mixes))
            generated += len(mixes)
            progress.set_postfix(img_per_s=f"{generated / (time.perf_counter() - started):.2f}")
        count = len(indices)
        _write_shard(
            path,
            {
                "image": images,
                "index": indices.tolist(),
                "source_indices": pairs.tolist(),
                "source_labels": label_ids[pairs].tolist(),
                "weights": weights.tolist(),
                "seed": [settings.seed] * count,
                "num_inference_steps": [settings.num_inference_steps] * count,
                "guidance_scale": [settings.guidance_scale] * count,
                "pipeline": [publishable_name(settings.pipeline)] * count,
                "source_dataset": [publishable_name(settings.source_dataset)] * count,
            },
        )
        logger.debug("Wrote %s", path)
    progress.close()
    if generated:
        logger.info("Generated %d images at %.2f img/s", generated, generated / (time.perf_counter() - started))
    return paths


def _size_category(n: int) -> str:
    """The Hub's `size_categories` value for `n` examples."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _scheduler_name(pipeline: str) -> str | None:
    """The scheduler class of a local pipeline folder (its `model_index.json`), `None` when it cannot be read."""
    try:
        with open(os.path.join(pipeline, "model_index.json"), encoding="utf-8") as handle:
            entry = json.load(handle).get("scheduler")
    except (OSError, ValueError):
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _published_config(output_dir: str) -> dict:
    """`synthesis_config.json` as it is published: local paths replaced by their folder names."""
    config = read_synthesis_config(output_dir)
    for key in ("source_dataset", "pipeline"):
        config[key] = publishable_name(config[key])
    return scrub_local_paths(config)


def synthesis_card(output_dir: str, repo_id: str | None = None) -> DatasetCard:
    """The dataset card of the synthetic set in `output_dir`, rendered from the packaged template
    `hf_distill/templates/synthetic_dataset_card.md`: its provenance (source dataset, pipeline and scheduler, number of
    images, seed, weights distribution, denoising steps, guidance, size, dtype; also under `hf_distill:` in the
    metadata), how to load it and a license note. Local paths appear as their folder names only.

    Args:
        output_dir: a synthesis folder (`synthesis_config.json` + `data/`).
        repo_id: the Hub dataset id the set is (or will be) pushed to, for the loading example.
    """
    config = _published_config(output_dir)
    settings = SynthesisSettings(**{key: config[key] for key in SynthesisSettings.__dataclass_fields__})
    low, high = settings.weights
    if settings.random_weights:
        weights = f"random per image: `w ~ U({low}, {high})` for the first source, `1 - w` for the second"
    else:
        weights = f"fixed: {low} for the first source, {high} for the second"
    size = (
        "the pipeline's default"
        if settings.height is None and settings.width is None
        else (f"{settings.height or 'default'} x {settings.width or 'default'} (height x width)")
    )
    source = settings.source_dataset
    title = f"ImageMixer mixes of {source}"
    scheduler = _scheduler_name(read_synthesis_config(output_dir)["pipeline"])
    card_data = DatasetCardData(
        pretty_name=title,
        license="other",
        size_categories=[_size_category(settings.num_images)],
        source_datasets=[source] if is_hub_id(source) else None,
        tags=["synthetic", "image-mixer", "knowledge-distillation", "hf_distill"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        hf_distill={"synthesis": {**config, **({"scheduler": scheduler} if scheduler else {})}},
    )
    template = importlib.resources.files("hf_distill").joinpath("templates", "synthetic_dataset_card.md")
    return DatasetCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        pretty_name=title,
        source_dataset=source,
        pipeline=settings.pipeline,
        scheduler=scheduler,
        split=settings.split,
        image_column=settings.image_column,
        num_source_images=config.get("num_source_images", "?"),
        num_images=settings.num_images,
        num_shards=len(expected_shards(settings.num_images, settings.shard_size)),
        shard_size=settings.shard_size,
        weights=weights,
        seed=settings.seed,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        size=size,
        torch_dtype=settings.torch_dtype,
        repo_id=repo_id or f"<user>/{os.path.basename(os.path.abspath(output_dir))}",
    )


def write_dataset_card(output_dir: str, repo_id: str | None = None) -> str:
    """Write [`synthesis_card`] to `output_dir/README.md` atomically; returns its path."""
    path = os.path.join(output_dir, CARD_FILE)
    write_text_atomically(path, str(synthesis_card(output_dir, repo_id)))
    return path


def dataset_file_list(output_dir: str) -> list[str]:
    """What a push of the synthesis folder uploads: `README.md`, `synthesis_config.json` (as published: see
    [`synthesis_card`]) and the data shards of the complete set, nothing else (no temporary or stray file). Raises a
    `ValueError` when the set is incomplete, has no card, or its rows record a local path."""
    if not is_synthesis_folder(output_dir):
        raise ValueError(f"{output_dir} is not a synthesis folder (no {CONFIG_FILE}): write one with synthesize.")
    missing = missing_shards(output_dir)
    if missing:
        raise ValueError(
            f"{output_dir} is incomplete ({len(missing)} shard(s) missing): run the same recipes/synthesize.py "
            "command again to complete it before pushing."
        )
    if not os.path.isfile(os.path.join(output_dir, CARD_FILE)):
        raise ValueError(f"{output_dir} has no {CARD_FILE}: write it with write_dataset_card first.")
    config = read_synthesis_config(output_dir)
    shards = [
        f"{DATA_DIR}/{shard_name(start, stop)}"
        for start, stop in expected_shards(config["num_images"], config["shard_size"])
    ]
    for shard in shards:  # sets made before the rows recorded published names
        table = pq.read_table(os.path.join(output_dir, shard), columns=["pipeline", "source_dataset"])
        local = sorted({value for column in table.columns for value in column.to_pylist() if is_local_path(value)})
        if local:
            raise ValueError(
                f"{shard} of {output_dir} records local paths ({', '.join(local)}): regenerate the set into a new "
                "folder (rows now record published names) before pushing it."
            )
    return [CARD_FILE, CONFIG_FILE, *shards]


def push_synthetic_dataset(
    output_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload synthetic ImageMixer set with hf_distill",
) -> str:
    """Push the complete synthetic set of `output_dir` to the Hub dataset repo `repo_id` (created if needed), in one
    commit of exactly [`dataset_file_list`]: the card, the published `synthesis_config.json` and the data shards.
    Everything is checked before any network call (complete set, card, no local path, no Hub token in a file).
    Returns the URL of the commit."""
    files = dataset_file_list(output_dir)
    config = (json.dumps(_published_config(output_dir), indent=2) + "\n").encode()
    _check_no_secret(Path(output_dir), [name for name in files if name != CONFIG_FILE], token)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=config if name == CONFIG_FILE else os.path.join(output_dir, name)
        )
        for name in files
    ]
    commit = api.create_commit(
        repo_id, operations, commit_message=commit_message, repo_type="dataset", revision=revision
    )
    logger.info("Pushed %d files of %s to the dataset repo %s", len(files), output_dir, repo_id)
    return commit.commit_url
