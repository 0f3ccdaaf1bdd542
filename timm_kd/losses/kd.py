"""Hinton knowledge distillation (Hinton, Vinyals, Dean; "Distilling the Knowledge in a Neural
Network", NIPS 2014 Deep Learning Workshop, arXiv 1503.02531).

Math, per sample, with temperature ``T``::

    p = softmax(z_t / T),  q = softmax(z_s / T)
    KD_T = T^2 * KL(p || q) = T^2 * sum_k p_k (log p_k - log q_k)        (batch mean)
    loss = ce_weight * CE(z_s, y) + kd_weight * KD_T

The ``T^2`` factor keeps the soft-target gradient's magnitude independent of ``T``: the student
gradient of ``KD_T`` is ``T (q - p) / B``. The KD term is the one timm's
``timm.task.LogitDistillationTask`` computes (``F.kl_div(..., reduction="batchmean",
log_target=True) * T**2``); tests compare the two.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy
from ._registry import LossCard, register_loss
from .functional import standardize_logits, tempered_kl

__all__ = ["KDLoss", "kd_term"]


def kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, reduce: bool = True
) -> torch.Tensor:
    """``tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))``, batch mean (or per sample)."""
    kl = tempered_kl(student_logits, teacher_logits, tau, tau) * tau**2
    return kl.mean() if reduce else kl


@register_loss(
    "kd",
    card=LossCard(
        title="Hinton knowledge distillation (KD)", paper="Hinton, Vinyals & Dean, 2015",
        arxiv="1503.02531", cites=("hinton2015distilling",),
        summary="The student was trained on cross-entropy with the labels plus the KL divergence between "
        "the teacher's and its own temperature-softened class probabilities.",
    ),
)
class KDLoss(DistillLoss):
    """Hinton KD: ``ce_weight * CE + kd_weight * tau^2 * KL(p_t^tau || p_s^tau)``.

    Args:
        tau: softmax temperature ``T`` for both teacher and student (4.0: mdistiller's CIFAR-100
            setting and timm's ``--kd-temperature`` default).
        ce_weight: weight of cross-entropy with the labels (0.1, mdistiller's CIFAR-100 KD setting,
            which gives its published 73.33 % for ResNet32x4 -> ResNet8x4).
        kd_weight: weight of the KD term (0.9, same source). mdistiller's ImageNet ResNet34 ->
            ResNet18 config uses ``tau=1, ce_weight=0.5, kd_weight=0.5`` (71.03 %).
        logit_standardize: z-score both logit vectors before the softmax (Sun et al. 2024).
    """

    name = "kd"

    def __init__(
        self, tau: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
        logit_standardize: bool = False, check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.kd_weight = check_non_negative("kd_weight", kd_weight, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        x = self.prepare(student_logits, teacher_logits, target)
        with self.float32(x.student):
            zs, zt = x.student, x.teacher
            if self.logit_standardize:
                zs, zt = standardize_logits(zs), standardize_logits(zt)
            ce = cross_entropy(x.student, x.target)
            kd = kd_term(zs, zt, self.tau)
            loss = self.ce_weight * ce + self.kd_weight * kd
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
