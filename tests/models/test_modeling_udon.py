"""UdonModel: configuration checks, USCRR loss, full save/load, export of the embedding model (CLIP backbone), and the
export folder's handling of what was there before. (Shapes, gradient routing, the export loaded WITHOUT hf_distill in
a subprocess and backbones from ViT / CLIP folders: tests/recipes/test_udon.py.)"""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPConfig, CLIPModel, SiglipVisionConfig

import hf_distill.models  # noqa: F401  (registers UdonModelConfig / UdonModel)
from hf_distill.models import UdonModel, UdonModelConfig

from ..conftest import TINY, tiny_vit_config

DOMAINS = [{"name": "cars", "num_classes": 3}, {"name": "food", "num_classes": 5}]


def tiny_clip_config() -> CLIPConfig:
    return CLIPConfig(
        vision_config=dict(**TINY, image_size=32, patch_size=16),
        text_config=dict(**TINY, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16,
    )


@pytest.mark.parametrize(
    ("domains", "kwargs", "match"),
    [
        ([DOMAINS[0], DOMAINS[0]], {}, "unique"),
        ([{"name": "inat.2021", "num_classes": 3}], {}, "without '.'"),
        ([{"name": "", "num_classes": 3}], {}, "non-empty string"),
        ([{"num_classes": 3}], {}, "non-empty string"),
        ([{"name": "x", "num_classes": 0}], {}, "num_classes"),
        ([{"name": "x", "num_classes": 2.0}], {}, "num_classes"),
        ([{"name": "x", "num_classes": True}], {}, "num_classes"),
        (DOMAINS, {"margin_type": "sphereface"}, "margin_type"),
        (DOMAINS, {"embedding_dim": 0}, "embedding_dim"),
        (DOMAINS, {"distill_temperature": 0.0}, "distill_temperature"),
        (DOMAINS, {"relational_scale": -1.0}, "relational_scale"),
        (DOMAINS, {"backbone_config": SiglipVisionConfig(**TINY)}, "Unsupported backbone"),
    ],
)
def test_config_validation(domains, kwargs, match):
    kwargs.setdefault("backbone_config", tiny_vit_config())
    with pytest.raises(ValueError, match=match):
        UdonModelConfig(domains=domains, **kwargs)


def test_config_round_trip_and_clip_config_becomes_its_vision_tower(tmp_path):
    config = UdonModelConfig(backbone_config=tiny_clip_config(), domains=DOMAINS, margin=0.2, margin_type="arcface")
    assert config.backbone_config.model_type == "clip_vision_model"
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UdonModelConfig) and loaded.domain_names == ["cars", "food"]
    assert loaded.backbone_config.model_type == "clip_vision_model" and loaded.margin_type == "arcface"
    with pytest.raises(ValueError, match="backbone_config is required"):
        UdonModel(UdonModelConfig(domains=DOMAINS))
    with pytest.raises(ValueError, match="at least one domain"):
        UdonModel(UdonModelConfig(backbone_config=tiny_vit_config()))


def test_uscrr_has_no_teacher_heads_and_its_loss_is_the_student_ce():
    torch.manual_seed(0)
    model = UdonModel(UdonModelConfig(backbone_config=tiny_vit_config(), domains=DOMAINS, use_teacher_heads=False))
    assert not any("teacher" in name for name, _ in model.named_parameters())
    labels = torch.tensor([0, 4, 2])
    out = model(torch.randn(3, 3, 32, 32), domain=1, labels=labels)
    assert (
        out.teacher_embeds is None
        and out.teacher_cosines is None
        and set(out.loss_terms) == {"student_classification"}
    )
    weights = F.normalize(model.student_classifiers["food"], dim=-1)
    expected = F.cross_entropy(16 * out.student_embeds @ weights.T, labels)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.student_embeds.norm(dim=-1), torch.ones(3))
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(p) for p in [*model.student_head.parameters(), *model.student_classifiers.values()]}
    assert not head & {id(p) for p in model.backbone_parameters()}
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(1, 3, 32, 32), domain=2)


@pytest.mark.parametrize("backbone", ["vit", "clip"])
def test_full_model_save_and_from_pretrained(backbone, tmp_path):
    torch.manual_seed(0)
    backbone_config = tiny_vit_config() if backbone == "vit" else tiny_clip_config()
    model = UdonModel(
        UdonModelConfig(backbone_config=backbone_config, domains=DOMAINS, distill_to_backbone=False)
    ).eval()
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    expected = model(pixels, domain="cars", labels=labels)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is UdonModel and not loaded.config.distill_to_backbone
    got = loaded(pixels, domain="cars", labels=labels)
    for name in ("loss", "student_embeds", "teacher_embeds", "student_cosines", "teacher_cosines"):
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert {id(p) for p in loaded.backbone_parameters()} == {
        id(p) for p in loaded.backbone.parameters() if p.requires_grad
    }
    if backbone == "vit":  # ViT's tanh pooler is not the feature: frozen so DDP does not wait for its gradients
        assert not loaded.backbone.pooler.dense.weight.requires_grad


def test_export_clip_backbone_round_trip_and_processor(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(tiny_clip_config())
    clip.save_pretrained(tmp_path / "clip")
    model = UdonModel.from_backbone(tmp_path / "clip", UdonModelConfig(domains=DOMAINS, image_mean=[0.5] * 3)).eval()
    torch.testing.assert_close(model.backbone.state_dict(), clip.vision_model.state_dict())
    pixels = torch.randn(3, 3, 32, 32)
    expected = model(pixels, domain="food").student_embeds
    pooled = F.normalize(clip.vision_model(pixel_values=pixels).pooler_output, dim=-1)  # post-layernorm CLS
    torch.testing.assert_close(expected, F.normalize(model.student_head(pooled), dim=-1))

    export = tmp_path / "export"
    model.save_embedding_model(export, image_size=32)
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_udon_embedding.UdonEmbeddingConfig",
        "AutoModel": "modeling_udon_embedding.UdonEmbeddingModel",
    }
    for name in ("configuration_udon_embedding.py", "modeling_udon_embedding.py"):
        imports = [
            line.split()[1]
            for line in (export / name).read_text().splitlines()
            if line.startswith(("import ", "from "))
        ]
        assert set(imports) <= {"dataclasses", "functools", "inspect", "torch", "torch.nn.functional", "transformers", "transformers.utils",
                                "transformers.configuration_utils", ".configuration_udon_embedding"}, imports  # fmt: skip
    embedder = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    assert not any("teacher" in key or "classifier" in key for key in embedder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(embedder(pixels).image_embeds, expected)  # plain positional call
        torch.testing.assert_close(embedder(pixel_values=pixels)[0].norm(dim=-1), torch.ones(3))
    processor = AutoImageProcessor.from_pretrained(export)
    assert processor.size == {"shortest_edge": 32} and processor.crop_size == {"height": 32, "width": 32}
    assert processor.do_center_crop and list(processor.image_mean) == [0.5] * 3
    assert list(processor.image_std) == model.config.image_std
    image = (torch.rand(40, 60, 3) * 255).to(torch.uint8).numpy()
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


def test_export_replaces_the_model_and_keeps_other_files(tmp_path):
    torch.manual_seed(0)
    model = UdonModel(UdonModelConfig(backbone_config=tiny_vit_config(), domains=DOMAINS))
    export = tmp_path / "out"
    (export / "checkpoint-4").mkdir(parents=True)
    (export / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (export / "README.md").write_text("card")
    (export / "model-00001-of-00002.safetensors").write_text("stale shard")
    (export / "config.json").write_text("{}")
    model.save_embedding_model(export, image_size=32)
    names = {path.name for path in export.iterdir()}
    assert {"checkpoint-4", "README.md", "model.safetensors", "config.json", "preprocessor_config.json"} <= names
    assert "model-00001-of-00002.safetensors" not in names
    assert (export / "checkpoint-4" / "trainer_state.json").read_text() == "{}"
    assert json.loads((export / "config.json").read_text())["model_type"] == "hf_distill_udon_embedding"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging / previous folder left


@pytest.mark.parametrize("backbone", ["vit", "clip"])
def test_other_image_sizes_interpolate_the_position_embeddings(backbone, tmp_path):
    """A backbone configured for 32 px (e.g. a 224-px checkpoint) trains and embeds at 48 px: the position
    embeddings are interpolated instead of raising, in the training model and in the exported one."""
    backbone_config = tiny_vit_config() if backbone == "vit" else tiny_clip_config().vision_config
    torch.manual_seed(0)
    model = UdonModel(
        UdonModelConfig(backbone_config=backbone_config, domains=[{"name": "a", "num_classes": 3}])
    ).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(pixels, domain="a").student_embeds
    model.save_embedding_model(tmp_path / "export", image_size=48)
    embedder = AutoModel.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(embedder(pixels).image_embeds, expected)
