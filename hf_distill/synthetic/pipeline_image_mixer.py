"""ImageMixer in diffusers: a Stable Diffusion 1.x UNet conditioned on several weighted CLIP image embeddings.

ImageMixer (Lambda Labs) fine-tunes the Stable Diffusion Image Variations UNet so that its cross-attention context
is a short sequence of projected CLIP ViT-L/14 image embeddings (`CLIPVisionModelWithProjection(...).image_embeds`)
instead of one. Each source image of a mix gives one token, its embedding scaled by a per-image weight; the tokens
are zero-padded to a fixed length (5 for the published checkpoint) and an all-zero context is the unconditional input
of classifier-free guidance. The one-token `lambdalabs/sd-image-variations-diffusers` UNet uses the same conditioning
with `context_tokens=1`.

```python
import torch
from diffusers import DiffusionPipeline
from PIL import Image

# the folder ships this file: diffusers runs it only when asked to (`trust_remote_code=True`)
pipe = DiffusionPipeline.from_pretrained("outputs/image-mixer", trust_remote_code=True, torch_dtype=torch.float16)
pipe = pipe.to("cuda")
cat, bread = Image.open("cat.jpg"), Image.open("bread.jpg")
images = pipe(
    [[(cat, 1.0), (bread, 1.2)], [(cat, 1.0)]],  # a batch of two mixes; `cat` is encoded once
    num_inference_steps=30, guidance_scale=3.0, height=640, width=640, generator=torch.Generator().manual_seed(0),
).images

embeddings = pipe.encode_images([cat, bread])  # or precompute the embeddings and mix those
images = pipe([[(embeddings[0], 0.5), (embeddings[1], 1.5)]]).images
```

`save_pretrained` (and `python scripts/convert_image_mixer.py`) ships a copy of this file with the weights, so
`DiffusionPipeline.from_pretrained(folder or Hub id, trust_remote_code=True)` loads the folder wherever diffusers and
transformers are installed (this file imports nothing else); `hf_distill.synthetic.ImageMixerPipeline.from_pretrained`
loads it with the installed class, running no code from the folder.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

__all__ = ["ImageMixerPipeline", "ImageMixerPipelineOutput", "build_mix_context"]

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
"""A source image: a PIL image, an HWC RGB numpy array or a CHW RGB tensor (uint8 in [0, 255] or float in [0, 1])."""

Mix = Sequence[tuple[ImageInput, float]]
"""A mix: `(source, weight)` pairs, where a source is an image or, as a 1-D tensor, its precomputed embedding."""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CODE_FILE = "pipeline_image_mixer.py"
"""Name of the copy of this file in a saved pipeline folder (`_class_name` of its `model_index.json` names it)."""
CLASS_NAME = [CODE_FILE.removesuffix(".py"), "ImageMixerPipeline"]
"""`_class_name` of a saved folder's `model_index.json`: the module and class of the shipped copy of this file."""


@dataclass
class ImageMixerPipelineOutput(BaseOutput):
    """
    Output of [`ImageMixerPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            One generated image per mix: PIL images, a `(batch, height, width, 3)` array in [0, 1], a
            `(batch, 3, height, width)` tensor in [0, 1], or the final latents for `output_type="latent"`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _check_positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _is_embedding(source: object) -> bool:
    return isinstance(source, torch.Tensor) and source.ndim == 1


def _check_weight(weight: object, where: str) -> float:
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"{where}: the weight must be a real number, got {type(weight).__name__}.")
    if not math.isfinite(weight):
        raise ValueError(f"{where}: the weight must be finite, got {weight}.")
    return float(weight)


def _check_mixes(mixes: Sequence[Mix], context_tokens: int, embedding_size: int | None = None) -> list[list[float]]:
    """Check a batch of mixes (given `embedding_size`, their sources too) and return their weights as floats."""
    if isinstance(mixes, (str, bytes)) or not isinstance(mixes, Sequence) or len(mixes) == 0:
        raise ValueError("`mixes` must be a non-empty list of mixes, each a list of `(image_or_embedding, weight)`.")
    pair = "`(image_or_embedding, weight)`"
    weights = []
    for index, mix in enumerate(mixes):
        if isinstance(mix, Sequence) and len(mix) == 2 and isinstance(mix[1], numbers.Real):
            raise TypeError(
                f"Mix {index} is a single `(image, weight)` pair: wrap the batch as `[[(image, weight)]]`."
            )
        if isinstance(mix, (str, bytes)) or not isinstance(mix, Sequence):
            raise TypeError(f"Mix {index} is a {type(mix).__name__}: a mix is a list of {pair}.")
        if len(mix) == 0:
            raise ValueError(f"Mix {index} is empty: every mix needs at least one {pair} pair.")
        if len(mix) > context_tokens:
            raise ValueError(f"Mix {index} has {len(mix)} inputs but the model takes at most `{context_tokens=}`.")
        mix_weights = []
        for position, item in enumerate(mix):
            where = f"Mix {index}, input {position}"
            if not isinstance(item, Sequence) or len(item) != 2:
                raise TypeError(f"{where}: expected a {pair} pair, got {type(item).__name__}.")
            mix_weights.append(_check_weight(item[1], where))
            if embedding_size is not None and not _is_embedding(item[0]):
                _check_image(item[0], where)
            elif embedding_size is not None and item[0].numel() != embedding_size:
                raise ValueError(
                    f"{where}: an embedding must have size {embedding_size} (the image encoder's `projection_dim`), "
                    f"got {item[0].numel()}."
                )
        weights.append(mix_weights)
    return weights


def build_mix_context(mixes: Sequence[Sequence[tuple[torch.Tensor, float]]], context_tokens: int = 5) -> torch.Tensor:
    """
    Build the cross-attention context of a batch of mixes from their embeddings.

    Token `i` of a mix is `embedding_i * weight_i`; the rows after the last input are zeros.

    Args:
        mixes (`Sequence[Sequence[tuple[torch.Tensor, float]]]`):
            A batch of mixes, each a list of `(embedding, weight)` pairs with 1-D embeddings of one common size.
        context_tokens (`int`, *optional*, defaults to 5):
            The length of the context; a mix may have at most that many inputs.

    Returns:
        `torch.Tensor`: The context, `(len(mixes), context_tokens, embedding_size)`, in the dtype and on the device
        of the first embedding.
    """
    weights = _check_mixes(mixes, context_tokens)
    embeddings = [source for mix in mixes for source, _ in mix]
    first = embeddings[0]
    for index, embedding in enumerate(embeddings):
        if not (_is_embedding(first) and _is_embedding(embedding) and embedding.shape == first.shape):
            found = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise ValueError(f"Input {index} is {found}: the embeddings must be 1-D tensors of one common size.")
    table = torch.stack([embedding.to(device=first.device, dtype=first.dtype) for embedding in embeddings])
    flat_weights = torch.tensor([w for mix in weights for w in mix], dtype=table.dtype, device=table.device)
    rows = torch.tensor([b for b, mix in enumerate(weights) for _ in mix], device=table.device)
    slots = torch.tensor([t for mix in weights for t in range(len(mix))], device=table.device)
    context = table.new_zeros(len(mixes), context_tokens, table.shape[-1])
    context[rows, slots] = table * flat_weights[:, None]
    return context


def _check_image(image: object, where: str = "An image") -> None:
    """Raise unless `image` is a PIL image, an HWC or a CHW RGB array / tensor (values are checked when encoded)."""
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{where}: unsupported source {type(image).__name__}; pass a PIL image, an HWC numpy array, a CHW tensor "
            "or a 1-D embedding tensor."
        )
    if isinstance(image, torch.Tensor) and (image.ndim != 3 or image.shape[0] != 3):
        raise ValueError(f"{where}: an image tensor must be CHW with 3 channels, got shape {tuple(image.shape)}.")
    if isinstance(image, np.ndarray) and (image.ndim != 3 or image.shape[-1] != 3):
        raise ValueError(f"{where}: an image array must be HWC with 3 channels, got shape {image.shape}.")


def _to_uint8_hwc(image: ImageInput) -> np.ndarray:
    """An RGB source image as an `(H, W, 3)` uint8 array, the common input of the CLIP image processor."""
    _check_image(image)
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else image
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"An image array or tensor must be uint8 or float in [0, 1], got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"A float image must have values in [0, 1], got [{array.min()}, {array.max()}].")
    return (array.astype(np.float32) * 255).round().astype(np.uint8)


class ImageMixerPipeline(DiffusionPipeline):
    r"""
    Generate images that mix several source images, weighted, with an ImageMixer UNet.

    This model inherits from [`DiffusionPipeline`]: see there for the generic methods (saving, loading, moving to a
    device, CPU offloading, progress bar settings).

    Args:
        vae ([`AutoencoderKL`]):
            The Stable Diffusion autoencoder that decodes the latents into images.
        unet ([`UNet2DConditionModel`]):
            The denoising UNet, with `cross_attention_dim` equal to the image encoder's `projection_dim`.
        scheduler ([`SchedulerMixin`]):
            The noise scheduler; the reference sampler is [`DDIMScheduler`] with 30-40 steps.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`]):
            The frozen CLIP image encoder (`openai/clip-vit-large-patch14` for the published checkpoints).
        feature_extractor ([`~transformers.CLIPImageProcessor`]):
            Resizes, crops and normalizes the source images for `image_encoder`.
        context_tokens (`int`, *optional*, defaults to 5):
            The length of the cross-attention context: the most inputs a mix may have. 5 for ImageMixer, 1 for Stable
            Diffusion Image Variations.
    """

    model_cpu_offload_seq = "image_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        context_tokens: int = 5,
    ):
        super().__init__()
        _check_positive_int(context_tokens, "context_tokens")
        projection_dim = image_encoder.config.projection_dim
        if unet.config.cross_attention_dim != projection_dim:
            raise ValueError(
                f"The UNet attends to {unet.config.cross_attention_dim}-d context tokens but the image encoder "
                f"projects to {projection_dim}-d embeddings: they must match."
            )
        self.register_modules(
            vae=vae, unet=unet, scheduler=scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor
        )
        self.register_to_config(context_tokens=context_tokens)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Write `model_index.json` (see [`~ImageMixerPipeline.to_json_string`]) and, beside it, a copy of this file
        (`pipeline_image_mixer.py`), the code `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
        loads. `save_pretrained` calls it after saving the components, before any push."""
        os.makedirs(save_directory, exist_ok=True)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, CODE_FILE))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """The pipeline config, with `_class_name` naming the module and class of the copy of this file shipped with
        the weights (`["pipeline_image_mixer", "ImageMixerPipeline"]`), as diffusers custom pipelines do."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = CLASS_NAME
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        """Read a config; loaded through this class, a `_class_name` naming the shipped copy of this file is read as
        the class itself, so that `ImageMixerPipeline.from_pretrained` runs no code from the folder or repo."""
        config = super()._dict_from_json_file(json_file)
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and list(name) == CLASS_NAME:
            config["_class_name"] = name[1]
        return config

    @property
    def embedding_size(self) -> int:
        """The size of one context token: the image encoder's `projection_dim`."""
        return self.image_encoder.config.projection_dim

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """
        Compute the projected CLIP embeddings of source images, in one batched call of the image encoder.

        Args:
            images (`Sequence[PIL.Image.Image | np.ndarray | torch.Tensor]`):
                PIL images, HWC numpy arrays or CHW tensors (RGB, uint8 in [0, 255] or float in [0, 1]).

        Returns:
            `torch.Tensor`: The embeddings (`image_embeds`), `(len(images), projection_dim)`, on the execution device
            in the image encoder's dtype. They can be passed back to the pipeline in place of the images.
        """
        if len(images) == 0:
            raise ValueError("`encode_images` needs at least one image.")
        arrays = [_to_uint8_hwc(image) for image in images]
        pixel_values = self.feature_extractor(images=arrays, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=self._execution_device, dtype=self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixel_values).image_embeds

    def check_mixes(self, mixes: Sequence[Mix]) -> None:
        """
        Validate a batch of mixes without encoding anything.

        Args:
            mixes (`Sequence[Mix]`):
                See [`~ImageMixerPipeline.__call__`].

        Raises:
            `ValueError` or `TypeError`: for an empty batch or mix, a mix with more than `context_tokens` inputs, a
            weight that is not a finite number, an embedding whose size is not `projection_dim` or a source that is
            not an image.
        """
        _check_mixes(mixes, self.config.context_tokens, self.embedding_size)

    def encode_mixes(self, mixes: Sequence[Mix]) -> torch.Tensor:
        """
        Build the conditional cross-attention context of a batch of mixes.

        Source images are encoded once each, deduplicated by object identity, in a single batched encoder call;
        embeddings are used as given.

        Args:
            mixes (`Sequence[Mix]`):
                See [`~ImageMixerPipeline.__call__`].

        Returns:
            `torch.Tensor`: The context, `(len(mixes), context_tokens, projection_dim)`, on the execution device in
            the UNet's dtype.
        """
        self.check_mixes(mixes)
        device, dtype = self._execution_device, self.unet.dtype
        unique_images: dict[int, ImageInput] = {}
        for mix in mixes:
            for source, _ in mix:
                if not _is_embedding(source):
                    unique_images.setdefault(id(source), source)
        embedding_of = {}
        if unique_images:
            encoded = self.encode_images(list(unique_images.values())).to(device=device, dtype=dtype)
            embedding_of = dict(zip(unique_images, encoded))
        resolved = [
            [
                (source.to(device=device, dtype=dtype) if _is_embedding(source) else embedding_of[id(source)], weight)
                for source, weight in mix
            ]
            for mix in mixes
        ]
        return build_mix_context(resolved, self.config.context_tokens)

    def check_inputs(self, mixes, num_inference_steps, height, width, output_type, generator, latents) -> None:
        """Validate the arguments of [`~ImageMixerPipeline.__call__`] before any work."""
        self.check_mixes(mixes)
        _check_positive_int(num_inference_steps, "num_inference_steps")
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % self.vae_scale_factor:
                raise ValueError(
                    f"`{name}` must be a positive multiple of the VAE scale factor {self.vae_scale_factor}, got {size}."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(generator, list) and len(generator) != len(mixes):
            raise ValueError(f"Got {len(generator)} generators for a batch of {len(mixes)} mixes.")
        shape = self._latent_shape(len(mixes), height, width)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")

    def _latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        scale = self.vae_scale_factor
        return (batch_size, self.unet.config.in_channels, height // scale, width // scale)

    def _decode(self, latents: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        if output_type == "latent":
            return latents
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        if self.vae.config.shift_factor is not None:
            latents = latents + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        mixes: Sequence[Mix],
        num_inference_steps: int = 30,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
    ) -> ImageMixerPipelineOutput | tuple:
        r"""
        Generate one image per mix.

        Args:
            mixes (`Sequence[Mix]`):
                A batch of mixes. A mix is a list of 1 to `context_tokens` `(source, weight)` pairs, where the source
                is an image (PIL image, HWC numpy array or CHW tensor; RGB, uint8 or float in [0, 1]) or a 1-D tensor
                holding its precomputed embedding (from [`~ImageMixerPipeline.encode_images`]) and the weight is a
                finite number that scales its token. An image object used in several mixes is encoded once.
            num_inference_steps (`int`, *optional*, defaults to 30):
                The number of denoising steps.
            guidance_scale (`float`, *optional*, defaults to 3.0):
                Classifier-free guidance scale against the all-zero context; guidance is off when it is `<= 1`.
            height (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                The height of the images in pixels, a multiple of the VAE scale factor.
            width (`int`, *optional*, defaults to `unet.config.sample_size * vae_scale_factor`):
                The width of the images in pixels, a multiple of the VAE scale factor.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A generator, or one per mix, that makes the initial noise (and stochastic scheduler steps)
                deterministic.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the final latents, not decoded).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImageMixerPipelineOutput`] rather than a tuple.
            latents (`torch.Tensor`, *optional*):
                Initial Gaussian noise latents, `(len(mixes), unet.config.in_channels, height // vae_scale_factor,
                width // vae_scale_factor)`; drawn from `generator` when not given.

        Returns:
            [`ImageMixerPipelineOutput`] or `tuple`: the output, or `(images,)` when `return_dict` is `False`.
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(mixes, num_inference_steps, height, width, output_type, generator, latents)

        device, dtype = self._execution_device, self.unet.dtype
        context = self.encode_mixes(mixes)
        do_guidance = guidance_scale > 1.0
        if do_guidance:
            context = torch.cat([torch.zeros_like(context), context])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(
                self._latent_shape(len(mixes), height, width), generator=generator, device=device, dtype=dtype
            )
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        for timestep in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, timestep)
            noise = self.unet(model_input, timestep, encoder_hidden_states=context, return_dict=False)[0]
            if do_guidance:
                unconditional, conditional = noise.chunk(2)
                noise = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise, timestep, latents, **step_kwargs, return_dict=False)[0]

        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImageMixerPipelineOutput(images=images)
