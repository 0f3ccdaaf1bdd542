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

Departure from mdistiller (same math, different numerics). mdistiller forms ``b_s`` from softmax
probabilities and takes ``torch.log`` of them, which gives ``-inf`` and a NaN loss when ``q_y`` or
``1 - q_y`` underflows (confident or large logits), and it drops the target class from NCKD by
subtracting 1000 from its scaled logit (the "gt-mask trick"). Here everything is computed from
``log_softmax`` in log space: ``log(1 - q_y) = logsumexp_{k != y} log q_k`` and
``log q~_k = log q_k - log(1 - q_y)`` with the target class removed exactly. In float32 the two
agree to rounding wherever mdistiller's is finite and its shift removes the target, i.e. unless the
target's scaled logit exceeds every other one by more than about 980 (tests compare them); beyond
that mdistiller's NCKD would count the target class and ours still excludes it. The gradient is
written in closed form (``_DecoupledKL``): with autograd through mdistiller's graph the loss took
15x the time of cross-entropy in benchmarks/losses.py, now about 6x.

With soft targets ``[B, C]`` (mixup/CutMix) the target class ``y`` of the decoupling is the soft
target's argmax; cross-entropy uses the soft targets.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy, warmup_factor
from ._registry import register_loss
from .standardize import standardize_logits

__all__ = ["DKDLoss", "dkd_terms"]


class _DecoupledKL(torch.autograd.Function):
    """Per-sample ``(TCKD, NCKD)`` (without ``T^2``) from scaled logits, with a closed-form backward.

    With ``q = softmax(u)``, ``q~ = softmax`` of ``u`` over the non-target classes (``q~_y = 0``) and
    the same for the teacher (``p``, ``p~``), the student gradient is::

        dTCKD/du_y = q_y - p_y         dTCKD/du_k = q~_k (p_y - q_y)      (k != y)
        dNCKD/du_y = 0                 dNCKD/du_k = q~_k - p~_k

    which autograd would otherwise reach through two log-softmaxes, two logsumexps, gathers and
    scatters (about 20 ``[B, C]`` kernels). Tests check it against autograd on mdistiller's formula.
    """

    @staticmethod
    def forward(ctx, u, v, labels):
        idx = labels.unsqueeze(1)
        log_q = torch.log_softmax(u, dim=-1)
        log_p = torch.log_softmax(v, dim=-1)
        # log of the target mass and of the non-target mass, both in log space (no log(1 - q_y))
        log_q_y, log_p_y = log_q.gather(1, idx), log_p.gather(1, idx)
        log_q_nt = log_q.scatter(1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
        log_p_nt = log_p.scatter(1, idx, float("-inf")).logsumexp(dim=-1, keepdim=True)
        p_y = log_p_y.exp()
        gap_nt = log_p_nt - log_q_nt
        tckd = p_y * (log_p_y - log_q_y) + log_p_nt.exp() * gap_nt
        # p~ = p / (1 - p_y) on the non-target classes, 0 on the target
        p_tilde = (log_p - log_p_nt).exp_().scatter_(1, idx, 0.0)
        nckd = (p_tilde * (log_p - log_q)).sum(dim=-1, keepdim=True)
        nckd = nckd - gap_nt * p_tilde.sum(dim=-1, keepdim=True)  # log p~ - log q~ = log p - log q - gap_nt
        ctx.save_for_backward(log_q, log_q_nt, log_q_y, p_tilde, p_y, idx)
        return tckd.squeeze(1), nckd.squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_tckd, grad_nckd):
        log_q, log_q_nt, log_q_y, p_tilde, p_y, idx = ctx.saved_tensors
        g_t, g_n = grad_tckd.unsqueeze(1), grad_nckd.unsqueeze(1)
        q_y = log_q_y.exp()
        q_tilde = (log_q - log_q_nt).exp_()
        grad = q_tilde.mul_(g_t * (p_y - q_y) + g_n).sub_(p_tilde * g_n)
        grad.scatter_(1, idx, g_t * (q_y - p_y))
        return grad, None, None


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` as a batch mean; ``labels`` are class indices ``[B]``."""
    tckd, nckd = _DecoupledKL.apply(student_logits / tau, teacher_logits.detach() / tau, labels)
    return tckd.mean() * tau**2, nckd.mean() * tau**2


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
