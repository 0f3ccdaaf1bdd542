"""The few pieces several losses share: tempered KL, soft cross-entropy, logit standardization.

Plain differentiable PyTorch: autograd takes the gradients and ``torch.compile`` fuses the ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["STANDARDIZE_EPS", "kl_div", "soft_cross_entropy", "standardize_logits", "tempered_kl"]

#: the logit-standardization authors' epsilon in ``(z - mean) / (std + eps)``
STANDARDIZE_EPS = 1e-7


def kl_div(log_p: torch.Tensor, log_q: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` from log-probabilities; batch mean if ``reduce``.

    The same value as ``F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)``.
    """
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean() if reduce else kl


def soft_cross_entropy(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_k -p_k log q_k``: soft cross-entropy, sum over classes, mean over the batch."""
    return -(p * log_q).sum(dim=-1).mean()


def tempered_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temp_student: float | torch.Tensor,
    temp_teacher: float | torch.Tensor,
) -> torch.Tensor:
    """Per-sample ``KL(softmax(t / temp_teacher) || softmax(s / temp_student))``, ``[B]``.

    Temperatures are numbers or ``[B, 1]`` tensors (which may carry a gradient, as DTKD's do). No
    gradient flows into ``teacher_logits``.
    """
    log_p = F.log_softmax(teacher_logits.detach() / temp_teacher, dim=-1)
    log_q = F.log_softmax(student_logits / temp_student, dim=-1)
    return kl_div(log_p, log_q, reduce=False)


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Z-score ``logits`` over the last (class) dimension: ``(z - mean) / (std + eps)``, ddof = 1.

    Logit standardization (Sun, Zhu, Ren, Bai, Chen; "Logit Standardization in Knowledge
    Distillation", CVPR 2024, arXiv 2403.01427; authors' code: github
    sunshangquan/logit-standardization-KD): the same value as the authors'
    ``(z - z.mean()) / (1e-7 + z.std())``, so the student only has to match the teacher's logit
    relations, not their scale or shift.

    Departure: a constant row (no spread, e.g. a zero-initialised classifier) maps to zeros with a
    finite gradient ``(g - mean(g)) / eps``; ``torch.std``'s backward is NaN there.
    """
    n = logits.shape[-1]
    if n < 2:
        raise ValueError(f"standardize_logits: needs at least 2 classes to compute a std, got {n}")
    centred = logits - logits.mean(dim=-1, keepdim=True)
    var = centred.square().sum(dim=-1, keepdim=True) / (n - 1)
    spread = var > 0
    std = torch.where(spread, torch.where(spread, var, 1.0).sqrt(), 0.0)
    return centred / (std + eps)
