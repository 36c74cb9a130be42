"""Synthetic images for distillation: the ImageMixer pipeline (diffusers), its safe checkpoint loader and the
synthesis stage (class-agnostic pairs mixed into a resumable parquet set), and pixel mixup, its cheap stand-in.

Needs the `diffusers` extra: `pip install "hf_distill[diffusers]"`. Reading a synthetic set does not:
`hf_distill.data.synthetic_dataset.load_synthetic_dataset` (re-exported here).
"""

try:
    import diffusers  # noqa: F401
except ImportError as error:
    raise ImportError(
        "`hf_distill.synthetic` needs diffusers: install it with `pip install 'hf_distill[diffusers]'`."
    ) from error

from ..data.synthetic_dataset import load_synthetic_dataset, missing_shards
from .pipeline_image_mixer import ImageMixerPipeline, ImageMixerPipelineOutput, build_mix_context
from .pixel_mixup import GENERATOR_LABELS, GENERATORS, IMAGE_MIXER, PIXEL_MIXUP, PIXEL_MIXUP_LABEL, mix_pixels
from .publishing import dataset_file_list, push_synthetic_dataset, synthesis_card, write_dataset_card
from .synthesis import (
    FEATURES,
    TORCH_DTYPES,
    SynthesisSettings,
    check_output_dir,
    check_sources,
    mix_plan,
    noise_generators,
    synthesize,
)

__all__ = [
    "FEATURES",
    "GENERATORS",
    "GENERATOR_LABELS",
    "IMAGE_MIXER",
    "PIXEL_MIXUP",
    "PIXEL_MIXUP_LABEL",
    "TORCH_DTYPES",
    "ImageMixerPipeline",
    "ImageMixerPipelineOutput",
    "SynthesisSettings",
    "build_mix_context",
    "check_output_dir",
    "check_sources",
    "dataset_file_list",
    "load_synthetic_dataset",
    "missing_shards",
    "mix_pixels",
    "mix_plan",
    "noise_generators",
    "push_synthetic_dataset",
    "synthesis_card",
    "synthesize",
    "write_dataset_card",
]
