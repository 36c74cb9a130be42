import math

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses.unic import teacher_drop_coefficients, teacher_losses, token_loss, unic_loss


def test_token_loss_matches_hand_computation():
    prediction = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 1.0], [3.0, 4.5]])
    # row 0: orthogonal -> cos term 1; |d| = (1, 1) -> smooth L1 = 0.5 each -> mean 0.5
    # row 1: cos = (9 + 18) / (5 * sqrt(9 + 20.25)); d = (0, 0.5) -> smooth L1 = (0 + 0.125) / 2
    cos_1 = 27.0 / (5.0 * math.sqrt(29.25))
    expected = torch.tensor([0.5 * 1.0 + 0.5 * 0.5, 0.5 * (1.0 - cos_1) + 0.5 * 0.0625])
    torch.testing.assert_close(token_loss(prediction, target), expected)


def test_token_loss_is_zero_on_identical_inputs_and_scale_sensitive():
    x = torch.randn(4, 7, 16)
    assert token_loss(x, x).abs().max() < 1e-6
    # cosine alone would not see a rescaling; the smooth-L1 half does
    assert (token_loss(2 * x, x) > 1e-3).all()


def test_teacher_losses_average_patches_then_cls_and_patch():
    torch.manual_seed(0)
    cls_p, cls_t = torch.randn(3, 8), torch.randn(3, 8)
    patch_p, patch_t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    terms = teacher_losses(cls_p, cls_t, patch_p, patch_t)
    manual_patch = torch.stack(
        [torch.stack([token_loss(patch_p[b, n], patch_t[b, n]) for n in range(5)]).mean() for b in range(3)]
    )
    torch.testing.assert_close(terms["patch"], manual_patch)
    torch.testing.assert_close(terms["cls"], token_loss(cls_p, cls_t))
    torch.testing.assert_close(terms["loss"], 0.5 * (terms["cls"] + manual_patch))


def test_teacher_dropping_always_keeps_the_max_loss_teacher():
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(4096, 4, generator=generator)
    coefficients = teacher_drop_coefficients(losses, 0.9, generator)
    rows = torch.arange(losses.shape[0])
    assert (coefficients[rows, losses.argmax(dim=1)] == 1).all()
    assert set(coefficients.unique().tolist()) <= {0.0, 1.0}
    assert not coefficients.requires_grad


def test_teacher_dropping_drops_other_teachers_at_rate_p():
    generator = torch.Generator().manual_seed(1)
    losses = torch.rand(20000, 3, generator=generator)
    for p in (0.25, 0.5):
        coefficients = teacher_drop_coefficients(losses, p, generator)
        not_max = ~F.one_hot(losses.argmax(dim=1), 3).bool()
        drop_rate = 1.0 - coefficients[not_max].mean().item()
        assert abs(drop_rate - p) < 0.015, (p, drop_rate)


def test_teacher_dropping_is_reproducible_with_an_explicit_generator():
    losses = torch.rand(64, 3)
    first = teacher_drop_coefficients(losses, 0.5, torch.Generator().manual_seed(7))
    second = teacher_drop_coefficients(losses, 0.5, torch.Generator().manual_seed(7))
    third = teacher_drop_coefficients(losses, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert torch.equal(teacher_drop_coefficients(losses, 0.0), torch.ones_like(losses))


def test_unic_loss_normalizations():
    losses = torch.tensor([[1.0, 3.0], [2.0, 10.0]])
    coefficients = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # image: mean over kept teachers per image, then over images: ((1 + 3) / 2 + 10 / 1) / 2
    assert unic_loss(losses, coefficients, "image").item() == pytest.approx(6.0)
    # batch (UNIC code): kept sum / number kept = (1 + 3 + 10) / 3
    assert unic_loss(losses, coefficients, "batch").item() == pytest.approx(14.0 / 3.0)
    assert unic_loss(losses).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="normalization"):
        unic_loss(losses, coefficients, "teacher")


def test_dropped_teachers_get_no_gradient():
    prediction = torch.randn(2, 2, requires_grad=True)
    losses = prediction.square()
    coefficients = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    unic_loss(losses, coefficients).backward()
    assert prediction.grad[0, 1] == 0
    assert (prediction.grad[0, 0] != 0) and (prediction.grad[1] != 0).all()
