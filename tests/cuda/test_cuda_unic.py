"""UNIC on a CUDA GPU (marker `cuda`, skipped without one; `make gpu-check` runs them): bf16 autocast against fp32,
standardization and bf16 teachers on the device, and a training step without host syncs.

`HF_DISTILL_TEST_DEVICE=cpu` runs them on CPU instead (the dry run of `make gpu-check DEVICE=cpu`)."""

import os

import numpy as np
import pytest
import torch

from hf_distill.models.standardization import FeatureStandardizer, global_moments
from hf_distill.models.teacher_loading import teacher_outputs

from ..unic_steps import IMAGE, MEAN, STD, build_student, build_teachers, unic_step

DEVICE = torch.device(os.environ.get("HF_DISTILL_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (HF_DISTILL_TEST_DEVICE=cpu runs these tests on CPU)",
    ),
]


def pixels(batch: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, IMAGE, IMAGE, generator=generator)
    return ((images - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)).to(DEVICE)


def gradients(student) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])


def test_bf16_autocast_step_matches_fp32():
    teachers = [teacher.to(DEVICE) for teacher in build_teachers()]
    student = build_student(teachers).to(DEVICE)
    batch = pixels()
    loss = unic_step(student, teachers, batch)
    loss.backward()
    reference = gradients(student)
    student.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss_bf16 = unic_step(student, teachers, batch)
    loss_bf16.backward()
    grads = gradients(student)
    assert loss_bf16.dtype == torch.float32  # the loss is computed in fp32 from bf16 predictions
    torch.testing.assert_close(loss_bf16, loss, rtol=2e-2, atol=0)
    cosine = torch.nn.functional.cosine_similarity(grads, reference, dim=0)
    assert cosine > 0.99, f"gradient cosine bf16 vs fp32: {cosine:.4f}"
    assert (grads.norm() / reference.norm() - 1).abs() < 0.05


def test_standardization_on_the_device_matches_float64():
    """Features with a large offset and a small spread (as in ViT teachers), statistics against float64 numpy."""
    generator = torch.Generator().manual_seed(0)
    features = 300.0 + 0.01 * torch.randn(64, 49, 96, generator=generator)
    valid = torch.ones(64, dtype=torch.bool)
    valid[::7] = False
    mean, std = global_moments(features.to(DEVICE), valid.to(DEVICE))
    rows = features.double().numpy()[valid.numpy()].reshape(-1, 96)
    np.testing.assert_allclose(mean.cpu().numpy(), rows.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.cpu().numpy(), rows.std(0, ddof=1), rtol=2e-3)
    standardizer = FeatureStandardizer(96, mode="dune").to(DEVICE)
    out = standardizer(features.to(DEVICE), ema_weight=1.0, valid=valid.to(DEVICE))
    expected = (features.double().numpy() - rows.mean(0)) / rows.std(0, ddof=1)
    np.testing.assert_allclose(out.cpu().numpy()[valid.numpy()], expected[valid.numpy()], atol=5e-3)
    assert (out[~valid.to(DEVICE)] == 0).all()


def test_bf16_teachers_on_the_device_match_fp32():
    batch = pixels()
    mean, std = MEAN.to(DEVICE), STD.to(DEVICE)
    full = teacher_outputs([t.to(DEVICE) for t in build_teachers()], batch, mean, std, (4, 4))
    half = teacher_outputs([t.to(DEVICE, torch.bfloat16) for t in build_teachers()], batch, mean, std, (4, 4))
    for (summary, patch), (summary_bf16, patch_bf16) in zip(full, half):
        assert summary_bf16.dtype == patch_bf16.dtype == torch.float32  # outputs come back in fp32
        for a, b in ((summary, summary_bf16), (patch, patch_bf16)):
            cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
            assert cosine.min() > 0.98, cosine.min()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host syncs are a CUDA notion")
def test_training_step_has_no_host_sync():
    """A full step (teachers, standardization, student, UNIC loss with teacher dropping, backward, AdamW) under
    `torch.cuda.set_sync_debug_mode("error")` after a warm-up step: any `.item()` / `bool(tensor)` / sync raises."""
    teachers = [teacher.to(DEVICE) for teacher in build_teachers()]
    student = build_student(teachers, standardization="unic").to(DEVICE)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    batches = [pixels(seed=seed) for seed in range(3)]
    normalization = (MEAN.to(DEVICE), STD.to(DEVICE))  # once, as the trainer does

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = unic_step(student, teachers, batch, drop_prob=0.5, generator=generator, normalization=normalization)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step(batches[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(batch) for batch in batches[1:]]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(torch.stack(losses)).all()
