"""UDON losses against hand computations (explicit formulas and loops over Python floats), and gradient routing."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses.udon import (
    class_cosines,
    classification_loss,
    cosine_logits,
    logit_distillation_loss,
    margin_logits,
    relational_distillation_loss,
    udon_loss,
)


def cross_entropy_by_hand(logits: list[list[float]], labels: list[int]) -> float:
    rows = [math.log(sum(math.exp(z) for z in row)) - row[label] for row, label in zip(logits, labels)]
    return sum(rows) / len(rows)


def test_cosine_logits_and_margins_by_hand():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    weights = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalized inside: e1, e2
    cos = class_cosines(embeddings, weights)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(cosine_logits(embeddings, weights, labels=labels), 16 * cos)
    cosface = cosine_logits(embeddings, weights, margin=0.2, margin_type="cosface", labels=labels)
    torch.testing.assert_close(cosface, 16 * torch.tensor([[0.8, 0.0], [0.6, 0.6]]))
    arcface = cosine_logits(embeddings, weights, scale=10.0, margin=0.3, margin_type="arcface", labels=labels)
    expected = [[math.cos(math.acos(1 - 1e-7) + 0.3), 0.0], [0.6, math.cos(math.acos(0.8) + 0.3)]]
    torch.testing.assert_close(arcface, 10 * torch.tensor(expected), rtol=1e-4, atol=1e-4)
    # margins only with labels (evaluation logits have none)
    torch.testing.assert_close(cosine_logits(embeddings, weights, margin=0.3, margin_type="arcface"), 16 * cos)
    torch.testing.assert_close(margin_logits(cos, None, margin=0.2, margin_type="cosface"), 16 * cos)
    with pytest.raises(ValueError, match="margin_type"):
        margin_logits(cos, labels, margin=0.1, margin_type="sphereface")


def test_classification_loss_by_hand():
    logits = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
    labels = [2, 0]
    loss = classification_loss(torch.tensor(logits), torch.tensor(labels))
    assert loss.item() == pytest.approx(cross_entropy_by_hand(logits, labels), rel=1e-6)


def test_logit_and_relational_distillation_by_hand():
    student = [[0.2, 0.1, -0.3], [0.9, -0.5, 0.4]]
    teacher = [[0.5, -0.1, 0.0], [-0.2, 0.3, 0.6]]
    expected = 0.0
    for s_row, t_row in zip(student, teacher):  # sum over classes, mean over rows, on cosines / 0.1
        t_norm = sum(math.exp(t / 0.1) for t in t_row)
        s_norm = sum(math.exp(s / 0.1) for s in s_row)
        p = [math.exp(t / 0.1) / t_norm for t in t_row]
        q = [math.exp(s / 0.1) / s_norm for s in s_row]
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / len(student)
    assert logit_distillation_loss(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(
        expected, rel=1e-5
    )

    es = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    et = [[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    squares = sum(sum((dot(es[i], es[j]) - dot(et[i], et[j])) ** 2 for j in range(3)) for i in range(3))
    expected = 32 * squares / 9  # default scale 32 x the mean over the 3 x 3 entries
    assert relational_distillation_loss(torch.tensor(es), torch.tensor(et)).item() == pytest.approx(expected, rel=1e-6)
    # scale = local batch: squared error summed over columns, mean over rows
    assert relational_distillation_loss(torch.tensor(es), torch.tensor(et), scale=3.0).item() == pytest.approx(
        squares / 3, rel=1e-6
    )


def _authors_relational(student: np.ndarray, teacher: np.ndarray, devices: int) -> float:
    """The UDON code's relational term in float64: on each device, the squared error between the local similarity
    matrices summed over columns and averaged over rows, times devices / 4; the reported value is the mean over
    devices (the global batch is split evenly)."""
    values = []
    for s, t in zip(np.split(student, devices), np.split(teacher, devices)):
        values.append(((s @ s.T - t @ t.T) ** 2).sum(axis=1).mean() * devices / 4)
    return float(np.mean(values))


def _embeddings(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    student = rng.standard_normal((batch, 16))
    teacher = np.concatenate([student, np.zeros((batch, 8))], axis=1) + 0.7 * rng.standard_normal((batch, 24))
    return (
        student / np.linalg.norm(student, axis=1, keepdims=True),
        teacher / np.linalg.norm(teacher, axis=1, keepdims=True),
    )


def test_relational_term_matches_the_authors_code_at_its_reference_global_batch_of_128():
    student, teacher = _embeddings(128, seed=0)
    # per-process batch 128 (the authors' code on 1 device: x 1/4)
    ours = relational_distillation_loss(torch.tensor(student), torch.tensor(teacher)).item()
    assert ours == pytest.approx(_authors_relational(student, teacher, devices=1), rel=1e-9)
    # per-process batch 32, as the authors' 4 devices: each process's term equals that device's term
    for index in range(4):
        part = slice(32 * index, 32 * (index + 1))
        ours = relational_distillation_loss(torch.tensor(student[part]), torch.tensor(teacher[part])).item()
        s, t = student[part], teacher[part]
        device_term = ((s @ s.T - t @ t.T) ** 2).sum(axis=1).mean() * 4 / 4
        assert ours == pytest.approx(device_term, rel=1e-9)
    ours = np.mean(
        [
            relational_distillation_loss(torch.tensor(s), torch.tensor(t)).item()
            for s, t in zip(np.split(student, 4), np.split(teacher, 4))
        ]
    )
    assert ours == pytest.approx(_authors_relational(student, teacher, devices=4), rel=1e-9)


def test_udon_loss_is_the_mean_of_four_hand_computed_terms():
    student_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    teacher_emb = torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.0, 0.8]])
    student_cos = [[0.9, -0.2, 0.1], [0.3, 0.5, -0.4]]
    teacher_cos = [[0.7, 0.1, -0.3], [-0.1, 0.8, 0.2]]
    labels = [0, 1]
    out = udon_loss(
        torch.tensor(labels),
        torch.tensor(student_cos),
        torch.tensor(teacher_cos),
        student_emb,
        teacher_emb,
        margin=0.1,
        margin_type="cosface",
    )
    with_margin = [[c - 0.1 * (j == y) for j, c in enumerate(row)] for row, y in zip(student_cos, labels)]
    expected_student = cross_entropy_by_hand([[16 * c for c in row] for row in with_margin], labels)
    with_margin = [[c - 0.1 * (j == y) for j, c in enumerate(row)] for row, y in zip(teacher_cos, labels)]
    expected_teacher = cross_entropy_by_hand([[16 * c for c in row] for row in with_margin], labels)
    assert out.student_classification.item() == pytest.approx(expected_student, rel=1e-5)
    assert out.teacher_classification.item() == pytest.approx(expected_teacher, rel=1e-5)
    kl = logit_distillation_loss(torch.tensor(student_cos), torch.tensor(teacher_cos))  # checked by hand above
    relational = relational_distillation_loss(student_emb, teacher_emb)
    torch.testing.assert_close(out.logit_distillation, kl)
    torch.testing.assert_close(out.relational_distillation, relational)
    expected_total = (expected_student + expected_teacher + kl.item() + relational.item()) / 4
    assert out.loss.item() == pytest.approx(expected_total, rel=1e-5)
    assert all(isinstance(value, torch.Tensor) for value in out.terms().values())

    uscrr = udon_loss(torch.tensor(labels), torch.tensor(student_cos))
    assert set(uscrr.terms()) == {"student_classification"}
    assert uscrr.loss.item() == pytest.approx(
        cross_entropy_by_hand([[16 * c for c in row] for row in student_cos], labels), rel=1e-5
    )


def test_teacher_sides_get_no_gradient():
    torch.manual_seed(0)
    student_emb = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    teacher_emb = F.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
    student_cos = torch.randn(4, 5).tanh().requires_grad_()
    teacher_cos = torch.randn(4, 5).tanh().requires_grad_()
    (
        logit_distillation_loss(student_cos, teacher_cos) + relational_distillation_loss(student_emb, teacher_emb)
    ).backward()
    assert teacher_cos.grad is None and teacher_emb.grad is None
    assert student_cos.grad.abs().sum() > 0 and student_emb.grad.abs().sum() > 0


@pytest.mark.parametrize("to_backbone", [True, False])
def test_distillation_reaches_the_backbone_only_when_asked(to_backbone):
    """A linear 'backbone' + heads: with the distillation terms fed from detached features, the backbone gradient is
    the one of the two classification terms alone."""
    torch.manual_seed(0)
    backbone, student_head, teacher_head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 5)
    student_classes, teacher_classes = torch.randn(3, 4), torch.randn(3, 5)
    pixels, labels = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])

    def grads(terms_used):
        for module in (backbone, student_head):
            module.zero_grad()
        features = F.normalize(backbone(pixels), dim=-1)
        student = F.normalize(student_head(features), dim=-1)
        teacher = F.normalize(teacher_head(features), dim=-1)
        distill = None if to_backbone else F.normalize(student_head(features.detach()), dim=-1)
        out = udon_loss(
            labels,
            class_cosines(student, student_classes),
            class_cosines(teacher, teacher_classes),
            student,
            teacher,
            None if distill is None else class_cosines(distill, student_classes),
            distill,
        )
        sum(getattr(out, name) for name in terms_used).backward()
        return backbone.weight.grad.clone(), student_head.weight.grad.clone()

    classification = ("student_classification", "teacher_classification")
    backbone_all, head_all = grads(classification + ("logit_distillation", "relational_distillation"))
    backbone_ce, head_ce = grads(classification)
    assert not torch.allclose(head_all, head_ce)  # the student head always learns from distillation
    assert torch.allclose(backbone_all, backbone_ce, atol=1e-7) != to_backbone
