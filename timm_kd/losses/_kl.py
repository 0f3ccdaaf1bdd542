"""KL divergence between two tempered softmaxes, with a hand-written backward.

``tempered_kl(s, t, temp_s, temp_t)`` is, per sample::

    KL(p || q) = sum_k p_k (log p_k - log q_k),   p = softmax(t / temp_t),  q = softmax(s / temp_s)

the core of ``kd`` (one fixed temperature) and ``dtkd`` (per-sample temperatures that depend on the
student). Autograd through ``log_softmax``, the division and the products keeps about a dozen
``[B, C]`` intermediates and runs as many backward kernels; the gradient has a closed form, so
this Function saves three tensors and computes it in a few passes (see benchmarks/losses.py)::

    dKL/ds_k      = (q_k - p_k) / temp_s
    dKL/dtemp_s   = -sum_k (q_k - p_k) s_k / temp_s^2
    dKL/dtemp_t   = -sum_k p_k (log p_k - log q_k - KL) t_k / temp_t^2

The teacher logits ``t`` get no gradient (they are constants in every loss). Tests compare the
gradient with autograd's on the plain formula (``torch.autograd.gradcheck`` in float64).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["tempered_kl"]


class _TemperedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, temp_s, temp_t):
        log_q = torch.log_softmax(s / temp_s, dim=-1)
        log_p = torch.log_softmax(t / temp_t, dim=-1)
        p = log_p.exp()
        p_diff = log_p.sub_(log_q).mul_(p)  # p_k (log p_k - log q_k), in log_p's buffer
        kl = p_diff.sum(dim=-1)
        temp_s_grad = torch.is_tensor(temp_s) and temp_s.requires_grad
        temp_t_grad = torch.is_tensor(temp_t) and temp_t.requires_grad
        ctx.temps = tuple(None if torch.is_tensor(v) else v for v in (temp_s, temp_t))  # the float ones
        ctx.save_for_backward(
            log_q,
            p,
            s if temp_s_grad else None,
            t if temp_t_grad else None,
            p_diff if temp_t_grad else None,
            kl if temp_t_grad else None,
            temp_s if torch.is_tensor(temp_s) else None,
            temp_t if torch.is_tensor(temp_t) else None,
        )
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        log_q, p, s, t, p_diff, kl, temp_s_saved, temp_t_saved = ctx.saved_tensors
        temp_s = temp_s_saved if temp_s_saved is not None else ctx.temps[0]
        temp_t = temp_t_saved if temp_t_saved is not None else ctx.temps[1]
        g = grad_kl.unsqueeze(-1)
        q_minus_p = log_q.exp().sub_(p)
        grad_s = grad_temp_s = grad_temp_t = None
        if ctx.needs_input_grad[2]:
            grad_temp_s = -torch.linalg.vecdot(q_minus_p, s).unsqueeze(-1) * g / temp_s**2
        if ctx.needs_input_grad[3]:
            # sum_k p_k (log p_k - log q_k - KL) t_k, from the saved p_k (log p_k - log q_k)
            pdt = torch.linalg.vecdot(p_diff, t) - kl * torch.linalg.vecdot(p, t)
            grad_temp_t = -pdt.unsqueeze(-1) * g / temp_t**2
        if ctx.needs_input_grad[0]:
            grad_s = q_minus_p.mul_(g / temp_s)
        return grad_s, None, grad_temp_s, grad_temp_t


def tempered_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temp_student: float | torch.Tensor,
    temp_teacher: float | torch.Tensor,
) -> torch.Tensor:
    """Per-sample ``KL(softmax(t / temp_teacher) || softmax(s / temp_student))``, ``[B]``.

    Temperatures are floats or ``[B, 1]`` tensors (which may require grad). No gradient flows
    into ``teacher_logits``.
    """
    return _TemperedKL.apply(student_logits, teacher_logits.detach(), temp_student, temp_teacher)
