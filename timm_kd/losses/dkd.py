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
from ._fused import ce_target_grad_, row_dot
from ._registry import register_loss
from .standardize import standardize_logits

__all__ = ["DKDLoss", "dkd_terms"]


class _DecoupledKL(torch.autograd.Function):
    """``(loss, CE, TCKD_T, NCKD_T)`` with ``TCKD_T = T^2 mean_b TCKD``, ``NCKD_T = T^2 mean_b NCKD`` and
    ``loss = w_ce CE + w_t TCKD_T + w_n NCKD_T``, from student logits ``x`` and teacher logits ``t``
    (``u = x / T``, ``v = t / T``: the division is folded into the shifts), with a closed-form backward
    (``dL/dx = dL/du / T``). Every output is differentiable: the backward weighs each term by
    ``w * grad_loss + grad_term``.

    One ``exp`` per side. With ``m`` the largest non-target logit, ``d = u - m / T``, ``e = exp(d)`` with
    0 on the target, ``S_n = sum_k e_k >= 1`` (the non-target mass, summed directly: it keeps full
    precision when ``q_y`` is close to 1 and cannot underflow) and ``log S = logaddexp(log S_n, d_y)``,
    and the same ``f``, ``Z_n``, ``Z`` for the teacher's ``v`` (``dv = v - m_t / T``)::

        log q_y = d_y - log S,   log(1 - q_y) = log S_n - log S,   q~_k = e_k / S_n   (k != y)
        TCKD = p_y (log p_y - log q_y) + (1 - p_y) (log(1 - p_y) - log(1 - q_y))
        NCKD = sum_{k != y} p~_k (log p~_k - log q~_k) = <f, dv - d> / Z_n - log Z_n + log S_n

    and the student gradient::

        dTCKD/du_y = q_y - p_y         dTCKD/du_k = q~_k (p_y - q_y)      (k != y)
        dNCKD/du_y = 0                 dNCKD/du_k = q~_k - p~_k

    which autograd would otherwise reach through two log-softmaxes, two logsumexps, gathers and
    scatters (about 20 ``[B, C]`` kernels). With ``with_ce`` the cross-entropy at ``T = 1`` (labels
    ``idx`` or the soft target) is formed in the same Function from one more ``exp`` of the student
    logits shifted by their maximum ``max(m, x_y)`` (``_fused.py``'s formulas), so it needs no
    log-softmax of its own. Tests check it against autograd on mdistiller's formula.
    """

    @staticmethod
    def forward(ctx, x, t, idx, soft, tau, w_ce, w_t, w_n, with_ce):
        n = x.shape[0]
        d, m = _non_target_shift(x, idx, tau)
        dv, m_t = _non_target_shift(t, idx, tau)
        f = dv.exp()  # 0 on the target
        # <f, dv - d> before d turns into e in place; the target's -inf - -inf is set to 0 (f is 0 there)
        f_dd = row_dot(f, dv.sub_(d).scatter_(1, idx, 0.0))
        e = d.exp_()
        s_n, z_n = e.sum(dim=1, keepdim=True), f.sum(dim=1, keepdim=True)
        x_y = x.gather(1, idx)
        d_y, dv_y = ((x_y - m) / tau).double(), ((t.gather(1, idx) - m_t) / tau).double()
        log_sn, log_zn = s_n.double().log(), z_n.double().log()
        # the [B, 1] arithmetic runs in float64: TCKD is a difference of logs scaled by T^2
        log_s, log_z = torch.logaddexp(log_sn, d_y), torch.logaddexp(log_zn, dv_y)
        log_q_y, log_p_y = d_y - log_s, dv_y - log_z
        log_q_n, log_p_n = log_sn - log_s, log_zn - log_z  # log(1 - q_y), log(1 - p_y)
        p_y, p_n = log_p_y.exp(), log_p_n.exp()
        # 0 * log 0 = 0 where a teacher mass underflows
        tckd = torch.where(p_y > 0, p_y * (log_p_y - log_q_y), 0.0) + torch.where(
            p_n > 0, p_n * (log_p_n - log_q_n), 0.0
        )
        nckd = f_dd.double() / z_n.double() - log_zn + log_sn
        tckd, nckd = tckd.mean().to(x.dtype) * tau**2, nckd.mean().to(x.dtype) * tau**2
        e1 = s1 = sigma = None
        ce = x.new_zeros(())
        if with_ce:  # CE = log S_1 - (x_y - x_max), or sigma log S_1 - <soft, x - x_max>
            x_max = torch.maximum(m, x_y)
            e1 = torch.sub(x, x_max)
            if soft is None:
                ce = -(x_y - x_max)
            else:
                sigma = soft.sum(dim=1, keepdim=True)
                ce = -row_dot(soft, e1)
            s1 = e1.exp_().sum(dim=1, keepdim=True)
            ce = (ce + (s1.log() if sigma is None else sigma * s1.log())).mean()
        q_y, p_y = log_q_y.exp().to(x.dtype), p_y.to(x.dtype)
        ctx.save_for_backward(s_n, z_n, q_y, p_y, e, f, idx, e1, s1, soft, sigma)
        ctx.consts = (tau, w_ce, w_t, w_n, n)
        return w_ce * ce + w_t * tckd + w_n * nckd, ce, tckd, nckd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, grad_ce, grad_tckd, grad_nckd):
        s_n, z_n, q_y, p_y, e, f, idx, e1, s1, soft, sigma = ctx.saved_tensors
        tau, w_ce, w_t, w_n, n = ctx.consts
        # d(T^2 mean_b K_b)/dx = (T / B) dK/du
        g_t, g_n = (grad * w_t + grad_tckd) * (tau / n), (grad * w_n + grad_nckd) * (tau / n)
        out = e * ((g_t * (p_y - q_y) + g_n) / s_n)
        out.addcmul_(f, -g_n / z_n)
        out.scatter_(1, idx, g_t * (q_y - p_y))
        if e1 is not None:  # + dCE/dx = sigma softmax(x) - target
            g_ce = (grad * w_ce + grad_ce) / n
            out.addcmul_(e1, (g_ce if sigma is None else g_ce * sigma) / s1)
            out = ce_target_grad_(out, idx, soft, g_ce)
        return out, None, None, None, None, None, None, None, None


def _non_target_shift(z: torch.Tensor, idx: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, m)`` for ``u = z / tau``: ``m`` ``[B, 1]`` the largest non-target logit and
    ``d = (z - m) / tau`` (a new tensor) with ``-inf`` on the target, so that ``exp(d)`` is 0 there
    and its sum ``S_n >= 1`` never underflows."""
    d = z.scatter(1, idx, float("-inf"))
    m = d.amax(dim=1, keepdim=True)
    if tau == 1.0:
        d.sub_(m)
    else:  # (z - m) / tau in one pass, in place
        torch.add(m * (-1.0 / tau), d, alpha=1.0 / tau, out=d)
    return d, m


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(TCKD, NCKD)``, each ``T^2 * KL`` as a batch mean; ``labels`` are class indices ``[B]``."""
    _, _, tckd, nckd = _DecoupledKL.apply(
        student_logits, teacher_logits.detach(), labels.unsqueeze(1), None, float(tau), 0.0, 1.0, 1.0, False
    )
    return tckd, nckd


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
            if self.logit_standardize:  # the terms see z-scores, cross-entropy the raw logits
                zs, zt = standardize_logits(x.student), standardize_logits(x.teacher)
                ce = cross_entropy(x.student, x.target)
                tckd, nckd = dkd_terms(zs, zt, x.labels, self.tau)
                loss = self.ce_weight * ce + warmup * (self.alpha * tckd + self.beta * nckd)
            else:  # cross-entropy from the same Function: one more exp instead of a log-softmax
                loss, ce, tckd, nckd = _DecoupledKL.apply(
                    x.student, x.teacher, x.labels.unsqueeze(1), x.target if x.soft else None, self.tau,
                    self.ce_weight, warmup * self.alpha, warmup * self.beta, True,
                )
        return {
            "loss": loss,
            "ce": ce.detach(),
            "tckd": tckd.detach(),
            "nckd": nckd.detach(),
            "warmup": torch.as_tensor(warmup, device=loss.device),
        }
