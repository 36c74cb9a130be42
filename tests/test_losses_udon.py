import math

import pytest
import torch
import torch.nn.functional as F

from hf_distill.losses.udon import (
    class_cosines,
    classification_loss,
    logit_distillation_loss,
    margin_logits,
    relational_distillation_loss,
    udon_loss,
)


def test_cosine_classifier_and_margins_by_hand():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    weights = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalized inside: e1, e2
    cos = class_cosines(embeddings, weights)
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(margin_logits(cos, labels, scale=16.0), 16 * cos)
    cosface = margin_logits(cos, labels, scale=16.0, margin=0.2, margin_type="cosface")
    torch.testing.assert_close(cosface, 16 * torch.tensor([[0.8, 0.0], [0.6, 0.6]]))
    arcface = margin_logits(cos, labels, scale=16.0, margin=0.3, margin_type="arcface")
    expected = 16 * torch.tensor([[math.cos(math.acos(1 - 1e-7) + 0.3), 0.0], [0.6, math.cos(math.acos(0.8) + 0.3)]])
    torch.testing.assert_close(arcface, expected, rtol=1e-4, atol=1e-4)
    # CE of the second row: -log(e^12.8 / (e^9.6 + e^12.8))
    loss = classification_loss(cos[1:], labels[1:])
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3.2)), rel=1e-4)
    with pytest.raises(ValueError, match="margin_type"):
        margin_logits(cos, labels, margin=0.1, margin_type="sphereface")


def test_logit_and_relational_distillation_by_hand():
    student = torch.tensor([[0.2, 0.1, -0.3]])
    teacher = torch.tensor([[0.5, -0.1, 0.0]])
    p = torch.softmax(teacher / 0.1, -1)
    q = torch.softmax(student / 0.1, -1)
    expected = sum(p[0, i] * (math.log(p[0, i]) - math.log(q[0, i])) for i in range(3))
    assert logit_distillation_loss(student, teacher).item() == pytest.approx(float(expected), rel=1e-5)

    es = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    et = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), dim=-1)
    ss, st = es @ es.T, et @ et.T
    expected = sum(sum((ss[i, j] - st[i, j]) ** 2 for j in range(2)) for i in range(2)) / 2  # sum cols, mean rows
    assert relational_distillation_loss(es, et).item() == pytest.approx(float(expected), rel=1e-6)


def test_total_is_the_mean_of_four_terms_and_teacher_sides_get_no_gradient():
    torch.manual_seed(0)
    student_emb = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    teacher_emb = F.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
    student_cos = torch.randn(4, 5).tanh().requires_grad_()
    teacher_cos = torch.randn(4, 5).tanh().requires_grad_()
    labels = torch.tensor([0, 1, 2, 3])
    out = udon_loss(labels, student_cos, teacher_cos, student_emb, teacher_emb)
    terms = out.terms()
    assert set(terms) == {
        "student_classification",
        "teacher_classification",
        "logit_distillation",
        "relational_distillation",
    }
    torch.testing.assert_close(out.loss, sum(terms.values()) / 4)
    (terms["logit_distillation"] + terms["relational_distillation"]).backward()
    assert teacher_cos.grad is None and teacher_emb.grad is None  # detached teacher side
    assert student_cos.grad.abs().sum() > 0 and student_emb.grad.abs().sum() > 0
    uscrr = udon_loss(labels, student_cos)
    assert set(uscrr.terms()) == {"student_classification"}
    torch.testing.assert_close(uscrr.loss, classification_loss(student_cos, labels))
