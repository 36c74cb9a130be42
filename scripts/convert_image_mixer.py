"""Convert an original-format (ldm / CompVis) ImageMixer checkpoint into an ImageMixerPipeline folder.

The published ImageMixer weights are a Stable Diffusion 1.x LatentDiffusion checkpoint and its yaml: the UNet under
`model.diffusion_model.*`, the autoencoder under `first_stage_model.*`. This script maps them to diffusers'
`UNet2DConditionModel` and `AutoencoderKL` (configurations derived from the yaml), builds the scheduler from the
yaml's noise schedule, adds the CLIP image encoder and its processor, and writes the pipeline in safetensors:

```bash
python scripts/convert_image_mixer.py \
    --checkpoint_path image-mixer-pruned.ckpt --original_config_file image-mixer-config.yaml \
    --image_encoder openai/clip-vit-large-patch14 --output_dir outputs/image-mixer
```

A `.ckpt` is a pickle, and a plain unpickling runs code named by the file. It is read with a safe loader instead
(`hf_distill.synthetic.safe_checkpoint`): torch's `weights_only` unpickler, with inert placeholders for the classes it
does not know, such as the PyTorch Lightning callback in the published checkpoint, so neither `pytorch_lightning` nor
any code from the file is needed. The loader refuses a file that calls a function outside its allowlist; only such a
file needs `--trust_pickled_checkpoint`, which unpickles it in full. Tensors are memory-mapped and only the UNet and
VAE weights are read, so a "full" checkpoint (with EMA weights and optimizer states) need not fit in memory. The
checkpoint is read and checked before the image encoder is loaded. The folder is written next to `--output_dir` and
renamed into place, so an interrupted run leaves no half-written pipeline.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from hf_distill.io_utils import atomic_folder
from hf_distill.synthetic.pipeline_image_mixer import ImageMixerPipeline

from image_mixer.checkpoint import (
    EMA_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    ema_unet_weights,
    extract_weights,
    load_checkpoint,
)
from image_mixer.ldm_configs import (
    SCHEDULERS,
    config_entry,
    scheduler_from_ldm,
    unet_config_from_ldm,
    vae_config_from_ldm,
)
from image_mixer.state_dicts import convert_unet_state_dict, convert_vae_state_dict, load_converted

__all__ = [
    "convert",
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "load_checkpoint",
    "main",
    "scheduler_from_ldm",
    "unet_config_from_ldm",
    "vae_config_from_ldm",
]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", required=True, help="The ldm checkpoint (.ckpt or .safetensors).")
    parser.add_argument("--original_config_file", required=True, help="The ldm yaml of the checkpoint.")
    parser.add_argument(
        "--image_encoder", required=True, help="CLIP image encoder id or path, e.g. openai/clip-vit-large-patch14."
    )
    parser.add_argument("--output_dir", required=True, help="The pipeline folder to write.")
    parser.add_argument(
        "--trust_pickled_checkpoint",
        action="store_true",
        help=(
            "Unpickle the .ckpt in full when the safe loader refuses it (it calls code outside the loader's allowlist)."
            " Full unpickling can execute arbitrary code from the file. Lightning checkpoints such as the published "
            "ImageMixer file are read without it."
        ),
    )
    parser.add_argument("--context_tokens", type=int, default=5, help="Context length: 5 for ImageMixer, 1 for SD-IV.")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="The dtype of the saved weights.")
    parser.add_argument("--extract_ema", action="store_true", help="Convert the EMA weights of the UNet.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing non-empty --output_dir.")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> dict:
    """
    Validate the command line before any expensive work.

    Args:
        args (`argparse.Namespace`):
            The parsed command line.

    Returns:
        `dict`: The `model.params` section of the original yaml.
    """
    for name in ("checkpoint_path", "original_config_file"):
        if not Path(getattr(args, name)).is_file():
            raise FileNotFoundError(f"--{name}: no such file: {getattr(args, name)}")
    if args.context_tokens < 1:
        raise ValueError(f"--context_tokens must be positive, got {args.context_tokens}.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} exists and is not a folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite:
        raise ValueError(f"--output_dir {output_dir} is not empty: pass --overwrite to replace it.")
    with open(args.original_config_file, encoding="utf-8") as stream:
        try:
            original_config = yaml.safe_load(stream)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--original_config_file {args.original_config_file} is not valid yaml: {error}"
            ) from error
    model_params = config_entry(original_config if isinstance(original_config, dict) else {}, "model.params")
    config_entry(model_params, "unet_config.params")
    config_entry(model_params, "first_stage_config.params.ddconfig")
    return model_params


def save_pipeline_atomically(pipeline: ImageMixerPipeline, output_dir: str | os.PathLike) -> None:
    """
    Save `pipeline` in safetensors to a temporary folder next to `output_dir`, then rename it to `output_dir`,
    replacing what was there. The folder gets the permissions of any new folder (`0o777` less the umask).

    Args:
        pipeline ([`ImageMixerPipeline`]):
            The pipeline to save.
        output_dir (`str` or `os.PathLike`):
            The destination folder.
    """
    with atomic_folder(output_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)


def convert(args: argparse.Namespace, model_params: dict) -> ImageMixerPipeline:
    """
    Build the pipeline described by the command line.

    Args:
        args (`argparse.Namespace`):
            The parsed and checked command line.
        model_params (`dict`):
            The `model.params` section of the original yaml.

    Returns:
        [`ImageMixerPipeline`]: The converted pipeline, in `args.dtype`.
    """
    unet_config = unet_config_from_ldm(model_params)
    vae_config = vae_config_from_ldm(model_params)
    scheduler = scheduler_from_ldm(model_params, args.scheduler)

    # The checkpoint is read (and checked) before the 1.7 GB image encoder is loaded.
    prefixes = (UNET_PREFIX, VAE_PREFIX, EMA_PREFIX) if args.extract_ema else (UNET_PREFIX, VAE_PREFIX)
    state_dict = load_checkpoint(args.checkpoint_path, args.trust_pickled_checkpoint, prefixes=prefixes)
    unet_weights = extract_weights(state_dict, UNET_PREFIX, "UNet")
    vae_weights = extract_weights(state_dict, VAE_PREFIX, "VAE")
    if args.extract_ema:
        unet_weights = ema_unet_weights(state_dict, unet_weights)
    logger.info(
        "Converting %d %sUNet and %d VAE tensors.",
        len(unet_weights),
        "EMA " if args.extract_ema else "",
        len(vae_weights),
    )
    unet_weights = convert_unet_state_dict(unet_weights, unet_config)
    vae_weights = convert_vae_state_dict(vae_weights, vae_config)
    del state_dict

    logger.info("Loading the image encoder and its processor from %s.", args.image_encoder)
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(args.image_encoder)
    feature_extractor = CLIPImageProcessor.from_pretrained(args.image_encoder)
    if image_encoder.config.projection_dim != unet_config["cross_attention_dim"]:
        raise ValueError(
            f"The image encoder projects to {image_encoder.config.projection_dim}-d embeddings but the UNet's "
            f"`context_dim` is {unet_config['cross_attention_dim']}."
        )
    unet = load_converted(UNet2DConditionModel, unet_config, unet_weights, "UNet")
    vae = load_converted(AutoencoderKL, vae_config, vae_weights, "VAE")

    pipeline = ImageMixerPipeline(vae, unet, scheduler, image_encoder, feature_extractor, args.context_tokens)
    return pipeline if args.dtype == "float32" else pipeline.to(dtype=DTYPES[args.dtype])


def main(argv: Sequence[str] | None = None) -> Path:
    """
    Run the conversion.

    Args:
        argv (`Sequence[str]`, *optional*):
            The command line arguments; `sys.argv[1:]` when `None`.

    Returns:
        `Path`: The written pipeline folder.
    """
    args = parse_args(argv)
    model_params = check_args(args)
    pipeline = convert(args, model_params)
    save_pipeline_atomically(pipeline, args.output_dir)
    logger.info("Wrote the %s ImageMixerPipeline to %s.", args.dtype, args.output_dir)
    return Path(args.output_dir)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
