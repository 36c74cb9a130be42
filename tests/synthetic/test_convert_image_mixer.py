"""The ldm -> diffusers ImageMixer converter, on tiny checkpoints made in the test.

A tiny diffusers UNet and VAE are renamed to ldm (CompVis) key names by a small inverse mapping written here, saved as
`.safetensors` and as a `.ckpt` in the container of the published file (a PyTorch Lightning 1.4 checkpoint, pickled
with a throwaway `pytorch_lightning` module that is gone when it is converted) with a matching yaml, converted back by
`convert_image_mixer.main`, and the converted models must compute the same outputs as the originals.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from hf_distill.synthetic import ImageMixerPipeline  # noqa: E402

from .test_safe_checkpoint import code_running_objects, lightning_checkpoint, throwaway_pytorch_lightning  # noqa: E402

# The converter is a script outside the package (scripts/convert_image_mixer.py and its parts in scripts/image_mixer/),
# as in diffusers: imported with scripts/ first on the path, as `python scripts/convert_image_mixer.py` has it.
SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from convert_image_mixer import load_checkpoint, main  # noqa: E402

LAYERS = 1  # num_res_blocks of the tiny models

UNET_YAML = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1],
    "num_res_blocks": LAYERS,
    "channel_mult": [1, 2],
    "num_heads": 2,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 32,
    "use_checkpoint": True,
    "legacy": False,
}
VAE_YAML = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": LAYERS,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def original_config(unet_params: dict | None = None) -> dict:
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "image_size": 8,
                "channels": 4,
                "conditioning_key": "crossattn",
                "scale_factor": 0.18215,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": unet_params or UNET_YAML,
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 4, "ddconfig": VAE_YAML},
                },
                "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPImageEmbedder"},
            },
        }
    }


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Add seeded noise to every weight, so that swapped norms or zero-initialized layers cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def tiny_unet(seed: int = 0, heads: int | tuple[int, ...] = 2, linear: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=LAYERS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=heads,
        use_linear_projection=linear,
    )
    return perturb(unet, seed)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=LAYERS,
        sample_size=32,
    )
    return perturb(vae, seed)


# The inverse mapping, diffusers -> ldm, as regular expression rewrites applied in order.
LDM_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1")]
LDM_RESNET += [("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def ldm_unet_key(key: str, attention_up_blocks: set[int]) -> str:
    def resnet(rest: str) -> str:
        for diffusers_name, ldm_name in LDM_RESNET:
            if rest.startswith(diffusers_name + "."):
                return ldm_name + rest[len(diffusers_name) :]
        raise AssertionError(rest)

    if match := re.fullmatch(r"down_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):
        level, layer, rest = int(match[1]), int(match[2]), match[3]
        return f"input_blocks.{1 + level * (LAYERS + 1) + layer}.0.{resnet(rest)}"
    if match := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", key):
        return f"input_blocks.{1 + int(match[1]) * (LAYERS + 1) + int(match[2])}.1.{match[3]}"
    if match := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * (LAYERS + 1)}.0.op.{match[2]}"
    if match := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(.+)", key):
        return f"output_blocks.{int(match[1]) * (LAYERS + 1) + int(match[2])}.0.{resnet(match[3])}"
    if match := re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", key):
        return f"output_blocks.{int(match[1]) * (LAYERS + 1) + int(match[2])}.1.{match[3]}"
    if match := re.fullmatch(r"up_blocks\.(\d)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        slot = 2 if block in attention_up_blocks else 1
        return f"output_blocks.{block * (LAYERS + 1) + LAYERS}.{slot}.conv.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{resnet(match[2])}"
    key = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", key)
    for diffusers_name, ldm_name in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]:
        key = re.sub(rf"^{re.escape(diffusers_name)}\.", ldm_name + ".", key)
    return key


def ldm_vae_key(key: str, levels: int) -> str:
    key = re.sub(r"\.resnets\.(\d)\.conv_shortcut\.", r".resnets.\1.nin_shortcut.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
    key = re.sub(r"^decoder\.up\.(\d)\.resnets\.", r"decoder.up.\1.block.", key)
    key = re.sub(r"^decoder\.up\.(\d)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
    key = re.sub(r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1.", key)
    key = key.replace(".mid_block.attentions.0.to_out.0.", ".mid.attn_1.proj_out.")
    return key.replace(".conv_norm_out.", ".norm_out.")


def to_ldm_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    attention_up_blocks = {i for i, name in enumerate(unet.config.up_block_types) if name.startswith("CrossAttn")}
    state_dict = {
        "model.diffusion_model." + ldm_unet_key(key, attention_up_blocks): value.clone()
        for key, value in unet.state_dict().items()
    }
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        ldm_key = ldm_vae_key(key, levels)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's attention uses 1x1 convolutions
        state_dict["first_stage_model." + ldm_key] = value.clone()
    state_dict["cond_stage_model.model.visual.proj"] = torch.zeros(3)  # not converted
    state_dict["betas"] = torch.linspace(0.1, 0.2, 10)  # not converted
    return state_dict


@pytest.fixture(scope="module")
def image_encoder_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def originals():
    return tiny_unet(seed=1), tiny_vae(seed=2)


def write_checkpoint(
    tmp_path, state_dict, suffix: str, config: dict | None = None, extra: dict | None = None
) -> tuple[str, str]:
    """Write `state_dict` as safetensors, or as a `.ckpt` in a Lightning 1.4 container with `extra` entries."""
    checkpoint = tmp_path / f"mixer{suffix}"
    if suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state_dict.items()}, checkpoint)
    else:
        with throwaway_pytorch_lightning() as model_checkpoint:
            torch.save({**lightning_checkpoint(state_dict, model_checkpoint), **(extra or {})}, checkpoint)
    config_file = tmp_path / "mixer.yaml"
    config_file.write_text(yaml.safe_dump(config or original_config()))
    return str(checkpoint), str(config_file)


def argv(checkpoint: str, config_file: str, encoder: str, output_dir, *extra: str) -> list[str]:
    return [
        "--checkpoint_path",
        checkpoint,
        "--original_config_file",
        config_file,
        "--image_encoder",
        encoder,
        "--output_dir",
        str(output_dir),
        *extra,
    ]


def assert_same_unet(original: UNet2DConditionModel, converted: UNet2DConditionModel) -> None:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        expected = original(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        actual = converted(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def assert_same_vae(original: AutoencoderKL, converted: AutoencoderKL) -> None:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            converted.encode(image).latent_dist.mean, original.encode(image).latent_dist.mean, atol=1e-5, rtol=1e-4
        )
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(
            converted.decode(latents).sample, original.decode(latents).sample, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_converted_models_match_the_originals(tmp_path, originals, image_encoder_dir, suffix):
    unet, vae = originals
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(unet, vae), suffix)
    output_dir = main(argv(checkpoint, config_file, image_encoder_dir, tmp_path / "pipe"))  # no trust flag
    assert "pytorch_lightning" not in sys.modules

    assert sorted(os.listdir(tmp_path)) == sorted(["mixer.yaml", f"mixer{suffix}", "pipe"])  # no staging leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert output_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # as any new folder, not mkdtemp's 0o700
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = ImageMixerPipeline.from_pretrained(output_dir)
    assert_same_unet(unet, pipe.unet)
    assert_same_vae(vae, pipe.vae)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.config.context_tokens == 5
    scheduler = pipe.scheduler.config
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and scheduler.prediction_type == "epsilon"

    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    images = pipe([[(image, 1.0)], [(image, 0.5)]], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()  # sample_size 8 x VAE factor 2


def test_linear_projection_heads_by_channels_scheduler_and_context_tokens(tmp_path, image_encoder_dir):
    unet = tiny_unet(seed=3, heads=(2, 4), linear=True)
    unet_params = {**UNET_YAML, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}
    config = original_config(unet_params)
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(unet, tiny_vae()), ".safetensors", config)
    output_dir = main(
        argv(
            checkpoint,
            config_file,
            image_encoder_dir,
            tmp_path / "pipe",
            "--scheduler",
            "euler",
            "--context_tokens",
            "1",
        )
    )

    pipe = ImageMixerPipeline.from_pretrained(output_dir)
    assert pipe.unet.config.attention_head_dim == [2, 4]  # heads: channels // num_head_channels
    assert pipe.unet.config.use_linear_projection
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.config.context_tokens == 1
    assert_same_unet(unet, pipe.unet)


def test_extract_ema_converts_the_ema_weights(tmp_path, originals, image_encoder_dir):
    unet, vae = originals
    state_dict = to_ldm_state_dict(unet, vae)
    ema_unet = tiny_unet(seed=5)
    for key, value in to_ldm_state_dict(ema_unet, vae).items():
        if key.startswith("model.diffusion_model."):
            state_dict["model_ema.diffusion_model" + key[len("model.diffusion_model.") :].replace(".", "")] = value
    checkpoint, config_file = write_checkpoint(tmp_path, state_dict, ".safetensors")

    output_dir = main(argv(checkpoint, config_file, image_encoder_dir, tmp_path / "pipe", "--extract_ema"))
    assert_same_unet(ema_unet, UNet2DConditionModel.from_pretrained(output_dir / "unet"))


def test_float16_and_overwrite(tmp_path, originals, image_encoder_dir):
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(*originals), ".safetensors")
    output_dir = tmp_path / "pipe"
    output_dir.mkdir()
    (output_dir / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        main(argv(checkpoint, config_file, image_encoder_dir, output_dir))

    main(argv(checkpoint, config_file, image_encoder_dir, output_dir, "--overwrite", "--dtype", "float16"))
    assert not (output_dir / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["mixer.yaml", "mixer.safetensors", "pipe"])
    for component in ("unet", "vae"):
        with safe_open(output_dir / component / "diffusion_pytorch_model.safetensors", "pt") as weights:
            assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"F16"}
    pipe = ImageMixerPipeline.from_pretrained(output_dir, torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.image_encoder.dtype == torch.float16


def test_a_pickle_that_runs_code_is_refused_before_any_work(tmp_path, originals, image_encoder_dir, monkeypatch):
    marker = tmp_path / "marker"
    evil = {"hyper_parameters": code_running_objects(marker)["exec"]}
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(*originals), ".ckpt", extra=evil)

    def refuse(*args, **kwargs):
        raise AssertionError("the image encoder must not be loaded")

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", refuse)
    with pytest.raises(
        ValueError, match=r"cannot be read by the safe loader.*calls `builtins.exec`.*pass --trust_pickled_checkpoint"
    ):
        main(argv(checkpoint, config_file, image_encoder_dir, tmp_path / "pipe"))
    assert not marker.exists() and not (tmp_path / "pipe").exists()


def test_trust_flag_unpickles_what_the_safe_loader_refuses(tmp_path, originals, image_encoder_dir):
    unet, vae = originals
    extra = {"hyper_parameters": {"ckpt_path": pathlib.PurePosixPath("/logs/last.ckpt")}}  # pickled as a call
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(unet, vae), ".ckpt", extra=extra)
    with pytest.raises(ValueError, match=r"calls `pathlib.PurePosixPath`.*--trust_pickled_checkpoint"):
        main(argv(checkpoint, config_file, image_encoder_dir, tmp_path / "pipe"))

    output_dir = main(
        argv(checkpoint, config_file, image_encoder_dir, tmp_path / "pipe", "--trust_pickled_checkpoint")
    )
    assert_same_unet(unet, UNet2DConditionModel.from_pretrained(output_dir / "unet"))


def test_load_checkpoint_keeps_only_the_selected_tensors(tmp_path, originals):
    state_dict = to_ldm_state_dict(*originals)
    prefixes = ("model.diffusion_model.", "first_stage_model.")
    expected = {key for key in state_dict if key.startswith(prefixes)}
    assert len(expected) == len(state_dict) - 2  # the cond stage and `betas` are left out
    for suffix in (".ckpt", ".safetensors"):
        checkpoint, _ = write_checkpoint(tmp_path, state_dict, suffix)
        loaded = load_checkpoint(checkpoint, prefixes=prefixes)
        assert loaded.keys() == expected
        torch.testing.assert_close(
            loaded["first_stage_model.quant_conv.weight"], state_dict["first_stage_model.quant_conv.weight"]
        )
    assert len(load_checkpoint(checkpoint)) == len(state_dict)


def test_input_errors(tmp_path, originals, image_encoder_dir):
    checkpoint, config_file = write_checkpoint(tmp_path, to_ldm_state_dict(*originals), ".safetensors")
    with pytest.raises(FileNotFoundError, match="--checkpoint_path: no such file"):
        main(argv(str(tmp_path / "missing.safetensors"), config_file, image_encoder_dir, tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="--original_config_file: no such file"):
        main(argv(checkpoint, str(tmp_path / "missing.yaml"), image_encoder_dir, tmp_path / "out"))

    no_unet = original_config()
    del no_unet["model"]["params"]["unet_config"]
    (tmp_path / "no_unet.yaml").write_text(yaml.safe_dump(no_unet))
    with pytest.raises(ValueError, match="no `unet_config.params` entry"):
        main(argv(checkpoint, str(tmp_path / "no_unet.yaml"), image_encoder_dir, tmp_path / "out"))

    wrong_context = original_config({**UNET_YAML, "context_dim": 16})
    (tmp_path / "wrong_context.yaml").write_text(yaml.safe_dump(wrong_context))
    with pytest.raises(ValueError, match="projects to 32-d embeddings but the UNet's `context_dim` is 16"):
        main(argv(checkpoint, str(tmp_path / "wrong_context.yaml"), image_encoder_dir, tmp_path / "out"))

    deeper = original_config({**UNET_YAML, "channel_mult": [1, 2, 2]})
    (tmp_path / "deeper.yaml").write_text(yaml.safe_dump(deeper))
    with pytest.raises(ValueError, match=r"UNet weights do not fit the architecture .*output_blocks\.2\.1\."):
        main(argv(checkpoint, str(tmp_path / "deeper.yaml"), image_encoder_dir, tmp_path / "out"))

    wider = original_config({**UNET_YAML, "model_channels": 64})
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    with pytest.raises(
        ValueError,
        match=r"converted UNet does not match its config: 0 missing .*, 0 unexpected .*, \d+ of another shape",
    ):
        main(argv(checkpoint, str(tmp_path / "wider.yaml"), image_encoder_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_script_entry_point_reports_bad_input_as_one_error_line(tmp_path, monkeypatch):
    """`python scripts/convert_image_mixer.py ...` (its `__main__` block, run in this process): bad input exits with
    one `error: ...` line, no traceback."""
    missing = tmp_path / "missing.ckpt"
    monkeypatch.setattr(sys, "argv", ["convert_image_mixer.py", *argv(str(missing), str(missing), "x", tmp_path)])
    with pytest.raises(SystemExit, match=f"^error: --checkpoint_path: no such file: {re.escape(str(missing))}$"):
        runpy.run_path(str(SCRIPTS / "convert_image_mixer.py"), run_name="__main__")
