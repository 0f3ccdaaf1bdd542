"""Hinton knowledge distillation (Hinton, Vinyals, Dean; "Distilling the Knowledge in a Neural
Network", NIPS 2014 Deep Learning Workshop, arXiv 1503.02531).

Math, per sample, with temperature ``T``::

    p = softmax(z_t / T),  q = softmax(z_s / T)
    KD_T = T^2 * KL(p || q) = T^2 * sum_k p_k (log p_k - log q_k)        (batch mean)
    loss = ce_weight * CE(z_s, y) + kd_weight * KD_T

The ``T^2`` factor keeps the soft-target gradient's magnitude independent of ``T``. The KD term is
exactly the one computed by timm's ``timm.task.LogitDistillationTask`` (``F.kl_div(...,
reduction="batchmean", log_target=True) * T**2``); tests compare the two.

With ``logit_standardize=True`` both logit vectors are z-scored first (see ``standardize.py``).
"""
from __future__ import annotations

import torch

from ._base import DistillLoss, check_non_negative, check_positive
from ._fused import soft_target_objective, tempered_kl, tempered_target
from ._registry import register_loss
from .standardize import STANDARDIZE_EPS

__all__ = ["KDLoss", "kd_term", "tempered_target"]


def kd_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, reduce: bool = True
) -> torch.Tensor:
    """``tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))``, batch mean (or per sample).

    Its student gradient is ``tau * (q - p) / B`` (``_fused.py`` computes it in closed form).
    """
    kl = tempered_kl(student_logits, teacher_logits, tau, tau) * tau**2
    return kl.mean() if reduce else kl


@register_loss("kd")
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
        check_inputs: validate labels and finiteness on every call (one host sync).
    """

    name = "kd"

    def __init__(
        self,
        tau: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        logit_standardize: bool = False,
        check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.kd_weight = check_non_negative("kd_weight", kd_weight, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        x = self.prepare(student_logits, teacher_logits, target)
        eps = STANDARDIZE_EPS if self.logit_standardize else None
        with self.float32(x.student):
            p, h = tempered_target(x.teacher, self.tau, eps)
            loss, ce, kd = soft_target_objective(
                x.student, x.labels, x.target if x.soft else None, p, self.tau, self.ce_weight,
                self.kd_weight, h, eps,
            )
        return {"loss": loss, "ce": ce, "kd": kd}
