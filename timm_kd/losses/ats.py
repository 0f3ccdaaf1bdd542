"""Asymmetric Temperature Scaling (ATS) and its instance-specific variant (ISATS).

ATS: Li, Fan, Song, Li, Li, Shao, Zhan; "Asymmetric Temperature Scaling Makes Larger Networks Teach
Well Again", NeurIPS 2022, arXiv 2210.04427; authors' code: github lxcnju/ATS-LargeKD
(``distill.py``, ``train_distill_ats.py``; ``tp_tau`` is τ1, ``t_tau`` is τ2, ``s_tau`` is s,
``lamb`` is λ).
ISATS: the extended version, Fan, Li, Zhan; "Exploring Dark Knowledge under Various Teacher
Capacities and Addressing Capacity Mismatch", arXiv 2405.13078, Front. Comput. Sci. 2026.

Math, per sample with teacher logits ``z``, student logits ``v``, label ``y`` and ``C`` classes::

    tau_k = tau_correct (τ1)  if k == y,   tau_wrong (τ2)  otherwise
    p_k   = exp(z_k / tau_k) / sum_j exp(z_j / tau_j)          ATS teacher target
    KD    = s^2 * sum_k -p_k log softmax(v / s)_k               soft cross-entropy, batch mean
    loss  = (1 - λ) * CE(v, y) + λ * KD

* The ground-truth label ``y`` picks the τ1 column, not the teacher's argmax. With soft targets
  (mixup/cutmix ``[B, C]``) ``y`` is the soft target's argmax (the class with the larger mixing
  weight); cross-entropy still uses the full soft target.
* The student uses one plain temperature ``s`` (1.0 in all the authors' scripts) and the KD term
  is multiplied by ``s^2`` only: there is no τ1² or τ2² factor, as in the authors' code.
* The KD term is the authors' soft cross-entropy, not KL(p || q): the two differ by the teacher
  entropy, a constant for the student, so value differs and gradient is identical.
* τ1 = τ2 = s = T gives Hinton KD at temperature T (same student gradient as ``kd``).
* With τ1 > τ2 the label's scaled logit ``z_y / τ1`` can drop below a wrong class's ``z_k / τ2``:
  the target's argmax is then a wrong class and KD pulls against CE (logged as ``target_flip``;
  ``diagnostics.suggest_ats_temperatures`` picks (τ1, τ2) that avoid it for a given teacher).
* ATS is not invariant to adding a constant to all logits (``c / τ1`` and ``c / τ2`` differ). The
  authors apply it to raw logits and so do we; ``logit_standardize=True`` z-scores them first.

Defaults: τ1 = 4, τ2 = 3, s = 1, λ = 0.5, the argparse defaults of the authors' MindSpore port
(``run_distill.py``). Their PyTorch ``distill.py`` has no defaults of its own: their
``train_distill_ats.py`` sweeps τ1 ∈ {1..6} × τ2 ∈ {1..5} with s = 1 and λ = 0.5, and their PyTorch
demo runs τ1 = 4, τ2 = 2.
ISATS (``isats``) is ATS with τ2 chosen per sample from the teacher logits (``ISATSLoss``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy
from ._registry import LossCard, register_loss
from .functional import soft_cross_entropy, standardize_logits

__all__ = [
    "ATSLoss", "ISATSLoss", "ats_target_probs", "isats_candidates", "isats_select_tau_wrong", "label_gap",
    "wrong_class_moments",
]


def _per_sample_tau(value: float | Tensor, name: str, like: Tensor) -> float | Tensor:
    """A float temperature, or a ``[B]`` tensor as a ``[B, 1]`` column in ``like``'s dtype/device."""
    if torch.is_tensor(value):
        if value.dim() == 0:
            return check_positive(name, value.item())
        batch = like.shape[0]
        if tuple(value.shape) != (batch,):
            raise ValueError(
                f"{name} must be a number or a [batch] tensor with one temperature per sample "
                f"({batch}), got shape {tuple(value.shape)}"
            )
        return value.to(device=like.device, dtype=like.dtype).unsqueeze(-1)
    return check_positive(name, value)


def _check_labels(logits: Tensor, labels: Tensor, min_classes: int = 1, where: str = "") -> Tensor:
    """``labels`` as a ``[B, 1]`` int64 index column for ``[B, C]`` ``logits``, else a ValueError."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be a [batch, classes] tensor, got shape {tuple(logits.shape)}")
    if logits.shape[-1] < min_classes:
        raise ValueError(f"{where}wrong-class statistics need at least 2 classes, got {logits.shape[-1]}")
    if not torch.is_tensor(labels) or tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(
            f"labels must be a [batch] tensor of class indices ({logits.shape[0]}), got "
            f"{getattr(labels, 'shape', type(labels))}; for soft targets pass target.argmax(-1)"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    return labels.long().unsqueeze(-1)


def ats_target_probs(
    teacher_logits: Tensor, labels: Tensor, tau_correct: float | Tensor, tau_wrong: float | Tensor
) -> Tensor:
    """The ATS teacher target ``[B, C]``: ``p_k = exp(z_k / τ_k) / Σ_j exp(z_j / τ_j)`` with
    ``τ_y = tau_correct`` (τ1) on the label ``labels`` (``[B]`` class indices) and ``τ_k = tau_wrong``
    (τ2) elsewhere; plain temperature scaling is ``τ1 == τ2``.

    Temperatures are numbers (checked > 0) or ``[B]`` tensors (unchecked: that would need a host
    sync; ISATS passes its per-sample τ2). The result has ``teacher_logits``' dtype, not detached.
    """
    idx = _check_labels(teacher_logits, labels)
    t1 = _per_sample_tau(tau_correct, "tau_correct", teacher_logits)
    t2 = _per_sample_tau(tau_wrong, "tau_wrong", teacher_logits)
    scaled = teacher_logits / t2  # a new tensor: the in-place scatter below is safe for autograd
    return scaled.scatter_(-1, idx, teacher_logits.gather(-1, idx) / t1).softmax(dim=-1)


def wrong_class_moments(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample mean and population variance (ddof = 0) of the wrong-class probabilities.

    ``probs`` is ``[B, C]`` with rows summing to 1. Over the ``C - 1`` entries ``k != y``::

        e = Σ_{k≠y} q_k / (C - 1) = (1 - q_y) / (C - 1)       the paper's derived average
        v = Σ_{k≠y} (q_k - e)^2 / (C - 1)                     the paper's derived variance

    Both are computed from the wrong classes themselves (two passes, not ``1 - q_y`` or
    ``E[q^2] - e^2``), so they keep full relative precision when ``q_y`` is close to 1.
    Returns two ``[B]`` tensors.
    """
    idx = _check_labels(probs, labels, min_classes=2)
    C = probs.shape[-1]
    wrong = probs.scatter(-1, idx, 0.0)
    mean = wrong.sum(dim=-1) / (C - 1)
    # the zeroed label slot adds (0 - mean)^2 to the sum of squares: take it out
    sq = (wrong - mean.unsqueeze(-1)).square().sum(dim=-1) - mean.square()
    return mean, (sq / (C - 1)).clamp_min(0.0)


def label_gap(probs: Tensor, labels: Tensor) -> Tensor:
    """``q_y - max_k q_k`` per sample (``[B]``): 0 where the label is the argmax (ties included),
    negative by how far the top wrong class is above the label otherwise."""
    idx = _check_labels(probs, labels)
    return probs.gather(-1, idx).squeeze(-1) - probs.amax(dim=-1)


def isats_candidates(tau_min: float, tau_max: float, num: int) -> tuple[float, ...]:
    """``num`` geometrically spaced τ2 candidates from ``tau_max`` down to ``tau_min``.

    ``tau_k = tau_max * (tau_min / tau_max) ** (k / (num - 1))``, k = 0..num-1, largest first;
    with ``isats``' defaults (1, τ1 = 4, 5): 4, 2.83, 2, 1.41, 1 (neighbours a factor √2 apart;
    the authors' grid points 1, 2, 4 and their demo's τ2 = 2 are on it).
    """
    tau_min = check_positive("tau_wrong_min", tau_min, "isats")
    tau_max = check_positive("tau_wrong_max", tau_max, "isats")
    if tau_min > tau_max:
        raise ValueError(
            f"isats: tau_wrong_min ({tau_min:g}) is larger than tau_wrong_max ({tau_max:g}, which "
            f"defaults to tau_correct): lower tau_wrong_min or raise tau_wrong_max"
        )
    if int(num) != num or num < 1:
        raise ValueError(f"isats: num_candidates must be an integer >= 1, got {num!r}")
    num = int(num)
    if num == 1 or tau_min == tau_max:
        return (tau_max,)
    return tuple(tau_max * (tau_min / tau_max) ** (k / (num - 1)) for k in range(num))


@torch.no_grad()
def isats_select_tau_wrong(
    teacher_logits: Tensor, labels: Tensor, tau_correct: float, candidates: Sequence[float],
    keep_label_argmax: bool = True,
) -> Tensor:
    """ISATS: per sample, the τ2 among ``candidates`` that maximizes the derived variance.

    The search is ours (the paper does not publish one). For each candidate τ2 the ATS target
    ``p = ats_target_probs(z, y, τ1, τ2)`` has the wrong-class population variance
    ``v(p) = (1 - p_y)^2 · v(p̃)`` (``wrong_class_moments``); each sample gets the τ2 with the
    largest ``v(p)``, ties to the larger τ2, subject to:

    * ``keep_label_argmax`` (default): only candidates whose target keeps the label the argmax
      (``label_gap == 0``) compete; otherwise a small τ2 wins whenever the top wrong logit is
      positive (a one-hot target on a wrong class has the largest variance). Samples where no
      candidate keeps the label on top get the candidate with the smallest ``label_gap``.

    The targets are never formed. With ``m`` the largest wrong-class logit, ``d_k = z_k - m``
    (``k != y``), ``beta = 1 / τ2``, ``S_j = sum_{k != y} exp(j beta d_k)`` and
    ``a = z_y / τ1 - beta m`` (the label's log-weight against the top wrong class, weight 1)::

        1 - p_y = S_1 / (S_1 + e^a),   v(p̃) = S_2 / ((C - 1) S_1^2) - 1 / (C - 1)^2
        label_gap = p_y - max_k p_k = min(0, e^a - 1) / (S_1 + e^a)

    so each candidate needs the row sums ``S_1`` and ``S_2`` of ``exp(beta d)``; the rest is ``[B]``
    arithmetic in float64. Returns a ``[B]`` tensor of temperatures in the logits' dtype, without
    gradient.
    """
    cands = sorted((check_positive("tau_wrong candidate", c, "isats") for c in candidates), reverse=True)
    if not cands:
        raise ValueError("isats: the tau_wrong candidate set is empty; pass at least one temperature")
    idx = _check_labels(teacher_logits, labels, min_classes=2, where="isats: ")
    C = teacher_logits.shape[-1]
    d = teacher_logits.scatter(-1, idx, -math.inf)  # wrong classes only: exp() gives 0 on the label
    top = d.amax(dim=-1, keepdim=True)
    d = d - top
    s1, s2 = [], []
    for c in cands:
        e = torch.exp(d / c)
        s1.append(e.sum(dim=-1))
        s2.append(e.square().sum(dim=-1))
    s1, s2 = torch.stack(s1).double(), torch.stack(s2).double()  # [K, B]
    beta = torch.tensor([1.0 / c for c in cands], dtype=torch.float64, device=d.device).unsqueeze(1)
    z_y = teacher_logits.gather(-1, idx).squeeze(-1).double()
    a = z_y / tau_correct - beta * top.squeeze(-1).double()
    shift = a.clamp_min(0.0)  # the normalizer (S_1 + e^a) e^-shift cannot overflow
    e_a, e_0 = torch.exp(a - shift), torch.exp(-shift)
    norm = s1 * e_0 + e_a
    wrong = s1 * e_0 / norm  # 1 - p_y
    inherent = (s2 / (s1 * s1) / (C - 1) - 1.0 / (C - 1) ** 2).clamp_min(0.0)
    score = wrong * wrong * inherent  # [K, B]
    gap = (e_a - e_0).clamp_max(0.0) / norm
    if keep_label_argmax:
        ok = gap >= 0
        score = torch.where(ok, score, torch.full_like(score, -math.inf))
        score = torch.where(ok.any(dim=0, keepdim=True), score, gap)
    best = score.argmax(dim=0)  # first maximum: the largest τ2 among ties
    taus = torch.tensor(cands, dtype=teacher_logits.dtype, device=teacher_logits.device)
    return taus[best]


def _check_lambda(kd_weight: float, loss: str) -> float:
    """λ as a float if it is in [0, 1], else a ValueError with the fix."""
    lam = check_non_negative("kd_weight", kd_weight, loss)
    if lam > 1:
        raise ValueError(
            f"{loss}: kd_weight (λ) must be in [0, 1], got {kd_weight!r}: cross-entropy gets weight "
            f"1 - λ, which would be negative. The authors use λ = 0.5."
        )
    return lam


def _ats_objective(
    loss: DistillLoss, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, tau_wrong: float | None
) -> dict[str, Tensor]:
    """Shared forward of ``ats`` and ``isats``; ``tau_wrong=None`` selects τ2 per sample (ISATS)."""
    x = loss.prepare(student_logits, teacher_logits, target)
    out: dict[str, Tensor] = {}
    with loss.float32(x.student):
        zs, zt = x.student, x.teacher
        if loss.logit_standardize:
            zs, zt = standardize_logits(zs), standardize_logits(zt)
        if tau_wrong is None:
            tau_wrong = isats_select_tau_wrong(
                zt, x.labels, loss.tau_correct, loss.tau_wrong_candidates, loss.keep_label_argmax
            )
            out["tau_wrong_mean"] = tau_wrong.mean()
        p = ats_target_probs(zt, x.labels, loss.tau_correct, tau_wrong)
        flipped = label_gap(p, x.labels) < 0
        # flips made by the temperatures, not by the teacher: its own logits rank the label first
        induced = flipped & (label_gap(zt, x.labels) >= 0)
        s = loss.student_tau
        ce = cross_entropy(x.student, x.target)
        kd = soft_cross_entropy(p, F.log_softmax(zs / s, dim=-1)) * s**2
        total = (1.0 - loss.kd_weight) * ce + loss.kd_weight * kd
        out["target_flip"] = flipped.float().mean()
        out["induced_flip"] = induced.float().mean()
    return {"loss": total, "ce": ce.detach(), "kd": kd.detach(), **out}


@register_loss(
    "ats",
    card=LossCard(
        title="Asymmetric Temperature Scaling (ATS)", paper="Li et al., NeurIPS 2022",
        arxiv="2210.04427", cites=("li2022ats",),
        summary="The teacher's targets were softened with two temperatures, one for the labelled class and "
        "a lower one for every other class, which keeps the teacher's wrong-class probabilities distinct "
        "(the knowledge a large teacher otherwise flattens away).",
    ),
)
class ATSLoss(DistillLoss):
    """ATS: ``(1 - λ) CE + λ s² · softCE(ats_target_probs(z_t, y, τ1, τ2), softmax(z_s / s))``.

    Args:
        tau_correct: τ1, the temperature of the label's logit (4.0, the authors' MindSpore port).
        tau_wrong: τ2, the temperature of every wrong class's logit (3.0, the authors' MindSpore
            port's ``run_distill.py``; no default in their PyTorch code).
        student_tau: s, the student's softmax temperature (1.0, all the authors' scripts).
        kd_weight: λ in [0, 1]; cross-entropy gets 1 - λ (0.5, the authors' scripts).
        logit_standardize: z-score both logits before the temperatures (not in the ATS paper).

    Returns ``{"loss", "ce", "kd", "target_flip", "induced_flip"}``: ``target_flip`` is the
    fraction of the batch whose ATS target puts a wrong class above the label, ``induced_flip``
    the part of it where the teacher's own logits rank the label first (the flips the
    temperatures make; the engine warns when it exceeds 5 %).
    """

    name = "ats"

    def __init__(
        self, tau_correct: float = 4.0, tau_wrong: float = 3.0, student_tau: float = 1.0,
        kd_weight: float = 0.5, logit_standardize: bool = False, check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau_correct = check_positive("tau_correct", tau_correct, self.name)
        self.tau_wrong = check_positive("tau_wrong", tau_wrong, self.name)
        self.student_tau = check_positive("student_tau", student_tau, self.name)
        self.kd_weight = _check_lambda(kd_weight, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        return _ats_objective(self, student_logits, teacher_logits, target, self.tau_wrong)


@register_loss(
    "isats",
    card=LossCard(
        title="Instance-specific Asymmetric Temperature Scaling (ISATS)", paper="Fan, Li & Zhan, arXiv 2024",
        arxiv="2405.13078", cites=("fan2024isats", "li2022ats"),
        summary="As in ATS, the labelled class and the wrong classes got different temperatures; the "
        "wrong-class temperature was chosen per image to maximise the spread of the teacher's "
        "wrong-class probabilities.",
    ),
)
class ISATSLoss(DistillLoss):
    """ISATS: ATS with τ2 chosen per sample to maximize the wrong-class variance (arXiv 2405.13078).

    τ1 is fixed; each sample's τ2 is picked from a geometric grid (``isats_candidates``) by
    ``isats_select_tau_wrong``, from the teacher logits without gradient. The rest is ``ats``.

    Args:
        tau_correct: τ1 (4.0, as ``ats``).
        tau_wrong_min, tau_wrong_max: range of the τ2 grid (1.0 and τ1: the authors' grids keep
            τ2 >= 1, and τ2 > τ1 would shrink the wrong-class spread, the opposite of ATS).
        num_candidates: grid size (5: 4, 2.83, 2, 1.41, 1 for the default range).
        tau_wrong_candidates: an explicit candidate list instead of the grid.
        keep_label_argmax: exclude, per sample, candidates whose target puts a wrong class above
            the label (True; see ``isats_select_tau_wrong``).
        student_tau, kd_weight, logit_standardize: as ``ats``.

    Returns ``ats``' terms and ``tau_wrong_mean``, the batch mean of the chosen τ2.
    """

    name = "isats"

    def __init__(
        self, tau_correct: float = 4.0, tau_wrong_min: float = 1.0, tau_wrong_max: float | None = None,
        num_candidates: int = 5, tau_wrong_candidates: Sequence[float] | None = None,
        keep_label_argmax: bool = True, student_tau: float = 1.0, kd_weight: float = 0.5,
        logit_standardize: bool = False, check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau_correct = check_positive("tau_correct", tau_correct, self.name)
        if tau_wrong_candidates is not None:
            cands = tuple(check_positive("tau_wrong_candidates", c, self.name) for c in tau_wrong_candidates)
            if not cands:
                raise ValueError("isats: tau_wrong_candidates is empty; pass at least one temperature")
            self.tau_wrong_candidates = tuple(sorted(cands, reverse=True))
        else:
            tmax = self.tau_correct if tau_wrong_max is None else tau_wrong_max
            self.tau_wrong_candidates = isats_candidates(tau_wrong_min, tmax, num_candidates)
        self.keep_label_argmax = bool(keep_label_argmax)
        self.student_tau = check_positive("student_tau", student_tau, self.name)
        self.kd_weight = _check_lambda(kd_weight, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        return _ats_objective(self, student_logits, teacher_logits, target, None)
