"""ONNX export of every student hf_distill exports, run through onnxruntime against the PyTorch model."""

import os

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    ConvNextConfig,
    SwinConfig,
    ViTForImageClassification,
)

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.commands import main as hf_distill_main
from hf_distill.models import UdonModel, UdonModelConfig
from hf_distill.onnx_export import export_onnx

from .conftest import save_with_processor, tiny_vit_config

ort = pytest.importorskip("onnxruntime")


def onnx_outputs(path: str, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """All outputs of the ONNX model at `path`, by name, run with onnxruntime (independently of the exporter)."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"pixel_values": pixels.numpy()})))


def assert_matches(path: str, model: torch.nn.Module, pixels: torch.Tensor, names: list[str]) -> None:
    got = onnx_outputs(path, pixels)
    assert sorted(got) == sorted(names)
    with torch.no_grad():
        expected = model.eval()(pixel_values=pixels)
    for name in names:
        np.testing.assert_allclose(got[name], expected[name].numpy(), rtol=0, atol=1e-4, err_msg=name)


ENCODERS = {
    "vit": tiny_vit_config,
    "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "swin": lambda: SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4
    ),
}


@pytest.mark.parametrize("backbone", sorted(ENCODERS))
def test_unic_encoder_exports_to_onnx(tmp_path, backbone):
    torch.manual_seed(0)
    backbone_config = ENCODERS[backbone]()
    teachers = [{"name": "t", "summary_dim": 16, "patch_dim": 16}]
    UnicStudentModel(UnicStudentConfig(backbone_config=backbone_config, teachers=teachers)).save_encoder(
        tmp_path, image_size=32
    )
    result = export_onnx(str(tmp_path))
    assert result.path == os.path.join(tmp_path, "onnx", "model.onnx") and result.image_size == 32
    assert result.output_names == ["last_hidden_state", "pooler_output"]
    assert max(result.max_abs_diff.values()) <= 1e-4
    assert_matches(result.path, AutoModel.from_pretrained(tmp_path), torch.randn(5, 3, 32, 32), result.output_names)


def test_task_classifier_exports_to_onnx_through_the_command(tmp_path, capsys):
    torch.manual_seed(0)
    classifier = ViTForImageClassification(tiny_vit_config(num_labels=3))
    save_with_processor(classifier, tmp_path / "classifier", [0.5] * 3, [0.5] * 3, 32)
    hf_distill_main(["export-onnx", str(tmp_path / "classifier"), "--output_dir", str(tmp_path / "onnx")])
    assert "max |ONNX - PyTorch|: logits" in capsys.readouterr().out
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "classifier")
    assert_matches(str(tmp_path / "onnx" / "model.onnx"), model, torch.randn(4, 3, 32, 32), ["logits"])


def test_udon_embedding_model_exports_to_onnx_only_when_its_code_is_trusted(tmp_path):
    torch.manual_seed(0)
    domains = [{"name": "cars", "num_classes": 3}, {"name": "food", "num_classes": 5}]
    udon = UdonModel(UdonModelConfig(backbone_config=tiny_vit_config(), domains=domains))
    udon.save_embedding_model(tmp_path / "udon", image_size=32)
    with pytest.raises(ValueError, match="ships its own code .*--trust_remote_code"):
        export_onnx(str(tmp_path / "udon"))
    assert not (tmp_path / "udon" / "onnx").exists()
    result = export_onnx(str(tmp_path / "udon"), trust_remote_code=True)
    assert result.output_names == ["image_embeds", "backbone_features"]
    model = AutoModel.from_pretrained(tmp_path / "udon", trust_remote_code=True)
    assert_matches(result.path, model, torch.randn(3, 3, 32, 32), result.output_names)


def test_a_mismatch_above_the_tolerance_writes_nothing(tmp_path, exported_student_dir):
    with pytest.raises(
        ValueError, match="differs from PyTorch by more than atol -1.0 .*max.output.*nothing was written"
    ):
        export_onnx(exported_student_dir, output_dir=str(tmp_path / "onnx"), atol=-1.0, rtol=0.0)
    assert not (tmp_path / "onnx").exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
