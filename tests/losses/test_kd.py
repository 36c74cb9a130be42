"""The task-specific distillation loss against hand computation, and the mixed real / synthetic batch sampler."""

import math

import numpy as np
import pytest
import torch

from hf_distill.data.mixed_batch_sampler import MixedBatchSampler
from hf_distill.losses.kd import kd_loss


def test_kd_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, -100, 2])  # the middle row is synthetic
    alpha, temperature = 0.3, 2.0

    def softmax(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    ce = (-math.log(softmax([2.0, 0.0, -1.0])[0]) - math.log(softmax([0.0, 1.0, 3.0])[2])) / 2  # labelled rows only
    kl = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = softmax([v / temperature for v in t_row])
        q = softmax([v / temperature for v in s_row])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    kl /= 3  # all rows
    out = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature)
    assert out.cross_entropy.item() == pytest.approx(ce, rel=1e-6)
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)
    assert out.loss.item() == pytest.approx((1 - alpha) * ce + alpha * temperature**2 * kl, rel=1e-6)


def test_kd_loss_closed_form_numbers():
    """Uniform student, teacher logits (ln 3, 0): at T = 2 the teacher's probabilities are (sqrt 3, 1) / (sqrt 3 + 1),
    so KL = p0 ln(2 p0) + p1 ln(2 p1) = 0.0363408 per row; CE of the labelled row = ln 2."""
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    out = kd_loss(student, teacher, torch.tensor([0, -100]), alpha=0.75, temperature=2.0)
    assert out.cross_entropy.item() == pytest.approx(0.6931472, abs=1e-6)
    assert out.kl.item() == pytest.approx(0.0363408, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.25 * 0.6931472 + 0.75 * 4 * 0.0363408, abs=1e-6)  # 0.2823091
    at_t1 = kd_loss(student, teacher, torch.tensor([0, 1]), alpha=0.5, temperature=1.0)
    assert at_t1.kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)  # 0.1308120


def test_synthetic_rows_never_reach_the_cross_entropy():
    torch.manual_seed(0)
    student = torch.randn(6, 4, requires_grad=True)
    teacher = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([1, 3, -100, 0, -100, -100])
    ce_only = kd_loss(student, teacher, labels, alpha=0.0)
    ce_only.loss.backward()
    assert torch.all(student.grad[labels == -100] == 0) and torch.any(student.grad[labels != -100] != 0)
    assert teacher.grad is None  # the teacher side is detached
    real = labels != -100
    reference = torch.nn.functional.cross_entropy(student[real], labels[real])
    torch.testing.assert_close(ce_only.cross_entropy, reference.detach())
    student.grad = None
    kd_loss(student, teacher, labels, alpha=1.0).loss.backward()  # KL alone: every row gets a gradient
    assert torch.all(student.grad.abs().sum(dim=1) > 0)
    all_synthetic = kd_loss(student, teacher, torch.full((6,), -100), alpha=0.5)
    assert all_synthetic.cross_entropy.item() == 0.0 and torch.isfinite(all_synthetic.loss)


def test_kd_loss_rejects_bad_settings():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(logits, logits, torch.zeros(2, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, logits, torch.zeros(2, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="both be"):
        kd_loss(logits, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_mixed_batches_have_the_ratio_cover_the_real_rows_and_cycle_the_synthetic_ones():
    sampler = MixedBatchSampler(num_real=40, num_synthetic=14, batch_size=8, synthetic_ratio=0.25, seed=3)
    assert sampler.synthetic_per_batch == 2 and len(sampler) == 6
    batches = list(sampler)
    assert all(len(b) == 8 and sum(i >= 40 for i in b) == 2 for b in batches)
    real = [i for b in batches for i in b if i < 40]
    assert len(real) == len(set(real)) == 36  # one pass, no repeat
    synthetic = [i for b in batches for i in b if i >= 40]
    assert len(synthetic) == len(set(synthetic)) == 12
    assert list(sampler) == batches  # deterministic for an epoch (resume replays it)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != batches
    stream = synthetic + [i for b in second for i in b if i >= 40]
    assert sorted(stream[:14]) == list(range(40, 54))  # every synthetic image before any repeat, across epochs
    plain = MixedBatchSampler(num_real=40, num_synthetic=0, batch_size=8)
    assert all(max(b) < 40 for b in plain) and len(plain) == 5
    np.testing.assert_array_equal(sorted(i for b in plain for i in b), np.arange(40))


def test_mixed_sampler_errors():
    with pytest.raises(ValueError, match="needs synthetic images"):
        MixedBatchSampler(10, 0, 4, synthetic_ratio=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MixedBatchSampler(10, 5, 4, synthetic_ratio=1.0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        MixedBatchSampler(3, 5, 8, synthetic_ratio=0.5)
