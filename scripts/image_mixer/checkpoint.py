"""The tensors of an ldm (CompVis) checkpoint, read without running code from the file: a `.safetensors` file, or a
pickled `.ckpt` through [`~hf_distill.synthetic.safe_checkpoint.safe_load`]; and the UNet, EMA UNet and autoencoder
weights picked out of them."""

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from hf_distill.synthetic.safe_checkpoint import UnsafeCheckpointError, safe_load, trusted_load

__all__ = ["EMA_PREFIX", "UNET_PREFIX", "VAE_PREFIX", "ema_unet_weights", "extract_weights", "load_checkpoint"]

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."


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


def extract_weights(state_dict: dict[str, torch.Tensor], prefix: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of `state_dict` under `prefix`, without it; a `ValueError` naming `what` when there are none."""
    weights = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if not weights:
        raise ValueError(f"The checkpoint has no {what} weights (keys starting with `{prefix}`).")
    return weights


def ema_unet_weights(state_dict: dict[str, torch.Tensor], unet_weights: dict[str, torch.Tensor]) -> dict:
    """The EMA copy of the UNet weights: ldm stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`."""
    ema = {}
    for key in unet_weights:
        flat = EMA_PREFIX + "diffusion_model" + key.replace(".", "")
        if flat not in state_dict:
            raise ValueError(f"--extract_ema: the checkpoint has no EMA weight `{flat}` for `{UNET_PREFIX}{key}`.")
        ema[key] = state_dict[flat]
    return ema
