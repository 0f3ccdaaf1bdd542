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
15x the time of cross-entropy in benchmarks/losses.py (docs/losses.md has today's ratio).

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
    """Per-sample ``(TCKD, NCKD)`` (without ``T^2``) of ``u = z_s / T``, ``v = z_t / T`` (the division
    is folded into the shifts), with a closed-form backward (``dL/dz_s = dL/du / T``).

    One ``exp`` per side. With ``m`` the largest non-target logit, ``d = u - m``, ``e = exp(d)`` with
    0 on the target, ``S_n = sum_k e_k >= 1`` (the non-target mass, summed directly: it keeps full
    precision when ``q_y`` is close to 1 and cannot underflow) and ``log S = logaddexp(log S_n, d_y)``,
    and the same ``f``, ``Z_n``, ``Z`` for the teacher's ``v`` (``dv = v - m_v``)::

        log q_y = d_y - log S,   log(1 - q_y) = log S_n - log S,   q~_k = e_k / S_n   (k != y)
        TCKD = p_y (log p_y - log q_y) + (1 - p_y) (log(1 - p_y) - log(1 - q_y))
        NCKD = sum_{k != y} p~_k (log p~_k - log q~_k) = <f, dv - d> / Z_n - log Z_n + log S_n

    and the student gradient::

        dTCKD/du_y = q_y - p_y         dTCKD/du_k = q~_k (p_y - q_y)      (k != y)
        dNCKD/du_y = 0                 dNCKD/du_k = q~_k - p~_k

    which autograd would otherwise reach through two log-softmaxes, two logsumexps, gathers and
    scatters (about 20 ``[B, C]`` kernels). Tests check it against autograd on mdistiller's formula.
    """

    @staticmethod
    def forward(ctx, u, v, labels, tau=1.0):
        idx = labels.unsqueeze(1)
        (d, e, log_sn, d_y) = _non_target_exp(u, idx, tau)
        (dv, f, log_zn, dv_y) = _non_target_exp(v, idx, tau)
        log_s, log_z = torch.logaddexp(log_sn, d_y), torch.logaddexp(log_zn, dv_y)
        log_q_y, log_p_y = d_y - log_s, dv_y - log_z
        log_q_n, log_p_n = log_sn - log_s, log_zn - log_z  # log(1 - q_y), log(1 - p_y)
        p_y, p_n = log_p_y.exp(), log_p_n.exp()
        # 0 * log 0 = 0 where a teacher mass underflows
        tckd = torch.where(p_y > 0, p_y * (log_p_y - log_q_y), 0.0) + torch.where(
            p_n > 0, p_n * (log_p_n - log_q_n), 0.0
        )
        nckd = torch.linalg.vecdot(f, dv.sub_(d)).unsqueeze(1) / log_zn.exp() - log_zn + log_sn
        # the [B, 1] arithmetic above runs in float64: TCKD is a difference of logs scaled by T^2
        rows = (log_sn.exp(), log_zn.exp(), log_q_y.exp(), p_y)
        ctx.save_for_backward(*(v.to(u.dtype) for v in rows), e, f, idx)
        ctx.tau = tau
        return tckd.squeeze(1).to(u.dtype), nckd.squeeze(1).to(u.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_tckd, grad_nckd):
        s_n, z_n, q_y, p_y, e, f, idx = ctx.saved_tensors
        g_t, g_n = grad_tckd.unsqueeze(1) / ctx.tau, grad_nckd.unsqueeze(1) / ctx.tau  # du/dx = 1/T
        grad = e * ((g_t * (p_y - q_y) + g_n) / s_n)
        grad.addcmul_(f, -g_n / z_n)
        grad.scatter_(1, idx, g_t * (q_y - p_y))
        return grad, None, None, None


def _non_target_exp(z: torch.Tensor, idx: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    """``(d, e, log S_n, d_y)`` for ``u = z / tau``: ``d = u - m`` with ``m`` the largest non-target
    scaled logit (so ``S_n >= 1`` never underflows), ``e = exp(d)`` with 0 on the target,
    ``S_n = sum e``, ``d_y = u_y - m``; ``d`` is 0 on the target (so ``0 * d`` stays 0 there)."""
    d = z.scatter(1, idx, float("-inf"))
    m = d.amax(dim=1, keepdim=True)
    d = d.sub_(m) if tau == 1.0 else d.sub_(m).div_(tau)
    e = d.exp()
    d_y = (z.gather(1, idx) - m) / tau
    return d.scatter_(1, idx, 0.0), e, e.sum(dim=1, keepdim=True).double().log(), d_y.double()


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` as a batch mean; ``labels`` are class indices ``[B]``."""
    tckd, nckd = _DecoupledKL.apply(student_logits, teacher_logits.detach(), labels, float(tau))
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
