"""The diffusers configurations of an ldm (CompVis) LatentDiffusion model, from its original yaml: the UNet, the
autoencoder and a scheduler with its training noise schedule."""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers import SchedulerMixin

__all__ = ["SCHEDULERS", "config_entry", "scheduler_from_ldm", "unet_config_from_ldm", "vae_config_from_ldm"]

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,
}


def config_entry(config: dict, path: str) -> object:
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
    params = config_entry(model_params, "unet_config.params")
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
    params = config_entry(model_params, "first_stage_config.params")
    ddconfig = config_entry(params, "ddconfig")
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
