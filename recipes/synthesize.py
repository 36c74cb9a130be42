"""Synthetic images for task-specific distillation: class-agnostic random pairs of training images mixed by ImageMixer
(docs/methods.md section 3).

    # once: the published ImageMixer checkpoint (ldm format, pickled: trusted source only) -> a diffusers folder
    python -m hf_distill.synthetic.convert_image_mixer --checkpoint_path image-mixer-pruned.ckpt \
        --original_config_file image-mixer-config.yaml --image_encoder openai/clip-vit-large-patch14 \
        --output_dir outputs/image-mixer --scheduler ddim --trust_pickled_checkpoint
    python recipes/synthesize.py --config recipes/configs/synthesize_image_mixer.yaml
    python recipes/synthesize.py --dataset HUB_ID_OR_FOLDER --pipeline outputs/image-mixer --num_images 5000 \
        --output_dir outputs/synthetic/my-mixes --random_weights --weights 0.3 0.7   # w ~ U(0.3, 0.7), 1 - w
    accelerate launch recipes/task_distill.py ... --synthetic_dataset outputs/synthetic/fashion-mnist-mixes \
        --synthetic_ratio 0.5

Synthetic image `i` mixes two distinct source images drawn at random whatever their classes, with `--weights` (fixed,
equal by default as in ImageMixer's demo) or, with `--random_weights`, `w ~ U(low, high)` for the first and `1 - w`
for the second. Its pair, weights and diffusion noise are a pure function of `(--seed, i)`.

The output folder holds `synthesis_config.json` (the settings) and `data/shard-{start:08d}-{stop:08d}.parquet`, each
written atomically: a `datasets` parquet set (`hf_distill.synthetic.load_synthetic_dataset(folder)`, or
`--synthetic_dataset FOLDER` in recipes/task_distill.py) with the columns `image` (PNG), `index` and the provenance
`source_indices`, `source_labels`, `weights`, `seed`, `num_inference_steps`, `guidance_scale`, `pipeline`,
`source_dataset`. Rerunning the same command after a kill generates only the missing shards, so the set ends with
exactly `--num_images` distinct indices; a rerun with other settings in the same folder stops before loading anything.
When the set is complete, a dataset card (`README.md`) recording its provenance (source dataset, pipeline and
scheduler, number of images, seed, weights distribution, steps, guidance, size, dtype, a license note) is written
atomically beside it. `--push_to_hub --hub_dataset_id ORG/NAME` uploads exactly the card, `synthesis_config.json` and
the data shards to that dataset repo; local paths appear in all of them as their folder names only.
"""

import logging
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from hf_distill.recipe_utils import parse_with_yaml
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.synthetic_dataset import is_synthesis_folder
from hf_distill.precision import resolve_dtype
from hf_distill.synthetic import (
    TORCH_DTYPES,
    ImageMixerPipeline,
    SynthesisSettings,
    check_output_dir,
    check_sources,
    load_synthetic_dataset,
    missing_shards,
    push_synthetic_dataset,
    synthesize,
    write_dataset_card,
)

logger = logging.getLogger("hf_distill.recipes.synthesize")


@dataclass
class SynthesizeArguments:
    """Options of the synthesis recipe; all but `batch_size`, `device` and the Hub options are saved in
    `synthesis_config.json` and must be the same when a run is resumed."""

    dataset: str | None = field(
        default=None, metadata={"help": "Labelled source images: Hub id, image folder or save_to_disk folder."}
    )
    pipeline: str | None = field(
        default=None, metadata={"help": "ImageMixer pipeline: a converted folder (convert_image_mixer) or Hub id."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Folder of the synthetic set."})
    num_images: int = field(default=1000, metadata={"help": "Number of synthetic images N (indices 0..N-1)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the source dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of the source dataset."})
    label_column: str = field(
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
        default_factory=lambda: [1.0, 1.0],
        metadata={"help": "Fixed weights of the two sources, or with --random_weights the [low, high] range of the "
                  "first one's weight w (the second gets 1 - w).", "nargs": 2},
    )  # fmt: skip
    random_weights: bool = field(default=False, metadata={"help": "Draw the weights per image: w ~ U(low, high)."})
    shard_size: int = field(default=256, metadata={"help": "Images per output shard (the unit of resuming)."})
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": f"Pipeline dtype, one of {list(TORCH_DTYPES)}, or auto: bfloat16 where the device runs it natively "
            "(CUDA with bf16, CPUs with AVX512-BF16 / AMX), else float32; resolved before it is recorded in the set."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Mixes per pipeline call."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the completed set to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})


def parse_args(argv: list[str] | None = None) -> tuple[SynthesizeArguments, SynthesisSettings]:
    (args,), _ = parse_with_yaml((SynthesizeArguments,), argv)
    missing = [f"--{name}" for name in ("dataset", "pipeline", "output_dir") if not getattr(args, name)]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (on the command line or in the --config YAML).")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.push_to_hub and not args.hub_dataset_id:
        raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cub-image-mixes).")
    if args.torch_dtype == "auto":  # the set records a concrete dtype: it changes the pixels
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.torch_dtype = str(resolve_dtype("auto", device, "synthesis pipeline")).removeprefix("torch.")
    settings = SynthesisSettings(
        source_dataset=args.dataset,
        pipeline=args.pipeline,
        num_images=args.num_images,
        split=args.dataset_split,
        image_column=args.image_column,
        label_column=args.label_column,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        weights=tuple(args.weights),
        random_weights=args.random_weights,
        shard_size=args.shard_size,
        torch_dtype=args.torch_dtype,
    )
    return args, settings


def main(argv: list[str] | None = None) -> Dataset:
    """Generate the missing shards and return the complete synthetic set."""
    args, settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.output_dir, settings)  # a mismatching rerun stops here, before any data or model is loaded
    sources = load_image_dataset(args.dataset, args.image_column, args.dataset_split)
    check_sources(sources, settings)
    check_output_dir(args.output_dir, settings, len(sources))
    if is_synthesis_folder(args.output_dir) and not missing_shards(args.output_dir):
        logger.info("%s already holds the complete set: nothing to generate", args.output_dir)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("Loading the pipeline %s on %s (%s)", args.pipeline, device, args.torch_dtype)
        pipeline = ImageMixerPipeline.from_pretrained(args.pipeline, torch_dtype=TORCH_DTYPES[args.torch_dtype])
        synthesize(settings, args.output_dir, pipeline.to(device), sources, batch_size=args.batch_size)
    dataset = load_synthetic_dataset(args.output_dir)
    logger.info("Synthetic set complete: %d images in %s", len(dataset), os.path.join(args.output_dir, "data"))
    logger.info("Wrote the dataset card %s", write_dataset_card(args.output_dir, args.hub_dataset_id))
    if args.push_to_hub:
        url = push_synthetic_dataset(args.output_dir, args.hub_dataset_id, private=args.private or None)
        logger.info("Pushed to the dataset repo %s: %s", args.hub_dataset_id, url)
    return dataset


if __name__ == "__main__":
    main()
