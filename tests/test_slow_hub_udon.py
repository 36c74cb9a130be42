"""UDON on real Hub backbones (network needed): `pytest -m slow` or `make test-all`. Left out of the default suite."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, CLIPVisionModel

from hf_distill.models import UdonModel, UdonModelConfig

pytestmark = pytest.mark.slow
DOMAINS = [{"name": "cars", "num_classes": 98}, {"name": "sop", "num_classes": 11318}]


@pytest.mark.parametrize("source", ["openai/clip-vit-base-patch16", "google/vit-base-patch16-224-in21k"])
def test_pretrained_backbone_trains_a_step_and_exports(source, tmp_path):
    """The UnED config's backbones: weights loaded as published (CLIP: the vision tower's normed pooler), one UDON step
    gives finite gradients, and the exported embedding model reproduces the trained model's embeddings."""
    model = UdonModel.from_backbone(source, UdonModelConfig(domains=DOMAINS))
    reference = (CLIPVisionModel if "clip" in source else AutoModel).from_pretrained(source).eval()
    pixels = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        out = reference(pixel_values=pixels)
    cls = out.pooler_output if "clip" in source else out.last_hidden_state[:, 0]
    model.eval()
    with torch.no_grad():
        expected = model(pixels, domain="sop").student_embeds
    torch.testing.assert_close(expected, F.normalize(model.student_head(F.normalize(cls, dim=-1)), dim=-1))
    model.train()
    out = model(pixels, domain="cars", labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.student_head.weight.grad.abs().sum() > 0
    model.eval().save_embedding_model(tmp_path, image_size=224)
    embedder = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert processor.crop_size["height"] == 224
    with torch.no_grad():
        torch.testing.assert_close(embedder(pixels).image_embeds, expected)
