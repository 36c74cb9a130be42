"""Synthetic images for distillation: the ImageMixer pipeline (diffusers) and its checkpoint converter.

Needs the `diffusers` extra: `pip install "hf_distill[diffusers]"`.
"""

try:
    import diffusers  # noqa: F401
except ImportError as error:
    raise ImportError(
        "`hf_distill.synthetic` needs diffusers: install it with `pip install 'hf_distill[diffusers]'`."
    ) from error

from .pipeline_image_mixer import ImageMixerPipeline, ImageMixerPipelineOutput, build_mix_context

__all__ = ["ImageMixerPipeline", "ImageMixerPipelineOutput", "build_mix_context"]
