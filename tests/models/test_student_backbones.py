"""Pretrained students (position embeddings resized at load) and feature-map students (ConvNeXt, ResNet, Swin)."""

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    ConvNextModel,
    Dinov2Model,
    ResNetModel,
    SwinModel,
    ViTModel,
)

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.losses.unic import distillation_loss
from hf_distill.models import load_teacher
from hf_distill.models.student_backbones import (
    check_student_backbone_config,
    load_pretrained_backbone,
    resize_position_embeddings,
)

from ..conftest import (
    tiny_convnext_config,
    tiny_dinov2_config,
    tiny_resnet_config,
    tiny_swin_config,
    tiny_vit_config,
)

TEACHERS = [{"name": "a", "summary_dim": 12, "patch_dim": 12}, {"name": "b", "summary_dim": 20, "patch_dim": 20}]


def cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for a fractional position `t`."""

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return np.array([kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)])


def bicubic_numpy(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float64 bicubic resampling of `[h, w, D]` to `size`: half-pixel centres, edge samples repeated."""

    def matrix(old: int, new: int) -> np.ndarray:
        weights = np.zeros((new, old))
        for i in range(new):
            source = (i + 0.5) * old / new - 0.5
            base = int(np.floor(source))
            for tap, weight in zip(range(base - 1, base + 3), cubic_weights(source - base)):
                weights[i, min(max(tap, 0), old - 1)] += weight
        return weights

    rows, cols = matrix(grid.shape[0], size[0]), matrix(grid.shape[1], size[1])
    return np.einsum("ih,jw,hwd->ijd", rows, cols, grid)


@pytest.mark.parametrize(("old", "new", "prefix"), [((4, 4), (6, 5), 1), ((5, 5), (3, 3), 2), ((3, 3), (3, 3), 1)])
def test_resize_position_embeddings_is_bicubic_and_keeps_the_prefix(old, new, prefix):
    torch.manual_seed(0)
    embeddings = torch.randn(1, prefix + old[0] * old[1], 8)
    resized = resize_position_embeddings(embeddings, old, new)
    assert resized.shape == (1, prefix + new[0] * new[1], 8)
    torch.testing.assert_close(resized[:, :prefix], embeddings[:, :prefix], rtol=0, atol=0)
    expected = bicubic_numpy(embeddings[0, prefix:].double().reshape(*old, 8).numpy(), new).reshape(-1, 8)
    np.testing.assert_allclose(resized[0, prefix:].numpy(), expected, rtol=0, atol=1e-5)
    # an nn.Embedding weight [P + N, D] (CLIP) is resized the same way
    torch.testing.assert_close(resize_position_embeddings(embeddings[0], old, new), resized[0])


@pytest.mark.parametrize(
    ("model_class", "config", "image_size"),
    [
        (ViTModel, tiny_vit_config(image_size=32, patch_size=8), 48),
        (Dinov2Model, tiny_dinov2_config(), 42),
        (SwinModel, tiny_swin_config(use_absolute_embeddings=True), 48),  # absolute embeddings, no prefix
    ],
)
def test_pretrained_student_runs_at_the_new_size_and_exports_without_flags(tmp_path, model_class, config, image_size):
    torch.manual_seed(0)
    pretrained = model_class(config).eval()
    pretrained.save_pretrained(tmp_path / "pretrained")
    backbone_config, state_dict = load_pretrained_backbone(str(tmp_path / "pretrained"), image_size)
    assert backbone_config.image_size == image_size and config.image_size != image_size
    student = UnicStudentModel(UnicStudentConfig(backbone_config=backbone_config, teachers=TEACHERS)).eval()
    student.backbone.load_state_dict(state_dict)

    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        training_tokens = student.ladder_features(pixels)[0]
        # transformers' own run-time interpolation of the original weights gives the same tokens
        kwargs = {} if model_class is Dinov2Model else {"interpolate_pos_encoding": True}  # DINOv2 always does
        reference = pretrained(pixel_values=pixels, **kwargs).last_hidden_state
    torch.testing.assert_close(training_tokens, reference, rtol=1e-4, atol=1e-5)

    student.save_encoder(tmp_path / "export", image_size=image_size)
    exported = AutoModel.from_pretrained(tmp_path / "export").eval()
    assert type(exported) is model_class and exported.config.image_size == image_size
    with torch.no_grad():
        torch.testing.assert_close(exported(pixel_values=pixels).last_hidden_state, training_tokens)


def test_pretrained_student_that_does_not_fit_is_refused(tmp_path):
    ViTModel(tiny_vit_config()).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="--image_size 30 is not divisible by the student's patch size 8"):
        load_pretrained_backbone(str(tmp_path / "vit"), 30)
    with pytest.raises(ValueError, match="Could not load the student model"):
        load_pretrained_backbone(str(tmp_path / "missing"), 32)


FEATURE_MAP_STUDENTS = {
    "convnext": (tiny_convnext_config, ConvNextModel, 16, [8, 16, 32]),  # stride 4 * 2 * 2
    "resnet": (tiny_resnet_config, ResNetModel, 16, [8, 16, 32]),
    "swin": (tiny_swin_config, SwinModel, 8, [8, 16, 32]),  # stride 2 * 2 * 2, widths before patch merging
}


@pytest.mark.parametrize("family", sorted(FEATURE_MAP_STUDENTS))
def test_feature_map_student_tokens_ladder_and_export(tmp_path, family):
    make_config, model_class, stride, widths = FEATURE_MAP_STUDENTS[family]
    torch.manual_seed(0)
    student = UnicStudentModel(UnicStudentConfig(backbone_config=make_config(), teachers=TEACHERS)).eval()
    assert student.config.patch_size == stride and student.config.ladder_block_indices == [1, 2, 3]
    assert [rung[0].in_features for rung in student.cls_heads["b"].rungs] == widths  # one rung per stage
    pixels = torch.randn(2, 3, 32, 32)
    grid = 32 // stride
    with torch.no_grad():
        tokens, cls_features, patch_features = student.ladder_features(pixels)
        outputs = student(pixels)
        reference = student.backbone(pixel_values=pixels, output_hidden_states=True)
    assert tokens.shape == (2, grid * grid, 32)
    assert [p.shape for p in outputs.patch_predictions] == [(2, grid * grid, 12), (2, grid * grid, 20)]

    # the export is the stock model and gives the features the heads were trained on
    student.save_encoder(tmp_path / "export", image_size=32)
    exported = AutoModel.from_pretrained(tmp_path / "export").eval()
    assert type(exported) is model_class
    with torch.no_grad():
        out = exported(pixel_values=pixels)
    last = out.last_hidden_state.numpy()
    if last.ndim == 4:  # [B, C, h, w] -> row-major tokens [B, h * w, C]
        last = last.reshape(2, 32, grid * grid).transpose(0, 2, 1)
    np.testing.assert_allclose(tokens.numpy(), last, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cls_features[-1].numpy(), out.pooler_output.reshape(2, -1).numpy(), rtol=0, atol=1e-6)
    # the export is also a teacher / an encoder to evaluate (recipes/evaluate.py): the same summary and patch tokens
    teacher = load_teacher(str(tmp_path / "export"))
    assert (teacher.config.summary, teacher.patch_size, teacher.hidden_size) == ("pooler", stride, 32)
    with torch.no_grad():
        teacher_output = teacher(pixels)
    torch.testing.assert_close(teacher_output.summary, cls_features[-1])
    torch.testing.assert_close(teacher_output.patch_tokens, tokens)

    if family != "swin":  # an earlier stage's map, average-pooled to the final grid by hand (numpy)
        stage = reference.hidden_states[1].numpy()  # stage 1: [B, 8, 4 * grid, 4 * grid] for a /4 stage
        factor = stage.shape[-1] // grid
        pooled = stage.reshape(2, 8, grid, factor, grid, factor).mean(axis=(3, 5)).reshape(2, 8, -1)
        np.testing.assert_allclose(patch_features[0].numpy(), pooled.transpose(0, 2, 1), rtol=0, atol=1e-6)
        np.testing.assert_allclose(cls_features[0].numpy(), stage.mean(axis=(2, 3)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_feature_map_student_learns_fixed_targets(family):
    make_config = FEATURE_MAP_STUDENTS[family][0]
    torch.manual_seed(0)
    student = UnicStudentModel(UnicStudentConfig(backbone_config=make_config(), teachers=TEACHERS)).train()
    pixels = torch.randn(4, 3, 32, 32)
    targets = [(torch.randn(4, dim), torch.randn(4, 4, dim)) for dim in (12, 20)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        outputs = student(pixels)
        loss = distillation_loss(outputs.cls_predictions, outputs.patch_predictions, targets, drop_prob=0.0)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_feature_map_student_needs_an_image_size_its_stride_divides():
    with pytest.raises(ValueError, match="--image_size 40 is not divisible by the student's total stride 16"):
        check_student_backbone_config(tiny_convnext_config(), 40, "convnext")


def test_grouped_heads_match_per_teacher_heads_with_one_width_per_stage():
    torch.manual_seed(0)
    per_teacher = UnicStudentModel(
        UnicStudentConfig(backbone_config=tiny_convnext_config(), teachers=TEACHERS, grouped_heads=False)
    ).eval()
    grouped = UnicStudentModel(
        UnicStudentConfig(backbone_config=tiny_convnext_config(), teachers=TEACHERS, grouped_heads=True)
    )
    grouped.load_state_dict(per_teacher.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = per_teacher(pixels), grouped.eval()(pixels)
    for name in ("cls_predictions", "patch_predictions"):
        for a, b in zip(expected[name], got[name]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
