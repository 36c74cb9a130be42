import pytest
import torch
from torch import nn
from transformers import AutoModel, CLIPVisionModel, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTModel

from hf_distill import ModuleTeacher, TeacherConfig, TeacherModel, load_teacher, load_teacher_config
from hf_distill.models import TeacherNotFoundError
from hf_distill.models.modeling_teacher import renormalize_pixels

from ..conftest import TINY, save_with_processor

STUDENT_MEAN = torch.tensor([0.485, 0.456, 0.406])
STUDENT_STD = torch.tensor([0.229, 0.224, 0.225])
STUDENT_GRID = (4, 4)  # a /8 student at 32 px


def student_pixels(batch=2, size=32):
    torch.manual_seed(0)
    raw = torch.rand(batch, 3, size, size)
    return (raw - STUDENT_MEAN.view(1, 3, 1, 1)) / STUDENT_STD.view(1, 3, 1, 1), raw


def test_renormalize_pixels_recovers_the_teacher_normalization():
    pixels, raw = student_pixels()
    to_mean, to_std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    out = renormalize_pixels(pixels, STUDENT_MEAN, STUDENT_STD, to_mean, to_std)
    torch.testing.assert_close(out, (raw - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_config_records_source_summary_normalization_and_alignment(tiny_teachers):
    config = load_teacher_config(tiny_teachers["vit"], grid_alignment="interpolate")
    assert isinstance(config, TeacherConfig)
    assert config.source == tiny_teachers["vit"]
    assert config.summary == "cls" and config.grid_alignment == "interpolate"
    assert config.image_mean == [0.5, 0.5, 0.5] and config.patch_size == 4 and config.hidden_size == 32


def test_resize_alignment_feeds_a_renormalized_resized_image(tiny_teachers):
    teacher = load_teacher(tiny_teachers["vit"])  # /4 teacher, mean/std 0.5
    pixels, raw = student_pixels()
    out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=STUDENT_GRID)
    assert out.summary.shape == (2, 32) and out.patch_tokens.shape == (2, 16, 32)
    # by hand: 4x4 grid of /4 patches = 16 px, normalized with the teacher's 0.5 / 0.5
    expected_input = torch.nn.functional.interpolate(
        (raw - 0.5) / 0.5, size=(16, 16), mode="bicubic", align_corners=False, antialias=True
    )
    reference = ViTModel.from_pretrained(tiny_teachers["vit"]).eval()(expected_input, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.summary, reference.last_hidden_state[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.patch_tokens, reference.last_hidden_state[:, 1:], rtol=1e-4, atol=1e-4)


def test_interpolate_alignment_resamples_teacher_tokens(tiny_teachers):
    teacher = load_teacher(tiny_teachers["dinov2"], grid_alignment="interpolate")  # /7 at 28 px -> 4x4 grid
    pixels, _ = student_pixels()
    native = teacher(pixels, STUDENT_MEAN, STUDENT_STD)
    assert native.patch_tokens.shape == (2, 16, 48)  # 32 px rounded down to 28 -> 4x4
    out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=(2, 2))
    assert out.patch_tokens.shape == (2, 4, 48)
    # row-major token grid [B, h, w, D] resampled as an image of D channels
    grid = native.patch_tokens.view(2, 4, 4, 48).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bilinear", antialias=True)
    torch.testing.assert_close(out.patch_tokens, expected.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    # a constant token grid stays constant
    constant = torch.ones(1, 4, 4, 3)
    from hf_distill.models.modeling_teacher import interpolate_tokens

    torch.testing.assert_close(interpolate_tokens(constant, (3, 5)), torch.ones(1, 15, 3))
    torch.testing.assert_close(out.summary, native.summary)


def test_clip_vision_tower_with_pooler_summary(tiny_teachers):
    teacher = load_teacher(tiny_teachers["clip"], summary="pooler", grid_alignment="interpolate")
    assert isinstance(teacher.backbone, CLIPVisionModel)
    pixels, raw = student_pixels()
    out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=(2, 2))
    mean, std = torch.tensor([0.481, 0.458, 0.408]), torch.tensor([0.269, 0.261, 0.276])
    reference = CLIPVisionModel.from_pretrained(tiny_teachers["clip"]).eval()(
        (raw - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    )
    torch.testing.assert_close(out.summary, reference.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.patch_tokens, reference.last_hidden_state[:, 1:], rtol=1e-4, atol=1e-4)


def test_register_tokens_are_never_patches(tmp_path):
    config = Dinov2WithRegistersConfig(**TINY, image_size=32, patch_size=8, num_register_tokens=4)
    path = save_with_processor(Dinov2WithRegistersModel(config), tmp_path / "reg", [0.5] * 3, [0.5] * 3, 32)
    teacher = load_teacher(path, summary="mean_patch")
    pixels = torch.randn(2, 3, 32, 32)
    out = teacher(pixels, grid_size=(4, 4))
    hidden = teacher.backbone(pixels).last_hidden_state  # 1 CLS + 4 registers + 16 patches
    assert hidden.shape[1] == 21
    torch.testing.assert_close(out.patch_tokens, hidden[:, 5:])
    torch.testing.assert_close(out.summary, hidden[:, 5:].mean(1))


def test_prepared_teacher_round_trip_with_auto_model(tiny_teachers, tmp_path):
    teacher = load_teacher(tiny_teachers["dinov2"], grid_alignment="interpolate", summary="mean_patch")
    teacher.save_pretrained(tmp_path / "prepared")
    loaded = AutoModel.from_pretrained(tmp_path / "prepared")
    assert isinstance(loaded, TeacherModel)
    assert loaded.config.source == tiny_teachers["dinov2"]
    assert (loaded.config.summary, loaded.config.grid_alignment) == ("mean_patch", "interpolate")
    pixels, _ = student_pixels()
    torch.testing.assert_close(
        loaded.eval()(pixels, grid_size=(4, 4)).patch_tokens, teacher(pixels, grid_size=(4, 4)).patch_tokens
    )
    reloaded = load_teacher(str(tmp_path / "prepared"), grid_alignment="resize")
    assert reloaded.config.grid_alignment == "resize" and not reloaded.training


def test_teachers_are_frozen_and_can_run_in_bf16(tiny_teachers):
    teacher = load_teacher(tiny_teachers["vit"], dtype=torch.bfloat16)
    assert not teacher.training
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in teacher.parameters())
    pixels, _ = student_pixels()
    with torch.inference_mode():
        out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=STUDENT_GRID)
    assert out.summary.dtype == torch.float32 and torch.isfinite(out.patch_tokens).all()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 24, 3, stride=2, padding=1)
        )

    def forward(self, x):
        return self.features(x)


def test_module_teacher_reads_a_cnn_feature_map():
    cnn = TinyCNN()
    teacher = ModuleTeacher(cnn, image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=4, name="cnn")
    assert (teacher.summary_dim, teacher.patch_dim) == (24, 24)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    pixels, raw = student_pixels()
    out = teacher(pixels, STUDENT_MEAN, STUDENT_STD, grid_size=STUDENT_GRID)
    feature_map = cnn((raw - 0.5) / 0.5)  # 32 px /4 -> 8x8, interpolated to the 4x4 student grid
    assert out.patch_tokens.shape == (2, 16, 24)
    torch.testing.assert_close(out.summary, feature_map.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_unknown_teacher_fails_with_a_clear_message():
    with pytest.raises(TeacherNotFoundError, match="could not be found.*hf download"):
        load_teacher_config("no-such-org/no-such-teacher")


def test_plain_module_must_be_wrapped():
    with pytest.raises(TypeError, match="ModuleTeacher"):
        load_teacher(TinyCNN())


def tiny_cnn_teacher():
    """A factory for `py:tests.models.test_teachers:tiny_cnn_teacher`."""
    torch.manual_seed(0)
    return ModuleTeacher(TinyCNN(), image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=4, name="cnn")


def test_module_teacher_from_a_factory_spec():
    from hf_distill.models import teacher_name

    spec = "py:tests.models.test_teachers:tiny_cnn_teacher"
    teacher = load_teacher(spec)
    assert isinstance(teacher, ModuleTeacher) and teacher.summary_dim == 24
    assert teacher_name(spec) == "tiny-cnn"
    with pytest.raises(TeacherNotFoundError, match="could not be imported"):
        load_teacher("py:tests.models.test_teachers:no_such_factory")
