import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, ViTModel

from hf_distill import UnicStudentConfig, UnicStudentModel

from ..conftest import tiny_dinov2_config, tiny_vit_config

TEACHERS = [{"name": "a", "summary_dim": 48, "patch_dim": 48}, {"name": "b", "summary_dim": 16, "patch_dim": 24}]


def make_student(**kwargs):
    torch.manual_seed(0)
    return UnicStudentModel(UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=TEACHERS, **kwargs))


def test_heads_predict_every_teacher_on_the_student_grid():
    student = make_student()
    out = student(torch.randn(3, 3, 32, 32))
    assert [p.shape for p in out.cls_predictions] == [(3, 48), (3, 16)]
    assert [p.shape for p in out.patch_predictions] == [(3, 16, 48), (3, 16, 24)]


def test_ladder_widths_and_sum_of_rungs():
    student = make_student()
    rungs = student.cls_heads["a"].rungs
    assert len(rungs) == 2  # one per block
    assert rungs[0][0].out_features == 32 and rungs[1][0].out_features == 128  # d for l < L, 4d for the last
    pixels = torch.randn(2, 3, 32, 32)
    hidden = student.backbone(pixels, output_hidden_states=True)
    expected = rungs[0](hidden.hidden_states[1][:, 0]) + rungs[1](hidden.last_hidden_state[:, 0])
    torch.testing.assert_close(student(pixels).cls_predictions[0], expected)


def test_ladder_off_and_selected_layers():
    assert len(make_student(use_ladder=False).patch_heads["b"].rungs) == 1
    assert make_student(ladder_layers=[1]).config.ladder_block_indices == [1, 2]
    with pytest.raises(ValueError, match="outside the student's blocks"):
        make_student(ladder_layers=[3])


def test_final_layernorm_is_trained():
    student = make_student(use_ladder=False)
    out = student(torch.randn(2, 3, 32, 32))
    (out.cls_predictions[0].sum() + out.patch_predictions[1].sum()).backward()
    assert student.backbone.layernorm.weight.grad is not None
    assert student.backbone.layernorm.weight.grad.abs().sum() > 0


def test_unused_backbone_parameters_are_frozen_and_the_rest_trainable():
    student = make_student()
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.pooler.dense.weight", "backbone.pooler.dense.bias"}
    out = student(torch.randn(2, 3, 32, 32))
    sum(p.sum() for p in out.cls_predictions + out.patch_predictions).backward()
    no_grad = [name for name, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


def test_dinov2_student_and_bad_image_size():
    student = UnicStudentModel(UnicStudentConfig(backbone_config=tiny_dinov2_config(), teachers=TEACHERS))
    assert student(torch.randn(2, 3, 28, 28)).patch_predictions[0].shape == (2, 16, 48)
    with pytest.raises(ValueError, match="not divisible by the student's patch size 7"):
        student(torch.randn(2, 3, 30, 30))


def test_full_student_round_trip_keeps_heads_and_statistics(tmp_path):
    student = make_student(standardization="dune")
    student.cls_standardizers["a"].mean.fill_(3.0)
    student.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, UnicStudentModel) and loaded.config.standardization == "dune"
    assert torch.equal(loaded.cls_standardizers["a"].mean, torch.full((48,), 3.0))
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixels).patch_predictions[1], student(pixels).patch_predictions[1])


def test_export_is_a_stock_transformers_model(tmp_path):
    student = make_student().eval()
    student.save_encoder(tmp_path, image_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is ViTModel
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(pixels).last_hidden_state, student(pixels).last_hidden_state)
    # loads without hf_distill: a fresh interpreter that cannot import it
    code = (
        "import sys; sys.modules['hf_distill'] = None\n"
        "from transformers import AutoModel, AutoImageProcessor\n"
        f"m = AutoModel.from_pretrained({str(tmp_path)!r}); p = AutoImageProcessor.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__, p.size)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().startswith("ViTModel")
