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

As in mdistiller, NCKD drops the target class by subtracting 1000 from its scaled logit (the
"gt-mask trick"), which removes it exactly in float32 as long as the scaled logits span less than
about 900; beyond that (logit gaps of thousands) it behaves as mdistiller does.

Departure from mdistiller (same math, different numerics): mdistiller forms ``b_s`` from the
softmax probabilities and takes ``torch.log`` of them, which gives ``-inf`` (and a NaN loss) when
``q_y`` or ``1 - q_y`` underflows to 0, e.g. with very confident or very large logits. Here
``log b`` is computed in log space, ``log q_y = log_softmax(z_s / T)_y`` and
``log(1 - q_y) = logsumexp_{k != y} log_softmax(z_s / T)_k``, which is the same value wherever
mdistiller's is finite and stays finite elsewhere.

With soft targets ``[B, C]`` (mixup/CutMix) the target class ``y`` of the decoupling is the soft
target's argmax; cross-entropy uses the soft targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy, kl_div, warmup_factor
from ._registry import register_loss
from .standardize import standardize_logits

__all__ = ["DKDLoss", "dkd_terms"]

#: mdistiller's shift that removes the target class from the non-target softmax
_GT_MASK_SHIFT = 1000.0


def _binary_log_probs(log_probs: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """``[log p_y, log(1 - p_y)]`` per sample, ``[B, 2]``, from log-probabilities ``[B, C]``."""
    log_target = log_probs.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=-1)
    log_other = log_probs.masked_fill(gt_mask, float("-inf")).logsumexp(dim=-1)
    return torch.stack([log_target, log_other], dim=-1)


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` as a batch mean; ``labels`` are class indices ``[B]``."""
    gt_mask = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    zs, zt = student_logits / tau, teacher_logits / tau
    tckd = kl_div(
        _binary_log_probs(F.log_softmax(zt, dim=-1), gt_mask),
        _binary_log_probs(F.log_softmax(zs, dim=-1), gt_mask),
    )
    shift = gt_mask.to(zs.dtype) * _GT_MASK_SHIFT
    nckd = kl_div(F.log_softmax(zt - shift, dim=-1), F.log_softmax(zs - shift, dim=-1))
    return tckd * tau**2, nckd * tau**2


@register_loss("dkd")
class DKDLoss(DistillLoss):
    """DKD: ``ce_weight * CE + warmup * (alpha * TCKD + beta * NCKD)``.

    Defaults are mdistiller's (``CFG.DKD``: CIFAR-100, e.g. ResNet32x4 -> ResNet8x4, 76.32 %). Its
    ImageNet ResNet34 -> ResNet18 config uses ``beta=0.5, tau=1.0, warmup_epochs=1`` (71.70 %); its
    CIFAR-100 configs vary ``beta`` per pair: 2.0 for res56->res20 and res110->res32, 6.0 for
    wrn40_2->wrn16_2, wrn40_2->wrn40_1, vgg13->vgg8 and vgg13->mv2. The logit-standardization paper
    (Sun et al. 2024) runs DKD with ``logit_standardize=True, tau=2`` and both weights times 9.

    Args:
        alpha: weight of TCKD, the target-class term (1.0).
        beta: weight of NCKD, the non-target-class term (8.0).
        tau: softmax temperature ``T`` (4.0).
        ce_weight: weight of cross-entropy with the labels (1.0).
        warmup_epochs: epochs over which the DKD terms ramp up linearly (20); 0 disables it.
        logit_standardize: z-score both logit vectors before the DKD terms (Sun et al. 2024).
        check_inputs: validate labels and finiteness on every call (one host sync).
    """

    name = "dkd"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        tau: float = 4.0,
        ce_weight: float = 1.0,
        warmup_epochs: float = 20,
        logit_standardize: bool = False,
        check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.alpha = check_non_negative("alpha", alpha, self.name)
        self.beta = check_non_negative("beta", beta, self.name)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.warmup_epochs = check_non_negative("warmup_epochs", warmup_epochs, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        warmup = warmup_factor(epoch, self.warmup_epochs, self.name)
        x = self.prepare(student_logits, teacher_logits, target)
        if x.student.shape[1] < 2:
            raise ValueError(f"{self.name}: needs at least 2 classes to split target and non-target classes.")
        with self.float32(x.student):
            zs, zt = x.student, x.teacher
            if self.logit_standardize:
                zs, zt = standardize_logits(zs), standardize_logits(zt)
            ce = cross_entropy(x.student, x.target)
            tckd, nckd = dkd_terms(zs, zt, x.labels, self.tau)
            loss = self.ce_weight * ce + warmup * (self.alpha * tckd + self.beta * nckd)
        return {
            "loss": loss,
            "ce": ce.detach(),
            "tckd": tckd.detach(),
            "nckd": nckd.detach(),
            "warmup": torch.tensor(warmup, device=loss.device),
        }
