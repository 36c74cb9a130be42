"""ImageMixerPipeline on tiny seeded components built in code (CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionImageVariationPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from hf_distill.synthetic import ImageMixerPipeline, ImageMixerPipelineOutput, build_mix_context  # noqa: E402

EMBED = 32  # projection_dim of the tiny CLIP = cross_attention_dim of the tiny UNet
STEPS = 2


def make_pipeline(context_tokens: int = 5) -> ImageMixerPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=EMBED,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        layers_per_block=1,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            projection_dim=EMBED,
        )
    ).eval()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = ImageMixerPipeline(
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        context_tokens=context_tokens,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe() -> ImageMixerPipeline:
    return make_pipeline()


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]


def generate(pipe: ImageMixerPipeline, mixes, seed: int = 0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(mixes, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs).images


class CallRecorder:
    """Forward hooks that record the batch size (and conditioning) of every call of a module."""

    def __init__(self, module: torch.nn.Module):
        self.batch_sizes, self.contexts = [], []
        module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        inputs = args[0] if args else kwargs.get("sample", kwargs.get("pixel_values"))
        self.batch_sizes.append(inputs.shape[0])
        if "encoder_hidden_states" in kwargs:
            self.contexts.append(kwargs["encoder_hidden_states"].clone())


def test_output_types_and_shapes(pipe, images):
    a, b, c = images
    mixes = [[(a, 1.0)], [(a, 0.5), (b, 1.5)], [(PIL.Image.fromarray(c), 1.0), (b, 1.0), (a, 0.2)]]
    pil = generate(pipe, mixes, output_type="pil")
    assert len(pil) == 3 and all(isinstance(im, PIL.Image.Image) and im.size == (8, 8) for im in pil)
    array = generate(pipe, mixes, output_type="np")
    assert array.shape == (3, 8, 8, 3) and array.min() >= 0 and array.max() <= 1
    tensor = generate(pipe, mixes, output_type="pt")
    assert tensor.shape == (3, 3, 8, 8)
    torch.testing.assert_close(tensor.permute(0, 2, 3, 1).numpy(), array)
    latents = generate(pipe, mixes, output_type="latent")
    assert latents.shape == (3, 4, 8, 8)

    output = pipe(mixes, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    assert isinstance(output, ImageMixerPipelineOutput)
    as_tuple = pipe(mixes, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and len(as_tuple[0]) == 3
    assert pipe(mixes, num_inference_steps=STEPS, height=16, width=24, output_type="np").images.shape == (3, 16, 24, 3)


def test_seeded_output_is_stable(pipe, images):
    mixes = [[(images[0], 1.0), (images[1], 0.5)], [(images[2], 2.0)]]
    first = generate(pipe, mixes, seed=0)
    np.testing.assert_array_equal(generate(pipe, mixes, seed=0), first)
    assert np.abs(generate(pipe, mixes, seed=1) - first).max() > 1e-3
    expected = np.array([0.5506, 0.6159, 0.4398, 0.5080, 0.5036, 0.4967])  # computed once with this seed
    np.testing.assert_allclose(first[1, 3, :2].ravel(), expected, atol=1e-3)


def test_weights_change_the_result(pipe, images):
    one = generate(pipe, [[(images[0], 1.0), (images[1], 1.0)]])
    other = generate(pipe, [[(images[0], 1.0), (images[1], 3.0)]])
    assert np.abs(one - other).max() > 1e-3


def test_build_mix_context_scales_tokens_and_pads_with_zeros():
    e1, e2, e3 = torch.randn(3, EMBED, dtype=torch.float64)
    context = build_mix_context([[(e1, 0.5), (e2, 2.0)], [(e3, -1.0)]], context_tokens=4)
    expected = torch.zeros(2, 4, EMBED, dtype=torch.float64)
    expected[0, 0], expected[0, 1], expected[1, 0] = e1 * 0.5, e2 * 2.0, -e3
    assert context.dtype == torch.float64
    torch.testing.assert_close(context, expected, rtol=0, atol=0)


def test_padding_equals_explicit_zero_tokens(pipe, images):
    padded = generate(pipe, [[(images[0], 1.5)]])
    by_hand = generate(pipe, [[(images[0], 1.5)] + [(torch.zeros(EMBED), 1.0)] * 4])
    np.testing.assert_array_equal(padded, by_hand)

    context = pipe.encode_mixes([[(images[0], 1.5)]])
    assert context.shape == (1, 5, EMBED)
    torch.testing.assert_close(context[0, 0], pipe.encode_images([images[0]])[0] * 1.5)
    assert not context[0, 1:].any()


def test_unconditional_context_is_zeros_and_guidance_doubles_the_batch(pipe, images):
    recorder = CallRecorder(pipe.unet)
    mixes = [[(images[0], 1.0)], [(images[1], 0.5), (images[2], 1.0)]]
    conditional = pipe.encode_mixes(mixes)

    generate(pipe, mixes, guidance_scale=3.0)
    assert recorder.batch_sizes == [4] * STEPS  # one UNet call per step on the doubled batch
    for context in recorder.contexts:
        assert not context[:2].any()
        torch.testing.assert_close(context[2:], conditional)

    recorder.batch_sizes.clear(), recorder.contexts.clear()
    generate(pipe, mixes, guidance_scale=1.0)
    assert recorder.batch_sizes == [2] * STEPS
    torch.testing.assert_close(recorder.contexts[0], conditional)

    # With all-zero weights the conditional input is the unconditional one, so guidance changes nothing.
    zero = [[(images[0], 0.0)]]
    np.testing.assert_allclose(
        generate(pipe, zero, guidance_scale=5.0), generate(pipe, zero, guidance_scale=1.0), atol=1e-6
    )


def test_each_source_image_is_encoded_once(pipe, images):
    a, b, c = images
    recorder = CallRecorder(pipe.image_encoder)
    pil = PIL.Image.fromarray(c)
    generate(pipe, [[(a, 1.0), (b, 1.0)], [(a, 0.5), (pil, 1.0)], [(b, 1.0), (a, 2.0), (pil, 1.0)], [(a, 1.0)]])
    assert recorder.batch_sizes == [3]  # one batched call for the 3 distinct image objects

    recorder.batch_sizes.clear()
    generate(pipe, [[(a, 1.0)], [(a.copy(), 1.0)]])  # deduplication is by identity: a copy is another image
    assert recorder.batch_sizes == [2]


def test_precomputed_embeddings_give_the_same_result(pipe, images):
    a, b, _ = images
    from_images = generate(pipe, [[(a, 1.0), (b, 0.7)], [(b, 1.2)]])
    embeddings = pipe.encode_images([a, b])
    assert embeddings.shape == (2, EMBED)
    recorder = CallRecorder(pipe.image_encoder)
    from_embeddings = generate(pipe, [[(embeddings[0], 1.0), (embeddings[1], 0.7)], [(embeddings[1], 1.2)]])
    assert recorder.batch_sizes == []
    np.testing.assert_allclose(from_embeddings, from_images, atol=1e-6)
    mixed = generate(pipe, [[(embeddings[0], 1.0), (b, 0.7)], [(b, 1.2)]])
    np.testing.assert_allclose(mixed, from_images, atol=1e-6)


def test_image_formats_give_the_same_embedding(pipe, images):
    image = images[0]
    chw = torch.from_numpy(image).permute(2, 0, 1)
    embeddings = pipe.encode_images([image, PIL.Image.fromarray(image), chw, chw.float() / 255, image / 255.0])
    for embedding in embeddings[1:]:
        torch.testing.assert_close(embedding, embeddings[0])
    with pytest.raises(ValueError, match=r"float image must have values in \[0, 1\]"):
        pipe.encode_images([chw.float()])
    with pytest.raises(ValueError, match="HWC with 3 channels"):
        pipe.encode_images([image[..., :2]])


def test_errors_are_raised_before_any_work(pipe, images):
    encoder_calls, unet_calls = CallRecorder(pipe.image_encoder), CallRecorder(pipe.unet)
    image = images[0]
    with pytest.raises(ValueError, match="Mix 1 has 6 inputs but the model takes at most `context_tokens=5`"):
        pipe([[(image, 1.0)], [(image, 1.0)] * 6])
    with pytest.raises(ValueError, match="Mix 1 is empty"):
        pipe([[(image, 1.0)], []])
    with pytest.raises(ValueError, match="non-empty list of mixes"):
        pipe([])
    with pytest.raises(ValueError, match="Mix 0, input 1: an embedding must have size 32 .* got 16"):
        pipe([[(image, 1.0), (torch.zeros(16), 1.0)]])
    for weight in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Mix 0, input 0: the weight must be finite"):
            pipe([[(image, weight)]])
    with pytest.raises(TypeError, match="the weight must be a real number"):
        pipe([[(image, "1.0")]])
    with pytest.raises(TypeError, match="single `\\(image, weight\\)` pair"):
        pipe([(image, 1.0)])
    with pytest.raises(TypeError, match="unsupported source str"):
        pipe([[("cat.png", 1.0)]])
    with pytest.raises(ValueError, match="`height` must be a positive multiple"):
        pipe([[(image, 1.0)]], height=-8)
    with pytest.raises(ValueError, match="2 generators for a batch of 1"):
        pipe([[(image, 1.0)]], generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="`output_type` must be one of"):
        pipe([[(image, 1.0)]], output_type="jpeg")
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 4, 8, 8\)"):
        pipe([[(image, 1.0)]], latents=torch.zeros(1, 4, 4, 4))
    assert encoder_calls.batch_sizes == [] and unet_calls.batch_sizes == []

    with pytest.raises(ValueError, match="projects to 32-d embeddings"):
        ImageMixerPipeline(
            vae=pipe.vae,
            unet=UNet2DConditionModel.from_config(pipe.unet.config, cross_attention_dim=16),
            scheduler=pipe.scheduler,
            image_encoder=pipe.image_encoder,
            feature_extractor=pipe.feature_extractor,
        )


def test_one_token_pipeline(images):
    pipe = make_pipeline(context_tokens=1)
    recorder = CallRecorder(pipe.unet)
    out = generate(pipe, [[(images[0], 1.0)], [(images[1], 2.0)]], guidance_scale=3.0)
    assert out.shape == (2, 8, 8, 3)
    assert recorder.contexts[0].shape == (4, 1, EMBED)
    with pytest.raises(ValueError, match="at most `context_tokens=1`"):
        pipe([[(images[0], 1.0), (images[1], 1.0)]])


def test_one_token_matches_stable_diffusion_image_variation(tmp_path, images):
    """With one token, ImageMixer conditioning is that of diffusers' StableDiffusionImageVariationPipeline, and a
    folder saved by that pipeline loads as an ImageMixerPipeline."""
    parts = make_pipeline(context_tokens=1).components
    reference = StableDiffusionImageVariationPipeline(
        **{name: parts[name] for name in ("vae", "image_encoder", "unet", "scheduler", "feature_extractor")},
        safety_checker=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(images[0])
    generator = torch.Generator().manual_seed(0)
    expected = reference(image, num_inference_steps=STEPS, generator=generator, output_type="np").images
    reference.save_pretrained(tmp_path)

    pipe = ImageMixerPipeline.from_pretrained(tmp_path, context_tokens=1)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(pipe, [[(image, 1.0)]], guidance_scale=7.5), expected, atol=1e-6)


def test_generators_latents_and_batch_independence(pipe, images):
    mixes = [[(images[0], 1.0)], [(images[1], 1.0)]]
    batched = pipe(
        mixes,
        num_inference_steps=STEPS,
        generator=[torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)],
        output_type="np",
    ).images
    alone = generate(pipe, mixes[1:], seed=4)
    np.testing.assert_allclose(batched[1:], alone, atol=1e-5)

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    from_latents = pipe(mixes[1:], num_inference_steps=STEPS, latents=latents, output_type="np").images
    np.testing.assert_array_equal(from_latents, alone)


def test_runs_in_the_unet_dtype(pipe, images):
    pipe.unet.to(torch.bfloat16)  # image encoder and VAE stay in float32
    recorder = CallRecorder(pipe.unet)
    mixes = [[(images[0], 1.0), (torch.randn(EMBED, dtype=torch.float64), 0.5)]]
    latents = generate(pipe, mixes, output_type="latent")
    assert latents.dtype == torch.bfloat16 and recorder.contexts[0].dtype == torch.bfloat16
    images_out = generate(pipe, mixes, output_type="pt")
    assert images_out.dtype == torch.float32 and torch.isfinite(images_out).all()


def test_save_and_load_round_trip(tmp_path, images):
    pipe = make_pipeline(context_tokens=3)
    mixes = [[(images[0], 1.0), (images[1], 0.5)]]
    expected = generate(pipe, mixes)
    pipe.save_pretrained(tmp_path)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == ["pipeline_image_mixer", "ImageMixerPipeline"]  # the shipped code file
    assert model_index["context_tokens"] == 3 and (tmp_path / "pipeline_image_mixer.py").is_file()
    assert model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert model_index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    reloaded = ImageMixerPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.config.context_tokens == 3
    np.testing.assert_array_equal(generate(reloaded, mixes), expected)

    # The generic loader runs the folder's code only when asked to (tests/synthetic/test_image_mixer_hub.py loads it so).
    with pytest.raises(ValueError, match="(?s)pipeline_image_mixer.py.*trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path)
