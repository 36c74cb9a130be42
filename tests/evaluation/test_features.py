import pytest
import torch
from datasets import load_from_disk
from transformers import ViTModel

from hf_distill.evaluation import features as features_module
from hf_distill.evaluation.features import encoder_fingerprint, extract_features, load_encoder


def test_features_match_a_manual_forward(tiny_teachers, image_dataset_dir):
    dataset = load_from_disk(image_dataset_dir).select(range(10))
    result = extract_features(
        tiny_teachers["vit"], dataset, label_column="label", batch_size=4, return_patch_tokens=True
    )
    assert result.features.shape == (10, 32) and result.labels.tolist() == dataset["label"]
    assert result.patch_tokens.shape == (10, 4, 4, 32)  # processor size 16 px, patch 4
    model = ViTModel.from_pretrained(tiny_teachers["vit"]).eval()
    image = torch.tensor(list(dataset[3]["image"].convert("RGB").resize((16, 16)).getdata()), dtype=torch.float32)
    pixels = (image.view(16, 16, 3).permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        expected = model(pixels, interpolate_pos_encoding=True).last_hidden_state[0, 0]
    torch.testing.assert_close(result.features[3], expected, rtol=1e-4, atol=1e-4)


def test_pooling_options(tiny_teachers, image_dataset_dir):
    dataset = load_from_disk(image_dataset_dir).select(range(4))
    cls = extract_features(tiny_teachers["vit"], dataset, pooling="cls", return_patch_tokens=True)
    mean = extract_features(tiny_teachers["vit"], dataset, pooling="mean_patch")
    torch.testing.assert_close(mean.features, cls.patch_tokens.mean(dim=(1, 2)), rtol=1e-4, atol=1e-4)
    pooler = extract_features(tiny_teachers["clip"], dataset, pooling="pooler")
    assert pooler.features.shape == (4, 32)


def test_cache_is_reused_and_keyed_by_weights(tiny_teachers, image_dataset_dir, tmp_path, monkeypatch):
    dataset = load_from_disk(image_dataset_dir).select(range(6))
    model = ViTModel.from_pretrained(tiny_teachers["vit"])
    first = extract_features(model, dataset, label_column="label", image_size=16, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_loader(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(features_module, "DataLoader", no_loader)
    second = extract_features(model, dataset, label_column="label", image_size=16, cache_dir=str(tmp_path))
    assert torch.equal(first.features, second.features) and torch.equal(first.labels, second.labels)
    # other weights -> another key -> computed again (and here: the loader is refused)
    with torch.no_grad():
        model.layernorm.weight.add_(1.0)
    with pytest.raises(AssertionError, match="recomputed"):
        extract_features(model, dataset, label_column="label", image_size=16, cache_dir=str(tmp_path))


def test_fingerprint_depends_on_weights_not_on_the_object(tiny_teachers):
    a, _ = load_encoder(tiny_teachers["vit"])
    b, _ = load_encoder(ViTModel.from_pretrained(tiny_teachers["vit"]))
    c, _ = load_encoder(tiny_teachers["dinov2"])
    assert encoder_fingerprint(a) == encoder_fingerprint(b) != encoder_fingerprint(c)


def test_missing_column_is_reported(tiny_teachers, image_dataset_dir):
    dataset = load_from_disk(image_dataset_dir)
    with pytest.raises(ValueError, match="no column 'target'"):
        extract_features(tiny_teachers["vit"], dataset, label_column="target")


def test_fingerprint_of_a_module_teacher_with_batchnorm_buffers():
    """0-dim buffers (BatchNorm's num_batches_tracked) are hashed too."""
    from torch import nn

    from hf_distill import ModuleTeacher

    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4))
    teacher = ModuleTeacher(module, patch_size=2)
    first = encoder_fingerprint(teacher)
    with torch.no_grad():
        module[1].running_mean.add_(1.0)
    assert encoder_fingerprint(teacher) != first
