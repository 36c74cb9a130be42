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
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.schedulers import SchedulerMixin
from safetensors import safe_open
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from hf_distill.io_utils import atomic_folder
from hf_distill.synthetic.pipeline_image_mixer import ImageMixerPipeline
from hf_distill.synthetic.safe_checkpoint import UnsafeCheckpointError, safe_load, trusted_load

__all__ = [
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "load_checkpoint",
    "main",
    "scheduler_from_ldm",
    "unet_config_from_ldm",
    "vae_config_from_ldm",
]

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
}

# Submodule renames inside one block: ldm name -> diffusers name (None keeps every name as it is).
UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

ModuleMap = dict[str, tuple[str, dict[str, str] | None]]


def _get(config: dict, path: str) -> object:
    """`config["a"]["b"]` for `path="a.b"`, or a `ValueError` naming the missing entry."""
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"The original config has no `{path}` entry.")
        node = node[part]
    return node


def unet_config_from_ldm(model_params: dict) -> dict:
    """
    Build the `UNet2DConditionModel` configuration of an ldm `UNetModel`.

    Args:
        model_params (`dict`):
            The `model.params` section of the original yaml, with `unet_config.params`.

    Returns:
        `dict`: Keyword arguments for `UNet2DConditionModel`.
    """
    params = _get(model_params, "unet_config.params")
    unsupported = {
        "num_classes": params.get("num_classes") is not None,
        "adm_in_channels": params.get("adm_in_channels") is not None,
        "resblock_updown": params.get("resblock_updown", False),
        "use_spatial_transformer": not params.get("use_spatial_transformer", False),
        "conv_resample": not params.get("conv_resample", True),
        "dims": params.get("dims", 2) != 2,
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, flag in unsupported.items() if flag)
        raise ValueError(f"Unsupported `unet_config.params` for a Stable Diffusion 1.x UNet: {names}.")
    for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "context_dim"):
        if key not in params:
            raise ValueError(f"The original config has no `model.params.unet_config.params.{key}` entry.")
    if not isinstance(params["num_res_blocks"], int):
        raise ValueError("Per-level `num_res_blocks` lists are not supported: it must be an integer.")

    block_out_channels = [params["model_channels"] * mult for mult in params["channel_mult"]]
    attention_levels = [2**level in set(params["attention_resolutions"]) for level in range(len(block_out_channels))]
    head_channels = params.get("num_head_channels", -1)
    if head_channels not in (None, -1):
        heads = [channels // head_channels for channels in block_out_channels]
    elif params.get("num_heads", -1) > 0:
        heads = params["num_heads"]
    else:
        raise ValueError("The UNet config needs a positive `num_heads` or `num_head_channels`.")
    return {
        "sample_size": model_params.get("image_size", params.get("image_size", 64)),
        "in_channels": params.get("in_channels", 4),
        "out_channels": params.get("out_channels", 4),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)],
        "block_out_channels": block_out_channels,
        "layers_per_block": params["num_res_blocks"],
        "cross_attention_dim": params["context_dim"],
        "attention_head_dim": heads,
        "transformer_layers_per_block": params.get("transformer_depth", 1),
        "use_linear_projection": params.get("use_linear_in_transformer", False),
        "resnet_time_scale_shift": "scale_shift" if params.get("use_scale_shift_norm", False) else "default",
    }


def vae_config_from_ldm(model_params: dict) -> dict:
    """
    Build the `AutoencoderKL` configuration of an ldm `AutoencoderKL` (first stage).

    Args:
        model_params (`dict`):
            The `model.params` section of the original yaml, with `first_stage_config.params.ddconfig` and
            `embed_dim`; its `scale_factor` (1.0 when absent, as in ldm) becomes the latent `scaling_factor`.

    Returns:
        `dict`: Keyword arguments for `AutoencoderKL`.
    """
    params = _get(model_params, "first_stage_config.params")
    ddconfig = _get(params, "ddconfig")
    for key in ("ch", "ch_mult", "num_res_blocks", "z_channels"):
        if key not in ddconfig:
            raise ValueError(f"The original config has no `model.params.first_stage_config.params.ddconfig.{key}`.")
    if not ddconfig.get("double_z", True):
        raise ValueError("Only `double_z: true` autoencoders (a mean and a log-variance) are supported.")
    if ddconfig.get("attn_resolutions"):
        raise ValueError("Autoencoders with attention outside the mid block (`attn_resolutions`) are not supported.")
    if params.get("embed_dim", ddconfig["z_channels"]) != ddconfig["z_channels"]:
        raise ValueError("`embed_dim` must equal `ddconfig.z_channels` for a diffusers AutoencoderKL.")
    levels = len(ddconfig["ch_mult"])
    return {
        "in_channels": ddconfig.get("in_channels", 3),
        "out_channels": ddconfig.get("out_ch", 3),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [ddconfig["ch"] * mult for mult in ddconfig["ch_mult"]],
        "layers_per_block": ddconfig["num_res_blocks"],
        "latent_channels": ddconfig["z_channels"],
        "sample_size": ddconfig.get("resolution", 256),
        "scaling_factor": float(model_params.get("scale_factor", 1.0)),
    }


def scheduler_from_ldm(model_params: dict, name: str = "ddim") -> SchedulerMixin:
    """
    Build a scheduler with the training noise schedule of an ldm LatentDiffusion model.

    Args:
        model_params (`dict`):
            The `model.params` section of the original yaml (`timesteps`, `linear_start`, `linear_end`,
            `beta_schedule`, `parameterization`).
        name (`str`, *optional*, defaults to `"ddim"`):
            One of `SCHEDULERS`: `"ddim"`, `"pndm"`, `"euler"`, `"euler-ancestral"`, `"dpm-solver"`.

    Returns:
        [`SchedulerMixin`]: The scheduler.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}: choose one of {sorted(SCHEDULERS)}.")
    if model_params.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"Only the ldm `linear` beta schedule is supported, got {model_params['beta_schedule']!r}.")
    prediction_type = {"eps": "epsilon", "v": "v_prediction"}.get(model_params.get("parameterization", "eps"))
    if prediction_type is None:
        raise ValueError(f"Unsupported `parameterization` {model_params['parameterization']!r}.")
    ddim = DDIMScheduler(
        num_train_timesteps=model_params.get("timesteps", 1000),
        beta_start=model_params.get("linear_start", 0.00085),
        beta_end=model_params.get("linear_end", 0.012),
        beta_schedule="scaled_linear",  # ldm's "linear" is linear in sqrt(beta)
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return ddim if name == "ddim" else SCHEDULERS[name].from_config(ddim.config)


def _unet_module_map(config: dict) -> ModuleMap:
    """ldm module path -> (diffusers module path, submodule renames) for every block of the UNet."""
    layers = config["layers_per_block"]
    attention = [block.startswith("CrossAttn") for block in config["down_block_types"]]
    levels = len(attention)
    mapping: ModuleMap = {
        "time_embed.0": ("time_embedding.linear_1", None),
        "time_embed.2": ("time_embedding.linear_2", None),
        "input_blocks.0.0": ("conv_in", None),
        "middle_block.0": ("mid_block.resnets.0", UNET_RESNET),
        "middle_block.1": ("mid_block.attentions.0", None),
        "middle_block.2": ("mid_block.resnets.1", UNET_RESNET),
        "out.0": ("conv_norm_out", None),
        "out.2": ("conv_out", None),
    }
    for level in range(levels):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            mapping[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{layer}", UNET_RESNET)
            if attention[level]:
                mapping[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{layer}", None)
        if level < levels - 1:
            mapping[f"input_blocks.{1 + level * (layers + 1) + layers}.0.op"] = (
                f"down_blocks.{level}.downsamplers.0.conv",
                None,
            )
    for block in range(levels):
        has_attention = attention[levels - 1 - block]
        for layer in range(layers + 1):
            index = block * (layers + 1) + layer
            mapping[f"output_blocks.{index}.0"] = (f"up_blocks.{block}.resnets.{layer}", UNET_RESNET)
            if has_attention:
                mapping[f"output_blocks.{index}.1"] = (f"up_blocks.{block}.attentions.{layer}", None)
            if layer == layers and block < levels - 1:
                mapping[f"output_blocks.{index}.{2 if has_attention else 1}.conv"] = (
                    f"up_blocks.{block}.upsamplers.0.conv",
                    None,
                )
    return mapping


def _vae_module_map(config: dict) -> ModuleMap:
    """ldm module path -> (diffusers module path, submodule renames) for every block of the autoencoder."""
    layers = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    mapping: ModuleMap = {name: (name, None) for name in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        mapping[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        mapping[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET)
        mapping[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION)
        mapping[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET)
        mapping[f"{part}.norm_out"] = (f"{part}.conv_norm_out", None)
        mapping[f"{part}.conv_out"] = (f"{part}.conv_out", None)
    for level in range(levels):
        for layer in range(layers):
            mapping[f"encoder.down.{level}.block.{layer}"] = (
                f"encoder.down_blocks.{level}.resnets.{layer}",
                VAE_RESNET,
            )
        if level < levels - 1:
            mapping[f"encoder.down.{level}.downsample.conv"] = (
                f"encoder.down_blocks.{level}.downsamplers.0.conv",
                None,
            )
    for block in range(levels):
        level = levels - 1 - block  # the ldm decoder numbers its levels from the highest resolution
        for layer in range(layers + 1):
            mapping[f"decoder.up.{level}.block.{layer}"] = (f"decoder.up_blocks.{block}.resnets.{layer}", VAE_RESNET)
        if level > 0:
            mapping[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{block}.upsamplers.0.conv", None)
    return mapping


def _rename(state_dict: dict[str, torch.Tensor], mapping: ModuleMap, what: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest ldm module prefix in `mapping`; an unmapped key is an error."""
    converted, unmapped = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                target, renames = mapping[prefix]
                module, parameter = ".".join(parts[cut:-1]), parts[-1]
                if renames is not None:
                    if module not in renames:
                        unmapped.append(key)
                        break
                    module = renames[module]
                converted[".".join(filter(None, (target, module, parameter)))] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} {what} weights do not fit the architecture of the original config, e.g. {unmapped[:5]}."
        )
    return converted


def convert_unet_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """
    Rename the weights of an ldm `UNetModel` to those of `UNet2DConditionModel`.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The UNet weights without their `model.diffusion_model.` prefix.
        config (`dict`):
            The diffusers configuration from [`unet_config_from_ldm`].

    Returns:
        `dict[str, torch.Tensor]`: The state dict of `UNet2DConditionModel(**config)`.
    """
    return _rename(state_dict, _unet_module_map(config), "UNet")


def convert_vae_state_dict(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """
    Rename the weights of an ldm autoencoder to those of `AutoencoderKL`; the 1x1 convolutions of the mid-block
    attention become the weights of linear layers.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The autoencoder weights without their `first_stage_model.` prefix.
        config (`dict`):
            The diffusers configuration from [`vae_config_from_ldm`].

    Returns:
        `dict[str, torch.Tensor]`: The state dict of `AutoencoderKL(**config)`.
    """
    converted = _rename(state_dict, _vae_module_map(config), "VAE")
    for key, tensor in converted.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and tensor.ndim == 4:
            converted[key] = tensor.reshape(tensor.shape[0], tensor.shape[1])
    return converted


def load_checkpoint(
    path: str | os.PathLike, trust_pickled_checkpoint: bool = False, prefixes: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """
    Load the tensors of an ldm checkpoint: a `.safetensors` file, or a pickled `.ckpt` (a PyTorch Lightning
    checkpoint with a `state_dict` entry, or a bare state dict).

    A pickled checkpoint is read with [`~hf_distill.synthetic.safe_checkpoint.safe_load`], which runs no code from
    the file: the Lightning objects in it (callbacks, for instance) become inert placeholders, so `pytorch_lightning`
    is not needed. Its tensors are memory-mapped, and only the selected ones are ever read from disk, so the size of
    the file (e.g. a "full" checkpoint with EMA weights and optimizer states) does not need to fit in memory.

    Args:
        path (`str` or `os.PathLike`):
            The checkpoint file.
        trust_pickled_checkpoint (`bool`, *optional*, defaults to `False`):
            When the safe loader refuses the file (it would run code from the file, or uses objects the safe loader
            does not read), unpickle it with full pickle instead, which can run arbitrary code from the file.
        prefixes (`Sequence[str]`, *optional*):
            Keep only the tensors whose name starts with one of these; every tensor when `None`.

    Returns:
        `dict[str, torch.Tensor]`: The selected tensors by name, on the CPU.
    """
    path = Path(path)
    prefixes = tuple(prefixes) if prefixes is not None else ("",)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as weights:
            names = list(weights.keys())
            tensors = {name: weights.get_tensor(name) for name in names if name.startswith(prefixes)}
        logger.info("Read %d of the %d tensors of %s.", len(tensors), len(names), path)
        return tensors
    try:
        checkpoint = safe_load(path)
    except UnsafeCheckpointError as error:
        if not trust_pickled_checkpoint:
            raise ValueError(_pickle_refusal(path, error)) from error
        logger.warning(
            "The safe loader cannot read %s (%s): unpickling it in full, trusted with --trust_pickled_checkpoint.",
            path,
            error,
        )
        try:
            checkpoint = trusted_load(path)
        except UnsafeCheckpointError as trusted_error:
            raise ValueError(f"{path} cannot be unpickled: {trusted_error}.") from trusted_error
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    names = [name for name, value in checkpoint.items() if isinstance(name, str) and isinstance(value, torch.Tensor)]
    tensors = {name: checkpoint[name] for name in names if name.startswith(prefixes)}
    logger.info("Using %d of the %d tensors of %s.", len(tensors), len(names), path)
    return tensors


def _pickle_refusal(path: Path, error: Exception) -> str:
    return (
        f"{path} cannot be read by the safe loader, which runs no code from the file: {error}. If you trust its "
        "source, pass --trust_pickled_checkpoint to unpickle it in full (which can execute arbitrary code from the "
        "file), or convert it to .safetensors first."
    )


def _extract(state_dict: dict[str, torch.Tensor], prefix: str, what: str) -> dict[str, torch.Tensor]:
    weights = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"The checkpoint has no {what} weights (keys starting with `{prefix}`).")
    return weights


def _ema_unet_weights(state_dict: dict[str, torch.Tensor], unet_weights: dict[str, torch.Tensor]) -> dict:
    """The EMA copy of the UNet weights: ldm stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`."""
    ema = {}
    for key in unet_weights:
        flat = EMA_PREFIX + "diffusion_model" + key.replace(".", "")
        if flat not in state_dict:
            raise ValueError(f"--extract_ema: the checkpoint has no EMA weight `{flat}` for `{UNET_PREFIX}{key}`.")
        ema[key] = state_dict[flat]
    return ema


def _load_model(model_class: type, config: dict, weights: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Instantiate `model_class(**config)` and load `weights`, which must match its parameters name for name."""
    model = model_class(**config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = [
        f"{key}: {tuple(weights[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if key in weights and weights[key].shape != value.shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"The converted {what} does not match its config: {len(missing)} missing weights {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(reshaped)} of another shape {reshaped[:3]}."
        )
    model.load_state_dict(weights)
    return model.eval()


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
    model_params = _get(original_config if isinstance(original_config, dict) else {}, "model.params")
    _get(model_params, "unet_config.params")
    _get(model_params, "first_stage_config.params.ddconfig")
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
    unet_weights = _extract(state_dict, UNET_PREFIX, "UNet")
    vae_weights = _extract(state_dict, VAE_PREFIX, "VAE")
    if args.extract_ema:
        unet_weights = _ema_unet_weights(state_dict, unet_weights)
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
    unet = _load_model(UNet2DConditionModel, unet_config, unet_weights, "UNet")
    vae = _load_model(AutoencoderKL, vae_config, vae_weights, "VAE")

    pipeline = ImageMixerPipeline(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        context_tokens=args.context_tokens,
    )
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
