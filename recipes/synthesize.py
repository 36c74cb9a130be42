"""Synthetic images for task-specific distillation: class-agnostic random pairs of training images mixed by ImageMixer.

    # once: the published ImageMixer checkpoint (ldm format, pickled) -> a diffusers pipeline folder
    python -m hf_distill.synthetic.convert_image_mixer --checkpoint_path image-mixer-pruned.ckpt \
        --original_config_file image-mixer-config.yaml --image_encoder openai/clip-vit-large-patch14 \
        --output_dir outputs/image-mixer --trust_pickled_checkpoint
    python recipes/synthesize.py --config recipes/configs/synthesize_image_mixer.yaml
    accelerate launch recipes/task_distill.py ... --synthetic_dataset outputs/synthetic/cub-mixes --synthetic_ratio 0.5

The output folder is a `datasets` parquet set (`load_dataset("parquet", ...)`, or `--synthetic_dataset FOLDER` in
recipes/task_distill.py) with provenance columns: `index`, `source_indices`, `source_labels`, `weights`, `seed`,
`num_inference_steps`, `guidance_scale`, `pipeline`, `source_dataset`. It is written in shards, each atomically:
rerunning the same command after a kill generates only the missing shards (image `i` depends only on the seed and
the settings), so the set ends with exactly `--num_images` distinct indices.
"""

import logging
import os
from dataclasses import dataclass, field

import torch

from hf_distill.cli import parse_with_yaml
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.synthetic_dataset import is_synthesis_folder, load_synthetic_dataset, missing_shards
from hf_distill.synthetic import ImageMixerPipeline
from hf_distill.synthetic.synthesis import SynthesisSettings, check_output_dir, synthesize

logger = logging.getLogger("hf_distill.recipes.synthesize")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SynthesizeArguments:
    dataset: str | None = field(default=None, metadata={"help": "Source images: Hub id, image folder, save_to_disk."})
    pipeline: str | None = field(default=None, metadata={"help": "ImageMixer pipeline folder or Hub id."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder of the synthetic set."})
    num_images: int = field(default=1000, metadata={"help": "Number of synthetic images."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the source dataset."})
    image_column: str = field(default="image", metadata={"help": "Image column of the source dataset."})
    label_column: str | None = field(default="label", metadata={"help": "Label column (provenance only)."})
    seed: int = field(default=0, metadata={"help": "Seed of the pairs, weights and noise."})
    num_inference_steps: int = field(default=30, metadata={"help": "Denoising steps (DDIM 30-40 in ImageMixer)."})
    guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance scale."})
    height: int | None = field(default=None, metadata={"help": "Image height (default: the pipeline's)."})
    width: int | None = field(default=None, metadata={"help": "Image width (default: the pipeline's)."})
    mix_weights: list[float] = field(
        default_factory=lambda: [1.0, 1.0],
        metadata={"help": "Weights of the two sources, or with --random_weights the [low, high] range of the first "
                  "one's weight (the second gets 1 - w).", "nargs": 2},
    )  # fmt: skip
    random_weights: bool = field(default=False, metadata={"help": "Draw the mixing weights per image."})
    shard_size: int = field(default=256, metadata={"help": "Images per output shard."})
    batch_size: int = field(default=8, metadata={"help": "Mixes per pipeline call."})
    torch_dtype: str = field(default="float32", metadata={"help": f"Pipeline dtype, one of {list(DTYPES)}."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available, else cpu)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the completed set to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    private: bool = field(default=False, metadata={"help": "Create the Hub dataset as private."})


def parse_args(argv: list[str] | None = None) -> tuple[SynthesizeArguments, SynthesisSettings]:
    (args,), _ = parse_with_yaml((SynthesizeArguments,), argv)
    for name in ("dataset", "pipeline", "output_dir"):
        if not getattr(args, name):
            raise ValueError(f"--{name} is required.")
    if args.torch_dtype not in DTYPES:
        raise ValueError(f"--torch_dtype must be one of {list(DTYPES)}, got {args.torch_dtype!r}.")
    if args.push_to_hub and not args.hub_dataset_id:
        raise ValueError("--push_to_hub needs --hub_dataset_id (e.g. my-org/cub-image-mixes).")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
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
        mix_weights=tuple(args.mix_weights),
        random_weights=args.random_weights,
        shard_size=args.shard_size,
    )
    return args, settings


def main(argv: list[str] | None = None) -> str:
    args, settings = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_output_dir(args.output_dir, settings)  # a mismatching rerun stops here, before any model is loaded
    sources = load_image_dataset(args.dataset, args.image_column, args.dataset_split)
    if len(sources) < 2:
        raise ValueError(f"Mixing needs at least 2 source images; {args.dataset} has {len(sources)}.")
    if is_synthesis_folder(args.output_dir) and not missing_shards(args.output_dir):
        logger.info("%s already holds the complete set: nothing to generate", args.output_dir)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("Loading the pipeline %s on %s (%s)", args.pipeline, device, args.torch_dtype)
        pipeline = ImageMixerPipeline.from_pretrained(args.pipeline, torch_dtype=DTYPES[args.torch_dtype]).to(device)
        synthesize(settings, args.output_dir, pipeline, sources, batch_size=args.batch_size)
    dataset = load_synthetic_dataset(args.output_dir)
    logger.info("Synthetic set complete: %d images in %s", len(dataset), os.path.join(args.output_dir, "data"))
    if args.push_to_hub:
        dataset.push_to_hub(args.hub_dataset_id, private=args.private)
        logger.info("Pushed to https://huggingface.co/datasets/%s", args.hub_dataset_id)
    return args.output_dir


if __name__ == "__main__":
    main()
