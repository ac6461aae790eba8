from __future__ import annotations

import pytest
import torch

from distill.losses import attention_loss, dkd_loss, feature_loss, kd_loss

torch.manual_seed(0)


def _logits(n=8, c=10):
    return torch.randn(n, c)


@pytest.mark.parametrize("loss", ["kd", "dkd", "feature", "attention"])
def test_zero_when_student_equals_teacher(loss):
    z = _logits()
    f = torch.randn(4, 6, 5, 5)
    y = torch.randint(0, 10, (8,))
    value = {
        "kd": lambda: kd_loss(z, z.clone(), 4.0),
        "dkd": lambda: dkd_loss(z, z.clone(), y),
        "feature": lambda: feature_loss(f, f.clone()),
        "attention": lambda: attention_loss(f, f.clone()),
    }[loss]()
    assert value.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss", ["kd", "dkd", "feature", "attention"])
def test_gradients_reach_only_the_student(loss):
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10, requires_grad=True)
    fs = torch.randn(4, 6, 5, 5, requires_grad=True)
    ft = torch.randn(4, 12, 10, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    out = {
        "kd": lambda: kd_loss(s, t),
        "dkd": lambda: dkd_loss(s, t, y),
        "feature": lambda: feature_loss(fs, ft[:, :6]),
        "attention": lambda: attention_loss(fs, ft),
    }[loss]()
    assert out.item() > 0
    out.backward()
    student, teacher = (s, t) if loss in ("kd", "dkd") else (fs, ft)
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_temperature_scaling_matches_definition():
    s, t = _logits(), _logits()
    for temp in (1.0, 2.0, 8.0):
        p_t = torch.softmax(t / temp, -1)
        manual = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
        assert kd_loss(s, t, temp).item() == pytest.approx(manual.item(), rel=1e-5)


def test_kd_t_squared_keeps_gradient_scale():
    # Without the T^2 factor the gradient would shrink like 1/T^2 (Hinton et al. 2015, §2).
    s = torch.randn(64, 10, requires_grad=True)
    t = torch.randn(64, 10)
    grads = []
    for temp in (4.0, 16.0):
        s.grad = None
        kd_loss(s, t, temp).backward()
        grads.append(s.grad.norm().item())
    assert 0.1 < grads[1] / grads[0] < 10


def test_kd_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(_logits(), _logits(), 0.0)


def test_dkd_is_tckd_plus_nckd_weighted():
    s, t = _logits(), _logits()
    y = torch.randint(0, 10, (8,))
    only_t = dkd_loss(s, t, y, alpha=1.0, beta=0.0)
    only_n = dkd_loss(s, t, y, alpha=0.0, beta=1.0)
    both = dkd_loss(s, t, y, alpha=2.0, beta=3.0)
    assert both.item() == pytest.approx(2 * only_t.item() + 3 * only_n.item(), rel=1e-4)


def test_attention_needs_nchw():
    with pytest.raises(ValueError, match="attention transfer needs NCHW"):
        attention_loss(torch.randn(4, 10), torch.randn(4, 10))
