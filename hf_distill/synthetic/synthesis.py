"""Class-agnostic synthetic images for distillation (docs/methods.md section 3): random pairs of training images mixed
by an [`ImageMixerPipeline`] (or, with `generator="pixel-mixup"`, by the cheap pixel-space stand-in of
`pixel_mixup.py`), written as a resumable, sharded `datasets` parquet set with provenance columns.

Synthetic image `i` is a pure function of `(seed, i)` and the settings: its two source images (distinct, drawn
uniformly whatever their classes), its mixing weights and its diffusion noise (the initial latents and the noise of
stochastic scheduler steps) all come from generators seeded with `(seed, i)`. So any subset of indices can be
(re)generated alone: a killed run is completed by running the same command again, which writes only the missing
shards.

```python
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.synthetic import (
    ImageMixerPipeline,
    SynthesisSettings,
    load_synthetic_dataset,
    push_synthetic_dataset,
    synthesize,
    write_dataset_card,
)

settings = SynthesisSettings(source_dataset="outputs/data/fashion-mnist", pipeline="outputs/image-mixer", num_images=64)
sources = load_image_dataset(settings.source_dataset, settings.image_column, settings.split)
pipeline = ImageMixerPipeline.from_pretrained(settings.pipeline).to("cuda")
synthesize(settings, "outputs/synthetic/mixes", pipeline, sources)
dataset = load_synthetic_dataset("outputs/synthetic/mixes")  # image, index, source_indices, weights, ...
write_dataset_card("outputs/synthetic/mixes", repo_id="me/fashion-mnist-mixes")  # README.md: the provenance
push_synthetic_dataset("outputs/synthetic/mixes", "me/fashion-mnist-mixes")  # shards + card + settings, nothing else
```

Published names: a Hub id is recorded as it is, a local path only as its folder name (`/data/me/mnist` -> `mnist`),
in the rows, the card and the uploaded `synthesis_config.json`; no absolute path of this machine is uploaded. The card
and the upload: `hf_distill/synthetic/publishing.py`.
"""

import logging
import os
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from ..data.image_datasets import to_rgb
from ..data.synthetic_dataset import (
    CONFIG_FILE,
    DATA_DIR,
    expected_shards,
    is_synthesis_folder,
    read_synthesis_config,
    shard_name,
)
from ..hub.provenance import publishable_name
from ..io_utils import atomic_path, write_json_atomically
from ..precision import DTYPES
from .pipeline_image_mixer import ImageMixerPipeline
from .pixel_mixup import GENERATOR_LABELS, GENERATORS, IMAGE_MIXER, PIXEL_MIXUP, mix_pixels

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
        "generator": Value("string"),
    }
)
"""The columns of a synthetic set: the PNG image, its index, its provenance and the generation settings (`pipeline`
and `source_dataset` as published names: a Hub id, or the folder name of a local path; `generator` the name of what
made the image, `GENERATOR_LABELS`). Pixel mixup rows have no pipeline and no diffusion settings (null)."""


@dataclass
class SynthesisSettings:
    """Everything that determines the synthetic set (saved as `synthesis_config.json`; a rerun must match it).

    Args:
        source_dataset, split, image_column, label_column: the labelled source images (`label_column` `None` or
            `""`: no labels, `source_labels` is -1; labels are only recorded as provenance, pairs ignore them).
        pipeline: path or Hub id of the ImageMixer pipeline (`None` with `generator="pixel-mixup"`).
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
        generator: `"image-mixer"` (the diffusion pipeline) or `"pixel-mixup"`: `lam * a + (1 - lam) * b` in pixel
            space, `lam ~ Beta(mix_alpha, mix_alpha)` recorded as the weights `[lam, 1 - lam]`; a cheap stand-in,
            labelled "pixel mixup (stand-in for ImageMixer)" in the rows and the card. It uses no pipeline and no
            diffusion setting (`weights`, `random_weights`, steps, guidance, dtype stay at their defaults).
        mix_alpha: the Beta parameter of pixel mixup (> 0; mixup's usual 0.2-0.4 puts most images near a source).
    """

    source_dataset: str = field(
        metadata={
            "help": "Labelled source images: Hub id, image folder or save_to_disk folder.",
            "aliases": ["--dataset"],
        }
    )
    pipeline: str | None = field(
        metadata={"help": "ImageMixer pipeline: a converted folder (convert_image_mixer) or Hub id (none for "
                  "--generator pixel-mixup)."}
    )  # fmt: skip
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

    generator: str = field(
        default=IMAGE_MIXER,
        metadata={"help": f"What mixes the pairs, one of {list(GENERATORS)}: {PIXEL_MIXUP} is a cheap pixel-space "
                  "stand-in for ImageMixer (no model), labelled as such in the set.", "choices": list(GENERATORS)},
    )  # fmt: skip
    mix_alpha: float = field(
        default=0.4, metadata={"help": f"{PIXEL_MIXUP}: the weight of the first image is lam ~ Beta(a, a)."}
    )

    def __post_init__(self):
        self.weights = tuple(float(w) for w in self.weights)
        self.label_column = self.label_column or None
        self.pipeline = self.pipeline or None
        problems = []
        if self.generator == IMAGE_MIXER and self.pipeline is None:
            problems.append(f"pipeline is required with generator {IMAGE_MIXER} (or use generator {PIXEL_MIXUP})")
        elif self.generator == PIXEL_MIXUP:
            if self.pipeline is not None:
                problems.append(f"generator {PIXEL_MIXUP} runs no pipeline: leave pipeline unset")
            unused = ("weights", "random_weights", "num_inference_steps", "guidance_scale", "torch_dtype")
            defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(self)
                        if f.name in unused}  # fmt: skip
            defaults["weights"] = tuple(defaults["weights"])
            changed = [name for name in unused if getattr(self, name) != defaults[name]]
            if changed:
                problems.append(f"generator {PIXEL_MIXUP} does not use {', '.join(changed)}: leave them unset")
            if (self.height is None) != (self.width is None):
                problems.append(f"generator {PIXEL_MIXUP} needs both height and width, or neither (the source size)")
            if not (np.isfinite(self.mix_alpha) and self.mix_alpha > 0):
                problems.append(f"mix_alpha must be > 0, got {self.mix_alpha}")
        elif self.generator not in GENERATORS:
            problems.append(f"generator must be one of {list(GENERATORS)}, got {self.generator!r}")
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
        if settings.generator == PIXEL_MIXUP:
            lam = rng.beta(settings.mix_alpha, settings.mix_alpha)
            weights[row] = lam, 1.0 - lam
        elif settings.random_weights:
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
    saved = {**_OLDER_SETS, **read_synthesis_config(output_dir)}
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


_OLDER_SETS = {"generator": IMAGE_MIXER, "mix_alpha": 0.4}  # what a set made before these settings existed used


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
    pipeline: ImageMixerPipeline | None,
    sources: Dataset,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Write the missing shards of the synthetic set to `output_dir/data`; returns the paths of all its shards.

    Args:
        settings: what to generate; checked against `output_dir/synthesis_config.json` when it exists.
        output_dir: the synthesis folder (created; an existing non-synthesis folder must be empty).
        pipeline: the ImageMixer pipeline, already on its device and in `settings.torch_dtype` (`None` for
            `settings.generator == "pixel-mixup"`, which mixes the pixels of the sources, at `height` x `width` when
            set, else at the first source's size).
        sources: the source split (`load_image_dataset(settings.source_dataset, ...)`).
        batch_size: mixes per pipeline call; the CLIP embedding of a source image used twice in a batch is computed
            once. It does not change which images are made (only float rounding).
        show_progress: show a progress bar over the images with the generation speed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if (pipeline is None) != (settings.generator == PIXEL_MIXUP):
        needs = "an ImageMixer pipeline" if settings.generator == IMAGE_MIXER else "no pipeline (pass None)"
        raise ValueError(f"generator {settings.generator} needs {needs}.")
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
    label = GENERATOR_LABELS[settings.generator]
    logger.info(
        "%d of %d shards already written (%d images); generating %d images in %d shards with %s",
        len(shards) - len(todo), len(shards), done_images, settings.num_images - done_images, len(todo), label,
    )  # fmt: skip
    if pipeline is not None:
        scale = pipeline.vae_scale_factor
        height = settings.height or pipeline.unet.config.sample_size * scale
        width = settings.width or pipeline.unet.config.sample_size * scale
        latent_shape = (pipeline.unet.config.in_channels, height // scale, width // scale)
        pipeline.set_progress_bar_config(disable=True)
    label_ids = _label_ids(sources, settings.label_column)
    progress = tqdm(
        total=settings.num_images, initial=done_images, unit="img", desc="Synthesizing", disable=not show_progress
    )
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
            if pipeline is None:  # pixel mixup: lam * a + (1 - lam) * b, lam the recorded first weight
                size = (settings.width, settings.height) if settings.width and settings.height else None
                images += [mix_pixels(a, b, float(wa), size) for (a, wa), (b, _) in mixes]
            else:
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
        diffusion = pipeline is not None  # pixel mixup: no denoising steps nor guidance (null)
        _write_shard(
            path,
            {
                "image": images,
                "index": indices.tolist(),
                "source_indices": pairs.tolist(),
                "source_labels": label_ids[pairs].tolist(),
                "weights": weights.tolist(),
                "seed": [settings.seed] * count,
                "num_inference_steps": [settings.num_inference_steps if diffusion else None] * count,
                "guidance_scale": [settings.guidance_scale if diffusion else None] * count,
                "pipeline": [publishable_name(settings.pipeline)] * count,
                "source_dataset": [publishable_name(settings.source_dataset)] * count,
                "generator": [label] * count,
            },
        )
        logger.debug("Wrote %s", path)
    progress.close()
    if generated:
        rate = generated / (time.perf_counter() - started)
        logger.info("Generated %d images with %s at %.2f img/s", generated, label, rate)
    return paths
