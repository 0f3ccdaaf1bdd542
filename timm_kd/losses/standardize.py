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

__all__ = ["standardize_logits"]


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score ``logits`` over the last (class) dimension: ``(z - mean) / (std + eps)``, ddof = 1."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)
