"""Real Hub teachers (network needed): `pytest -m slow` or `make test-all`. Left out of the default suite."""

import pytest
import torch

from hf_distill import load_teacher

pytestmark = pytest.mark.slow

STUDENT_MEAN = torch.tensor([0.485, 0.456, 0.406])
STUDENT_STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.mark.parametrize(
    ("source", "options", "dim"),
    [
        ("facebook/dino-vits16", {}, 384),
        ("facebook/dinov2-small", {"grid_alignment": "resize"}, 384),
        ("facebook/dinov2-with-registers-small", {"grid_alignment": "interpolate"}, 384),
        ("openai/clip-vit-base-patch16", {"summary": "pooler"}, 768),
        ("google/siglip-base-patch16-224", {}, 768),
        ("facebook/deit-small-distilled-patch16-224", {}, 384),
    ],
)
def test_hub_teacher_on_a_vit_b16_student_grid(source, options, dim, tmp_path):
    teacher = load_teacher(source, **options)
    pixels = (torch.rand(2, 3, 224, 224) - STUDENT_MEAN.view(1, 3, 1, 1)) / STUDENT_STD.view(1, 3, 1, 1)
    with torch.inference_mode():
        out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=(14, 14))
    assert out.summary.shape == (2, dim) and out.patch_tokens.shape == (2, 196, dim)
    assert torch.isfinite(out.patch_tokens).all()
    teacher.save_pretrained(tmp_path)
    reloaded = load_teacher(str(tmp_path))
    with torch.inference_mode():
        torch.testing.assert_close(
            reloaded(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=(14, 14)).summary, out.summary
        )
