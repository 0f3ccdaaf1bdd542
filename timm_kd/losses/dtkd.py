"""Dynamic Temperature Knowledge Distillation (Wei, Bai; "Dynamic Temperature Knowledge Distillation",
arXiv 2404.12711, 2024; authors' code: github JinYu1998/DTKD, ``mdistiller/distillers/DTKD.py``).

Math, per sample, with reference temperature ``T`` and the signed maximum logits
``x_t = max_k z_t,k`` and ``x_s = max_k z_s,k``::

    T_t = 2 * x_t / (x_t + x_s) * T          T_s = 2 * x_s / (x_t + x_s) * T
    (so T_t + T_s = 2T, and x_t / T_t = x_s / T_s = (x_t + x_s) / 2T: "equal sharpness")

    L_DTKD = mean_b [ T_t * T_s * KL(softmax(z_t / T_t) || softmax(z_s / T_s)) ]
    KD_T   = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))                 (batch mean; kd.py)
    loss   = min(epoch / warmup_epochs, 1) * (dtkd_weight * L_DTKD + kd_weight * KD_T)
             + ce_weight * CE(z_s, y)

The temperatures are *not* detached, as in the authors' code: the gradient flows through ``x_s``
into both temperatures (only the teacher logits are constants). The warm-up scales both KD terms,
not the cross-entropy; ``epoch`` is 1-based, as in mdistiller's trainer.

Departure from the authors' code (the warm-up's steps). Their trainer (mdistiller's) passes the
integer epoch, so the factor steps once per epoch (``k / 20`` through epoch ``k``);
``timm_kd.engine`` passes the fractional epoch ``k + step / steps_per_epoch``, so the factor ramps
every step and runs ahead of theirs by up to ``1 / warmup_epochs``: over the 20 warm-up epochs its
mean is 0.549 here against 0.525 there. Pass the integer epoch to get their steps.

Departure from the authors' code: the temperature guard (docs/losses.md). The authors' code has
none: ``x_s <= 0`` makes the temperatures change sign, ``x_t + x_s -> 0`` makes them blow up, and a
fresh student (``x_s`` near 0+) facing a trained teacher (``x_t`` near 10) gets ``T_s`` far below
``T`` (0.04 for ``x_s = 0.05``, ``x_t = 10``, ``T = 4``); on short schedules or without the 20
warm-up epochs the student then collapses (tests/test_dtkd.py has a real run). We write the
temperatures through the student's share ``s = x_s / (x_t + x_s)``, ``T_s = 2T s``,
``T_t = 2T (1 - s)``, and guard ``s``:

1. both maxima are floored at ``_MAX_LOGIT_FLOOR`` (1e-6) before forming ``s``, so non-positive
   maxima give a share in ``[0, 1]`` and finite temperatures instead of negative or infinite ones;
2. with ``max_temp_ratio = r`` (default 4), ``s`` is clamped to ``[1 / (1 + r), r / (1 + r)]``,
   i.e. ``T_t / T_s`` to ``[1 / r, r]`` and both temperatures to ``[2T / (1 + r), 2Tr / (1 + r)]``
   (``[1.6, 6.4]`` for ``T = 4``); where the clamp is active the temperatures get no gradient.

``T_t + T_s = 2T`` holds everywhere. Where ``1 / r <= x_s / x_t <= r`` (both maxima positive and
comparable, the regime the paper describes) the guard is a no-op and value and gradient equal the
authors' code; ``max_temp_ratio=None`` turns step 2 off, giving the authors' result for every pair
of maxima above the 1e-6 floor.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy, warmup_factor
from ._registry import LossCard, register_loss
from .functional import standardize_logits, tempered_kl
from .kd import kd_term

__all__ = ["DTKDLoss", "dtkd_temperatures", "dtkd_term"]

#: floor on the maximum logits before the share ``x_s / (x_t + x_s)`` is formed
_MAX_LOGIT_FLOOR = 1e-6


def dtkd_temperatures(
    student_max: torch.Tensor,
    teacher_max: torch.Tensor,
    tau: float,
    max_temp_ratio: float | None = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(T_t, T_s) = (2 tau (1 - s), 2 tau s)`` from the maximum logits, with the share
    ``s`` guarded as the module docstring says (no gradient where the floor or the clamp holds)."""
    xs = student_max.clamp(min=_MAX_LOGIT_FLOOR)
    xt = teacher_max.clamp(min=_MAX_LOGIT_FLOOR)
    share = xs / (xt + xs)
    if max_temp_ratio is not None:
        share = share.clamp(1.0 / (1.0 + max_temp_ratio), max_temp_ratio / (1.0 + max_temp_ratio))
    return 2.0 * tau * (1.0 - share), 2.0 * tau * share


def dtkd_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float,
    max_temp_ratio: float | None = 4.0,
    reduce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_DTKD`` (batch mean, or per sample) and the per-sample temperatures ``(T_t, T_s)``, each ``[B]``."""
    # torch.max(dim) as in the authors' code: the gradient of x_s goes to the (first) argmax
    student_max = student_logits.max(dim=-1, keepdim=True).values
    t_t, t_s = dtkd_temperatures(student_max, teacher_logits.amax(dim=-1, keepdim=True), tau, max_temp_ratio)
    kl = tempered_kl(student_logits, teacher_logits, t_s, t_t)
    t_t, t_s = t_t.squeeze(-1), t_s.squeeze(-1)
    per_sample = kl * t_t * t_s
    return (per_sample.mean() if reduce else per_sample), t_t, t_s


@register_loss(
    "dtkd",
    card=LossCard(
        title="Dynamic Temperature Knowledge Distillation (DTKD)", paper="Wei & Bai, arXiv 2024",
        arxiv="2404.12711", cites=("wei2024dtkd", "hinton2015distilling"),
        summary="Teacher and student temperatures were set per image from their largest logits so that "
        "both softened distributions have the same sharpness, combined with a plain KD term.",
    ),
)
class DTKDLoss(DistillLoss):
    """DTKD: ``warmup * (dtkd_weight * L_DTKD + kd_weight * KD_T) + ce_weight * CE``.

    Defaults are the authors' (``CFG.DTKD`` in their mdistiller fork, CIFAR-100 ResNet32x4 ->
    ResNet8x4). Their per-pair settings for ``(dtkd_weight, kd_weight)``: res110->res32 and
    res56->res20 (1, 0.5), wrn40_2->wrn16_2 (3, 1), wrn40_2->wrn40_1 (1, 0.5), res50->mv2 (3, 2),
    wrn40_2->shuv1 (2, 0.5).

    Args:
        tau: reference temperature ``T``; the two dynamic temperatures sum to ``2T`` (4.0).
        dtkd_weight: ``alpha``, weight of the dynamic-temperature term (3.0).
        kd_weight: ``beta``, weight of the plain KD term at temperature ``T`` (1.0).
        ce_weight: ``gamma``, weight of cross-entropy with the labels (1.0).
        warmup_epochs: epochs over which both KD terms ramp up linearly (20); 0 disables it.
        max_temp_ratio: the guard's largest ``T_t / T_s`` (and ``T_s / T_t``), >= 1 (4.0); ``None``
            gives the authors' unguarded formula (maxima floored at 1e-6 only).
        logit_standardize: z-score both logits before both KD terms (their maxima are then > 0).

    Returns a dict with ``loss``, ``ce``, ``dtkd``, ``kd``, ``warmup`` (the factor applied) and the
    batch means of the temperatures, ``temp_teacher`` and ``temp_student``.
    """

    name = "dtkd"

    def __init__(
        self, tau: float = 4.0, dtkd_weight: float = 3.0, kd_weight: float = 1.0, ce_weight: float = 1.0,
        warmup_epochs: float = 20, max_temp_ratio: float | None = 4.0, logit_standardize: bool = False,
        check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau = check_positive("tau", tau, self.name)
        self.dtkd_weight = check_non_negative("dtkd_weight", dtkd_weight, self.name)
        self.kd_weight = check_non_negative("kd_weight", kd_weight, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.warmup_epochs = check_non_negative("warmup_epochs", warmup_epochs, self.name)
        if max_temp_ratio is not None:
            r = check_positive("max_temp_ratio", max_temp_ratio, self.name)
            if r < 1.0 or math.isinf(r):
                raise ValueError(
                    f"{self.name}: max_temp_ratio must be a finite number >= 1, got {max_temp_ratio!r}. "
                    f"It bounds T_teacher / T_student to [1/r, r]; use 4.0 (default) to keep fresh students "
                    f"trainable, or None for the authors' unguarded temperatures."
                )
            max_temp_ratio = r
        self.max_temp_ratio = max_temp_ratio
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        warmup = warmup_factor(epoch, self.warmup_epochs, self.name)
        x = self.prepare(student_logits, teacher_logits, target)
        with self.float32(x.student):
            zs, zt = x.student, x.teacher
            if self.logit_standardize:
                zs, zt = standardize_logits(zs), standardize_logits(zt)
            ce = cross_entropy(x.student, x.target)
            dtkd, t_t, t_s = dtkd_term(zs, zt, self.tau, self.max_temp_ratio)
            kd = kd_term(zs, zt, self.tau)
            loss = self.ce_weight * ce + warmup * (self.dtkd_weight * dtkd + self.kd_weight * kd)
        return {
            "loss": loss, "ce": ce.detach(), "dtkd": dtkd.detach(), "kd": kd.detach(),
            "warmup": torch.as_tensor(warmup, device=loss.device),
            "temp_teacher": t_t.detach().mean(), "temp_student": t_s.detach().mean(),
        }
