"""Synthetic images for task-specific distillation: class-agnostic random pairs of training images mixed by ImageMixer
(docs/methods.md section 3).

    # once: the published ImageMixer checkpoint (pickled ldm format, read safely) -> a diffusers folder
    python scripts/convert_image_mixer.py --checkpoint_path image-mixer-pruned.ckpt \
        --original_config_file image-mixer-config.yaml --image_encoder openai/clip-vit-large-patch14 \
        --output_dir outputs/image-mixer --scheduler ddim
    python recipes/synthesize.py --config recipes/configs/synthesize_image_mixer.yaml
    python recipes/synthesize.py --dataset HUB_ID_OR_FOLDER --pipeline outputs/image-mixer --num_images 5000 \
        --output_dir outputs/synthetic/my-mixes --random_weights --weights 0.3 0.7   # w ~ U(0.3, 0.7), 1 - w
    accelerate launch recipes/task_distill.py ... --synthetic_dataset outputs/synthetic/fashion-mnist-mixes \
        --synthetic_ratio 0.5
    # a cheap stand-in without any model: pixel-space mixup of the pairs (labelled as such, not ImageMixer output)
    python recipes/synthesize.py --generator pixel-mixup --mix_alpha 0.4 --dataset outputs/data/fashion-mnist \
        --num_images 2000 --output_dir outputs/synthetic/fashion-mnist-pixel-mixup

Synthetic image `i` mixes two distinct source images drawn at random whatever their classes, with `--weights` (fixed,
equal by default as in ImageMixer's demo) or, with `--random_weights`, `w ~ U(low, high)` for the first and `1 - w`
for the second. Its pair, weights and diffusion noise are a pure function of `(--seed, i)`. With `--generator
pixel-mixup` (hf_distill/synthetic/pixel_mixup.py) no pipeline is loaded: image `i` is `lam * a + (1 - lam) * b` in
pixel space, `lam ~ Beta(--mix_alpha, --mix_alpha)` recorded as its weights, and the rows and card call it "pixel mixup
(stand-in for ImageMixer)".

The output folder holds `synthesis_config.json` (the settings) and `data/shard-{start:08d}-{stop:08d}.parquet`, each
written atomically: a `datasets` parquet set (`hf_distill.synthetic.load_synthetic_dataset(folder)`, or
`--synthetic_dataset FOLDER` in recipes/task_distill.py) with the columns `image` (PNG), `index` and the provenance
`source_indices`, `source_labels`, `weights`, `seed`, `num_inference_steps`, `guidance_scale`, `pipeline`,
`source_dataset`, `generator`. Rerunning the same command after a kill generates only the missing shards, so the set ends with
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

from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.synthetic_dataset import is_synthesis_folder
from hf_distill.precision import resolve_dtype
from hf_distill.recipe_utils import dataclass_from_namespace, parse_namespace_with_yaml
from hf_distill.synthetic import (
    GENERATOR_LABELS,
    IMAGE_MIXER,
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
    """Options of the synthesis recipe that do not change the set (the others are the fields of `SynthesisSettings`,
    saved in `synthesis_config.json`: they must be the same when a run is resumed)."""

    output_dir: str | None = field(default=None, metadata={"help": "Folder of the synthetic set."})
    batch_size: int = field(default=8, metadata={"help": "Mixes per pipeline call."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the completed set to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})


def parse_args(argv: list[str] | None = None) -> tuple[SynthesizeArguments, SynthesisSettings]:
    """`--dataset` and `--dataset_split` set `SynthesisSettings.source_dataset` and `.split`; `--torch_dtype auto` is
    resolved on the device before the settings are built."""
    namespace, _, _ = parse_namespace_with_yaml(
        (SynthesisSettings, SynthesizeArguments),
        argv,
        defaults={"num_images": 1000, "source_dataset": None, "pipeline": None},
    )
    args = dataclass_from_namespace(SynthesizeArguments, namespace)
    options = {"dataset": namespace.source_dataset, "output_dir": args.output_dir}
    if namespace.generator == IMAGE_MIXER:
        options["pipeline"] = namespace.pipeline
    missing = [f"--{name}" for name, value in options.items() if not value]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (on the command line or in the --config YAML).")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.push_to_hub and not args.hub_dataset_id:
        raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cub-image-mixes).")
    if namespace.torch_dtype == "auto":  # the set records a concrete dtype: it changes the pixels
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        namespace.torch_dtype = str(resolve_dtype("auto", device, "synthesis pipeline")).removeprefix("torch.")
    return args, dataclass_from_namespace(SynthesisSettings, namespace)


def main(argv: list[str] | None = None) -> Dataset:
    """Generate the missing shards and return the complete synthetic set."""
    args, settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.output_dir, settings)  # a mismatching rerun stops here, before any data or model is loaded
    sources = load_image_dataset(settings.source_dataset, settings.image_column, settings.split)
    check_sources(sources, settings)
    check_output_dir(args.output_dir, settings, len(sources))
    if is_synthesis_folder(args.output_dir) and not missing_shards(args.output_dir):
        logger.info("%s already holds the complete set: nothing to generate", args.output_dir)
    elif settings.generator != IMAGE_MIXER:  # no model to load
        logger.info("Generator: %s (no pipeline)", GENERATOR_LABELS[settings.generator])
        synthesize(settings, args.output_dir, None, sources, batch_size=args.batch_size)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("Loading the pipeline %s on %s (%s)", settings.pipeline, device, settings.torch_dtype)
        pipeline = ImageMixerPipeline.from_pretrained(
            settings.pipeline, torch_dtype=TORCH_DTYPES[settings.torch_dtype]
        )
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
