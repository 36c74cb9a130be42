"""recipes/evaluate.py on every export hf_distill makes: a UNIC encoder (stock ViTModel), a UDON embedding model (its
own code: needs --trust_remote_code) and a task_distill image classifier (stock ViTForImageClassification)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModel, CLIPImageProcessorPil, ViTForImageClassification

from hf_distill.evaluation import extract_features, load_encoder
from hf_distill.models import UdonModel, UdonModelConfig

from ..conftest import load_recipe, tiny_vit_config

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("evaluate")
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, exported_student_dir):
    """The three export kinds, built as the recipes build them (random tiny weights)."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    udon = UdonModel(
        UdonModelConfig(backbone_config=tiny_vit_config(), domains=[{"name": "a", "num_classes": 3}], image_mean=MEAN,
                   image_std=STD)
    )  # fmt: skip
    udon.save_embedding_model(root / "udon", image_size=32)  # what recipes/udon.py exports
    classifier = ViTForImageClassification(tiny_vit_config(num_labels=10))
    classifier.save_pretrained(root / "classifier")  # what recipes/task_distill.py exports
    CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(root / "classifier")
    return {"unic": exported_student_dir, "udon": str(root / "udon"), "classifier": str(root / "classifier")}


def pixels(images, mean, std) -> torch.Tensor:
    """32 px RGB images -> normalized float tensor, by hand."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images])
    array = (array - np.array(mean)) / np.array(std)
    return torch.from_numpy(array.transpose(0, 3, 1, 2)).float()


def test_a_udon_export_needs_trust_remote_code_and_fails_before_any_work(
    exports, mnist_splits_dir, tmp_path, monkeypatch
):
    calls = []
    monkeypatch.setattr(recipe, "evaluate_encoder", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(
        ValueError, match=r"its own Python code \(modeling_udon_embedding.UdonEmbeddingModel.*--trust_remote_code"
    ):
        recipe.main(
            ["--models", exports["unic"], exports["udon"], "--dataset", f"mnist={mnist_splits_dir}",
             "--output_dir", str(tmp_path / "eval")]
        )  # fmt: skip
    assert calls == [] and not (tmp_path / "eval").exists()  # the UNIC encoder listed first was not evaluated


def test_every_export_kind_evaluates(exports, mnist_splits_dir, tmp_path):
    config = tmp_path / "suite.yaml"  # k-NN only: the linear probe's fit is slow on CPU and not what is tested here
    config.write_text(f"datasets:\n  - {{name: mnist, path: {mnist_splits_dir}, protocols: [knn]}}\n")
    results = recipe.main(
        [
            "--models", exports["unic"], exports["udon"], exports["classifier"], "--trust_remote_code",
            "--model_names", "unic", "udon", "classifier", "--config", str(config), "--knn_k", "5",
            "--output_dir", str(tmp_path / "eval"), "--cache_dir", str(tmp_path / "cache"),
        ]
    )  # fmt: skip
    assert set(results) == {"unic", "udon", "classifier"}
    for values in results.values():
        assert set(values) == {"mnist/knn_top1@5"}
        assert all(0.0 <= value <= 100.0 for value in values.values())
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 6  # 3 models x (train, test)


def test_features_of_each_export_kind(exports, mnist_splits_dir):
    """UDON: the 64-d `image_embeds`; classifier: the CLS token its head reads; UNIC: the CLS token. Expected values
    from the models run by hand on pixels normalized by hand."""
    test = load_from_disk(mnist_splits_dir)["test"].select(range(8))
    options = dict(label_column="label", batch_size=4, device="cpu")

    udon = extract_features(exports["udon"], test, trust_remote_code=True, **options)
    model = AutoModel.from_pretrained(exports["udon"], trust_remote_code=True).eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels(test["image"], MEAN, STD)).image_embeds
    assert udon.features.shape == (8, 64) and udon.image_size == 32
    torch.testing.assert_close(udon.features, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(udon.features.norm(dim=-1), torch.ones(8))
    # a model object works the same way, without the flag (nothing is loaded)
    from_object = extract_features(model, test, **options).features
    torch.testing.assert_close(from_object, expected, rtol=1e-4, atol=1e-5)

    classifier = ViTForImageClassification.from_pretrained(exports["classifier"]).eval()
    with torch.no_grad():
        expected = classifier.vit(pixels(test["image"], MEAN, STD)).last_hidden_state[:, 0]
    features = extract_features(exports["classifier"], test, **options).features
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(extract_features(classifier, test, **options).features, expected, rtol=1e-4, atol=1e-5)

    encoder = AutoModel.from_pretrained(exports["unic"]).eval()
    with torch.no_grad():
        expected = encoder(pixels(test["image"], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).last_hidden_state
    features = extract_features(exports["unic"], test, **options).features
    torch.testing.assert_close(features, expected[:, 0], rtol=1e-4, atol=1e-5)


def test_dense_protocols_on_an_embedding_model_fail_before_any_work(exports, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(recipe, "evaluate_encoder", lambda *args, **kwargs: calls.append(args))
    config = tmp_path / "suite.yaml"
    config.write_text(
        "datasets:\n  - {name: seg, path: somewhere, protocols: [segmentation], mask_column: m, num_classes: 2}\n"
    )
    with pytest.raises(ValueError, match="no patch tokens.*segmentation"):
        recipe.main(["--models", exports["unic"], exports["udon"], "--trust_remote_code", "--config", str(config)])
    assert calls == []
    with pytest.raises(ValueError, match="no patch tokens"):
        extract_features(exports["udon"], None, return_patch_tokens=True, trust_remote_code=True)
    with pytest.raises(ValueError, match="--trust_remote_code"):
        load_encoder(exports["udon"])
