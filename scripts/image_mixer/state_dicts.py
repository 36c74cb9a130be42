"""The weights of an ldm (CompVis) UNet and autoencoder renamed to those of diffusers' `UNet2DConditionModel` and
`AutoencoderKL`, and loaded strictly into the models of the converted configurations."""

import torch

__all__ = ["convert_unet_state_dict", "convert_vae_state_dict", "load_converted"]

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


def load_converted(model_class: type, config: dict, weights: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
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
