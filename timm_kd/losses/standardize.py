"""Logit standardization (Sun, Zhu, Ren, Bai, Chen; "Logit Standardization in Knowledge
Distillation", CVPR 2024, arXiv 2403.01427; authors' code: github sunshangquan/logit-standardization-KD).

Before the temperature softmax, each sample's logit vector is z-scored over its classes::

    Z(z) = (z - mean_k z_k) / (std_k z_k + eps)        std with Bessel's correction (ddof = 1),
                                                        eps = 1e-7, as in the authors' ``normalize``

so the student only has to match the teacher's logit *relations*, not their scale or shift. It is
a plug-in: ``kd``, ``ats`` and ``dtkd`` take ``logit_standardize=True``; ``lskd`` is KD with the
paper's CIFAR-100 settings.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["STANDARDIZE_EPS", "standardize_logits"]

#: the authors' epsilon in ``(z - mean) / (std + eps)``
STANDARDIZE_EPS = 1e-7


class _Standardize(torch.autograd.Function):
    """``(z - mean) / (std + eps)`` over the last dimension, ddof = 1, with a closed-form backward.

    With ``c = z - mean``, ``sigma = sqrt(sum c^2 / (n - 1))`` and the output ``y = c / (sigma + eps)``::

        dL/dz = (g - mean(g)) / (sigma + eps) - y * sum(g * y) / ((n - 1) * sigma)

    (the second term is 0 for a constant row, where ``y = 0``). Autograd through the same steps
    takes about twice as long on [256, 1000] logits; tests gradcheck it in float64.
    """

    @staticmethod
    def forward(ctx, logits, eps):
        n = logits.shape[-1]
        centred = logits - logits.mean(dim=-1, keepdim=True)
        sigma = torch.linalg.vecdot(centred, centred).div_(n - 1).sqrt_().unsqueeze(-1)
        out = centred.div_(sigma + eps)
        ctx.save_for_backward(out, sigma)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, sigma = ctx.saved_tensors
        n = out.shape[-1]
        coef = torch.linalg.vecdot(grad, out).unsqueeze(-1) / ((n - 1) * sigma)
        coef = torch.where(sigma > 0, coef, torch.zeros_like(coef))
        grad_in = (grad - grad.mean(dim=-1, keepdim=True)).div_(sigma + ctx.eps)
        return grad_in.sub_(out * coef), None


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Z-score ``logits`` over the last (class) dimension: ``(z - mean) / (std + eps)``, ddof = 1.

    Same value as the authors' ``(z - z.mean()) / (1e-7 + z.std())``. The std is summed from the
    centred logits (two passes, like ``torch.std``, whose CPU kernel takes ~100x a mean's time on
    [256, 1000] logits), and the backward is written out (``_Standardize``).
    """
    n = logits.shape[-1]
    if n < 2:
        raise ValueError(f"standardize_logits: needs at least 2 classes to compute a std, got {n}")
    return _Standardize.apply(logits, eps)
