"""int8 / bf16 teachers and the fidelity guard that compares them with float32 before training."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from hf_distill.models import TeacherConfig, TeacherModel, freeze_teacher, load_teacher
from hf_distill.models.fingerprint import module_weights_fingerprint
from hf_distill.models.teacher_quantization import (
    TeacherFidelity,
    cheaper_teacher,
    check_fidelity,
    measure_fidelity,
    quantize_teacher,
)
from hf_distill.trainers import UnicConfig

from ..conftest import tiny_vit_config
from ..recipes.test_unic import recipe as unic
from ..recipes.test_unic import recipe_args as unic_args
from ..trainers.test_unic_trainer import build

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return freeze_teacher(TeacherModel(TeacherConfig(backbone_config=tiny_vit_config())))


def pixels(n=8, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def numpy_fidelity(reference, candidate) -> tuple[float, float]:
    """Mean cosine per vector and Frobenius relative error, in float64 numpy."""
    a, b = reference.double().numpy(), candidate.double().numpy()
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cosine.mean()), float(np.linalg.norm(b - a) / np.linalg.norm(a))


def test_int8_teacher_quantizes_every_linear_and_stays_close_to_float32(teacher):
    quantized = quantize_teacher(teacher)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()) == 2 * 6 + 1
    assert any(isinstance(m, nn.Linear) for m in teacher.modules())  # the original is left in float32
    with torch.inference_mode():
        expected = teacher(pixels(), MEAN, STD, grid_size=(4, 4))
        got = quantized(pixels(), MEAN, STD, grid_size=(4, 4))
    for reference, candidate in ((expected.summary, got.summary), (expected.patch_tokens, got.patch_tokens)):
        assert not torch.equal(reference, candidate)  # it really computes differently
        cosine, error = numpy_fidelity(reference, candidate)
        assert cosine > 0.995 and error < 0.06, (cosine, error)


def test_measure_fidelity_matches_an_independent_computation(teacher):
    candidate = cheaper_teacher(teacher, torch.bfloat16)
    fidelity = measure_fidelity(teacher, candidate, pixels(), MEAN, STD, (4, 4))
    with torch.inference_mode():
        expected = teacher(pixels(), MEAN, STD, grid_size=(4, 4))
        got = candidate(pixels(), MEAN, STD, grid_size=(4, 4))
    summary = numpy_fidelity(expected.summary, got.summary)
    patch = numpy_fidelity(expected.patch_tokens, got.patch_tokens)
    assert (fidelity.summary_cosine, fidelity.summary_error) == pytest.approx(summary, rel=1e-9)
    assert (fidelity.patch_cosine, fidelity.patch_error) == pytest.approx(patch, rel=1e-9)
    assert 0 < fidelity.max_error < 0.05


def test_fidelity_leaves_out_images_the_float32_teacher_is_not_finite_on(teacher, caplog):
    batch = pixels()
    batch[1] = float("nan")  # the float32 teacher gives NaN on image 1 only: the non-finite guard's case
    candidate = cheaper_teacher(teacher, torch.bfloat16)
    fidelity = measure_fidelity(teacher, candidate, batch, MEAN, STD, (4, 4))
    keep = [i for i in range(batch.shape[0]) if i != 1]
    with torch.inference_mode():
        expected = teacher(batch[keep], MEAN, STD, grid_size=(4, 4))
        got = candidate(batch[keep], MEAN, STD, grid_size=(4, 4))
    assert (fidelity.summary_cosine, fidelity.summary_error) == pytest.approx(
        numpy_fidelity(expected.summary, got.summary), rel=1e-6
    )
    batch[:] = float("nan")  # finite on no image: nothing to compare, accepted with a warning
    assert measure_fidelity(teacher, candidate, batch, MEAN, STD, (4, 4)) is None
    check_fidelity("vit", None, 0.15, "bfloat16")
    assert "not finite on any calibration image" in caplog.text


def test_guard_refuses_a_broken_teacher_and_accepts_a_good_one(teacher, caplog):
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in broken.parameters():
            parameter.add_(0.5 * parameter.std() * torch.randn_like(parameter))
    bad = measure_fidelity(teacher, broken, pixels(), MEAN, STD, (4, 4))
    with pytest.raises(ValueError, match="teacher_fidelity_max_error"):
        check_fidelity("t", bad, max_error=0.15, what="int8")
    good = measure_fidelity(teacher, quantize_teacher(teacher), pixels(), MEAN, STD, (4, 4))
    with caplog.at_level(logging.INFO, logger="hf_distill.models.teacher_quantization"):
        check_fidelity("t", good, max_error=0.15, what="int8")
    assert "'t' in int8 vs float32" in caplog.text
    with pytest.raises(ValueError, match="too far"):  # NaN outputs never pass
        check_fidelity("t", TeacherFidelity(float("nan"), 1.0, float("nan"), 0.0), max_error=0.15, what="int8")


def test_quantization_needs_float32_cpu_teachers_with_linear_layers(teacher):
    with pytest.raises(ValueError, match="float32"):
        quantize_teacher(copy.deepcopy(teacher).to(torch.bfloat16))
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_teacher(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="teacher_dtype"):
        cheaper_teacher(teacher, torch.bfloat16, "int8")
    with pytest.raises(ValueError, match="--teacher_dtype float32 or auto"):
        UnicConfig(output_dir="unused", use_cpu=True, teacher_quantization="int8", teacher_dtype="bfloat16")
    with pytest.raises(ValueError, match="--teacher_quantization must be one of"):
        UnicConfig(output_dir="unused", use_cpu=True, teacher_quantization="int4")


def test_trainer_quantizes_teachers_after_the_check_and_refuses_a_broken_one(
    tiny_teachers, image_dataset_dir, tmp_path, monkeypatch, caplog
):
    with caplog.at_level(logging.INFO, logger="hf_distill.models.teacher_quantization"):
        trainer = build(tiny_teachers, image_dataset_dir, tmp_path, teacher_quantization="int8", max_steps=1)
    for teacher in trainer.teachers:
        assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in teacher.modules())
        assert not any(isinstance(m, nn.Linear) for m in teacher.modules())
    assert caplog.text.count("in int8 vs float32 on the calibration batch") == 2
    trainer.train()  # the int8 teachers run in the training step
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])

    def perturbed(teacher, dtype, quantization="none"):
        broken = copy.deepcopy(teacher)
        with torch.no_grad():
            for parameter in broken.parameters():
                parameter.mul_(-1.0)
        return broken

    monkeypatch.setattr("hf_distill.models.teacher_quantization.cheaper_teacher", perturbed)
    with pytest.raises(ValueError, match="too far from its float32 outputs"):
        build(tiny_teachers, image_dataset_dir, tmp_path / "broken", teacher_quantization="int8", max_steps=1)


def test_int8_teacher_runs_inside_a_bf16_autocast_step(teacher):
    quantized = quantize_teacher(teacher)
    with torch.inference_mode():
        expected = quantized(pixels(), MEAN, STD, grid_size=(4, 4))
        with torch.autocast("cpu", torch.bfloat16):
            got = quantized(pixels(), MEAN, STD, grid_size=(4, 4))
            assert torch.is_autocast_enabled("cpu")  # restored after the teacher
    assert torch.equal(got.summary, expected.summary) and got.summary.dtype == torch.float32


def test_weights_fingerprint_of_an_int8_teacher_is_stable_and_differs_from_float32(teacher):
    quantized = quantize_teacher(teacher)
    assert module_weights_fingerprint(quantized) == module_weights_fingerprint(quantize_teacher(teacher))
    assert module_weights_fingerprint(quantized) != module_weights_fingerprint(teacher)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        next(m for m in other.modules() if isinstance(m, nn.Linear)).weight[0, 0] += 1.0
    assert module_weights_fingerprint(quantize_teacher(other)) != module_weights_fingerprint(quantized)


@pytest.mark.parametrize("option", [["--teacher_quantization", "int8"], ["--teacher_dtype", "bfloat16"]])
def test_teachers_that_build_a_cache_are_the_cheaper_checked_ones(
    option, tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, caplog
):
    """`--teacher_cache` with int8 / bf16 teachers: the cache is built by the cheaper teachers (its key records them),
    after the same fidelity check as online training, which refuses them before anything is built."""
    cache = tmp_path / "cache"
    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out", "--teacher_cache",
                     str(cache), "--max_steps", "1", "--save_steps", "1", *option)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="hf_distill.models.teacher_quantization"):
        unic.main(args)
    form = option[1]
    assert caplog.text.count(f"in {form} vs float32 on the calibration batch") == 2
    teachers = json.loads((cache / "cache.json").read_text())["content"]["teachers"]
    if form == "int8":  # every Linear quantized: the fingerprint is that of the int8 teacher
        expected = module_weights_fingerprint(quantize_teacher(load_teacher(tiny_teachers["vit"])))
        assert teachers[0]["weights"] == expected
    else:
        assert [t["dtype"] for t in teachers] == ["bfloat16", "bfloat16"]
    refused = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "refused", "--teacher_cache",
                        str(tmp_path / "refused-cache"), "--teacher_fidelity_max_error", "1e-12", *option)  # fmt: skip
    with pytest.raises(ValueError, match="too far from its float32 outputs"):
        unic.main(refused)
    assert not (tmp_path / "refused-cache").exists() or not any((tmp_path / "refused-cache").glob("*.safetensors"))
