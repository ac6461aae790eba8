"""Knowledge-distillation losses. Each takes tensors and returns a scalar.

All are zero when the student's tensors equal the teacher's, and gradients reach only the
student's side (the teacher's tensors are detached here, whatever the caller passes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
            ) -> torch.Tensor:
    """Soft-target distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
    Neural Network").

    ``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch. The ``T²``
    factor keeps the gradient scale independent of the temperature.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

    Mean squared error between the (adapted) student feature and the teacher feature. The
    caller applies the learned adapter; spatial sizes that differ are matched by adaptive
    average pooling of the larger map.
    """
    s, t = student_feat, teacher_feat.detach()
    if s.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return F.mse_loss(s, t)


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention ``A = normalize(mean_c |F|^p)``, flattened per sample."""
    if feat.dim() != 4:
        raise ValueError(f"attention transfer needs NCHW features; got shape {tuple(feat.shape)}")
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: int = 2
                   ) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

    ``mean_b ‖A_s − A_t‖²`` with ``A`` from ``attention_map``. Channel counts may differ;
    spatial sizes that differ are matched by adaptive average pooling.
    """
    s, t = student_feat, teacher_feat.detach()
    if s.shape[-2:] != t.shape[-2:]:
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).sum(dim=1).mean()


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation").

    ``alpha · TCKD + beta · NCKD``, both scaled by ``T²``. TCKD is the KL divergence of the
    binary (target vs. all other classes) distributions; NCKD is the KL divergence among the
    non-target classes only (target logit masked out before the softmax).
    """
    t = temperature
    teacher_logits = teacher_logits.detach()
    gt = F.one_hot(target, student_logits.shape[-1]).bool()
    p_s = F.softmax(student_logits / t, dim=-1)
    p_t = F.softmax(teacher_logits / t, dim=-1)
    b_s = torch.stack([(p_s * gt).sum(-1), (p_s * ~gt).sum(-1)], dim=-1).clamp_min(1e-8)
    b_t = torch.stack([(p_t * gt).sum(-1), (p_t * ~gt).sum(-1)], dim=-1).clamp_min(1e-8)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * (t * t)
    masked = 1000.0 * gt  # push the target logit out of the non-target softmax
    log_q_s = F.log_softmax(student_logits / t - masked, dim=-1)
    log_q_t = F.log_softmax(teacher_logits / t - masked, dim=-1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True) * (t * t)
    return alpha * tckd + beta * nckd
