"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang; "Decoupled Knowledge
Distillation", CVPR 2022, arXiv 2203.08679; authors' code: github megvii-research/mdistiller,
``mdistiller/distillers/DKD.py``).

KD's KL is split into a target-class part (TCKD) and a non-target-class part (NCKD) that get their
own weights. Per sample, with label ``y`` and temperature ``T``::

    p = softmax(z_t / T),  q = softmax(z_s / T)
    b_t = [p_y, 1 - p_y],  b_s = [q_y, 1 - q_y]                 (binary target / non-target mass)
    TCKD = T^2 * KL(b_t || b_s)
    p~ = softmax(z_t / T - 1000 * [k == y]),  q~ = softmax(z_s / T - 1000 * [k == y])
    NCKD = T^2 * KL(p~ || q~)                                     (the classes other than y)
    loss = ce_weight * CE(z_s, y) + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)

Both terms are batch means (mdistiller sums and divides by the batch size). The warm-up scales the
DKD terms, not the cross-entropy; ``epoch`` is 1-based, as in mdistiller's trainer.

Departure from mdistiller (the warm-up's steps). mdistiller's trainer passes the integer epoch, so
its factor steps once per epoch (``k / 20`` through epoch ``k``); ``timm_kd.engine`` passes the
fractional epoch ``k + step / steps_per_epoch``, so the factor ramps every step and runs ahead of
mdistiller's by up to ``1 / warmup_epochs``: over the 20 warm-up epochs its mean is 0.549 here
against 0.525 there. Pass the integer epoch to get mdistiller's steps.

Departure from mdistiller (same math, different numerics). mdistiller takes ``torch.log`` of
softmax probabilities, which gives ``-inf`` and a NaN loss when ``q_y`` or ``1 - q_y`` underflows
(confident or large logits), and drops the target class from NCKD by subtracting 1000 from its
scaled logit. Here everything is in log space, with ``u = z / T`` and ``u~`` the ``C - 1``
non-target entries of ``u`` (the target column masked out exactly)::

    log q_y = u_y - logsumexp(u),   log(1 - q_y) = logsumexp(u~) - logsumexp(u),   log q~ = log_softmax(u~)

and the same for the teacher, so no probability is ever logged. The ``[B, 1]`` arithmetic of TCKD
(a difference of logs scaled by ``T^2``, which cancels when student and teacher agree) runs in
float64. The two agree to float32 rounding wherever mdistiller's is finite and its shift removes the
target (unless the target's scaled logit exceeds every other one by more than about 980; beyond
that mdistiller's NCKD counts the target class and ours still excludes it).

With soft targets ``[B, C]`` (mixup/CutMix) the target class ``y`` of the decoupling is the soft
target's argmax; cross-entropy uses the soft targets.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy, warmup_factor
from ._registry import LossCard, register_loss
from .functional import kl_div, standardize_logits

__all__ = ["DKDLoss", "dkd_terms"]


def _decoupled_log_probs(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(log q_y, log(1 - q_y), log q~)`` of ``q = softmax(logits)`` for the target-class mask
    ``target`` (``[B, C]`` bool): ``[B, 1]`` float64 twice, and the softmax over the non-target
    classes ``[B, C]``, 0 in the target's column."""
    rest = logits.masked_fill(target, float("-inf"))  # the non-target logits: exp() is 0 on the target
    lse_rest = rest.logsumexp(dim=1, keepdim=True)
    # log S = log(exp(lse_rest) + exp(z_y)) in float64, from its two parts
    lse_rest64 = lse_rest.double()
    z_y = logits.masked_fill(~target, 0.0).sum(dim=1, keepdim=True).double()
    lse = torch.logaddexp(lse_rest64, z_y)
    return z_y - lse, lse_rest64 - lse, (rest - lse_rest).masked_fill(target, 0.0)


def _binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)``, 0 where ``p`` underflows to 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` as a batch mean; ``labels`` are class indices ``[B]``.

    NCKD's sum runs over every column: in the target's, both non-target log-probabilities are 0
    (``_decoupled_log_probs``), so it adds ``1 * (0 - 0) = 0``.
    """
    columns = torch.arange(student_logits.shape[1], device=student_logits.device)
    target = columns == labels.unsqueeze(1)
    s_y, s_n, s_rest = _decoupled_log_probs(student_logits / tau, target)
    t_y, t_n, t_rest = _decoupled_log_probs(teacher_logits.detach() / tau, target)
    tckd = (_binary_kl(t_y, s_y) + _binary_kl(t_n, s_n)).mean().to(student_logits.dtype)
    nckd = kl_div(t_rest, s_rest)
    return tckd * tau**2, nckd * tau**2


@register_loss(
    "dkd",
    card=LossCard(
        title="Decoupled Knowledge Distillation (DKD)", paper="Zhao et al., CVPR 2022",
        arxiv="2203.08679", cites=("zhao2022dkd",),
        summary="The KD loss was split into a target-class term and a non-target-class term with "
        "separate weights.",
    ),
)
class DKDLoss(DistillLoss):
    """DKD: ``ce_weight * CE + warmup * (alpha * TCKD + beta * NCKD)``.

    Defaults are mdistiller's (``CFG.DKD``: CIFAR-100, e.g. ResNet32x4 -> ResNet8x4, 76.32 %). Its
    ImageNet configs use ``tau=1.0, warmup_epochs=1`` with ``beta=0.5`` for ResNet34 -> ResNet18
    (71.70 %) and ``beta=2.0`` for ResNet50 -> MobileNetV1 (72.05 %); its CIFAR-100 configs vary
    ``beta`` per pair: 2.0 for res56->res20 and res110->res32, 6.0 for wrn40_2->wrn16_2,
    wrn40_2->wrn40_1, vgg13->vgg8 and vgg13->mv2. The logit-standardization paper (Sun et al. 2024)
    runs DKD with ``logit_standardize=True, tau=2`` and both weights times 9.

    Args:
        alpha: weight of TCKD, the target-class term (1.0).
        beta: weight of NCKD, the non-target-class term (8.0).
        tau: softmax temperature ``T`` (4.0).
        ce_weight: weight of cross-entropy with the labels (1.0).
        warmup_epochs: epochs over which the DKD terms ramp up linearly (20); 0 disables it.
        logit_standardize: z-score both logit vectors before the DKD terms.
    """

    name = "dkd"

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, ce_weight: float = 1.0,
        warmup_epochs: float = 20, logit_standardize: bool = False, check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.alpha = check_non_negative("alpha", alpha, self.name)
        self.beta = check_non_negative("beta", beta, self.name)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.warmup_epochs = check_non_negative("warmup_epochs", warmup_epochs, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        warmup = warmup_factor(epoch, self.warmup_epochs, self.name)
        x = self.prepare(student_logits, teacher_logits, target)
        if x.student.shape[1] < 2:
            raise ValueError(f"{self.name}: needs at least 2 classes to split target and non-target classes.")
        with self.float32(x.student):
            zs, zt = x.student, x.teacher
            if self.logit_standardize:  # the terms see z-scores, cross-entropy the raw logits
                zs, zt = standardize_logits(zs), standardize_logits(zt)
            ce = cross_entropy(x.student, x.target)
            tckd, nckd = dkd_terms(zs, zt, x.labels, self.tau)
            loss = self.ce_weight * ce + warmup * (self.alpha * tckd + self.beta * nckd)
        return {
            "loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(),
            "warmup": torch.as_tensor(warmup, device=loss.device),
        }
