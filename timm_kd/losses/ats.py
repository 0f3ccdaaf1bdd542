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
  the target's argmax is then a wrong class and KD pulls against CE. The ``target_flip`` term
  logs how often that happens in a batch (it also counts samples the teacher misclassifies;
  ``induced_flip`` counts only the samples whose teacher logits rank the label first);
  ``timm_kd.diagnostics.suggest_ats_temperatures`` picks (τ1, τ2) that avoid it for a given
  teacher.
* Unlike a plain softmax, ATS is not invariant to adding a constant to all logits (``c / τ1`` and
  ``c / τ2`` differ). The authors apply it to raw logits and so do we; ``logit_standardize=True``
  (z-score the logits first, Sun et al. 2024) removes the dependence on shift and scale.

Defaults: τ1 = 4, τ2 = 3, s = 1, λ = 0.5. The authors' ``distill.py`` has no defaults of its own:
their ``train_distill_ats.py`` sweeps τ1 ∈ {1..6} × τ2 ∈ {1..5} with s = 1 and λ = 0.5, and their
MindSpore demo runs τ1 = 4, τ2 = 2. τ1 = 4, τ2 = 3 is the default setting recorded in the project's
METHODS.md.

ISATS (``isats``) is ATS whose τ2 is chosen for each sample, without gradient, from the teacher
logits: see ``isats_select_tau_wrong``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._base import DistillLoss, check_non_negative, check_positive
from ._fused import soft_target_objective
from ._registry import register_loss
from .standardize import STANDARDIZE_EPS, standardize_logits

__all__ = [
    "ATSLoss",
    "ISATSLoss",
    "ats_target_probs",
    "wrong_class_moments",
    "label_gap",
    "isats_candidates",
    "isats_select_tau_wrong",
]


def _per_sample_tau(
    value: float | torch.Tensor, name: str, like: torch.Tensor
) -> float | torch.Tensor:
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


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits must be a [batch, classes] tensor, got shape {tuple(logits.shape)}")
    if not torch.is_tensor(labels) or tuple(labels.shape) != (logits.shape[0],):
        raise ValueError(
            f"labels must be a [batch] tensor of class indices ({logits.shape[0]}), got "
            f"{getattr(labels, 'shape', type(labels))}; for soft targets pass target.argmax(-1)"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    return labels.long().unsqueeze(-1)


def ats_target_probs(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau_correct: float | torch.Tensor,
    tau_wrong: float | torch.Tensor,
) -> torch.Tensor:
    """The ATS teacher target: softmax with temperature τ1 on the label, τ2 on every other class.

    ``p_k = exp(z_k / τ_k) / Σ_j exp(z_j / τ_j)`` with ``τ_y = tau_correct``, ``τ_k = tau_wrong``
    for ``k != y``. Plain temperature scaling is ``tau_correct == tau_wrong``.

    Args:
        teacher_logits: ``[B, C]``; the result has its dtype (no detach: callers decide).
        labels: ``[B]`` class indices that pick the τ1 column (for soft targets, their argmax).
        tau_correct: τ1, a number or a ``[B]`` tensor (one temperature per sample).
        tau_wrong: τ2, a number or a ``[B]`` tensor (ISATS passes its per-sample choice).
            Numbers are checked (> 0); tensors are not (that would need a host sync).

    Returns:
        ``[B, C]`` probabilities, each row summing to 1.
    """
    idx = _check_labels(teacher_logits, labels)
    t1 = _per_sample_tau(tau_correct, "tau_correct", teacher_logits)
    t2 = _per_sample_tau(tau_wrong, "tau_wrong", teacher_logits)
    scaled = teacher_logits / t2  # a new tensor: the in-place scatter below is safe for autograd
    return scaled.scatter_(-1, idx, teacher_logits.gather(-1, idx) / t1).softmax(dim=-1)


def wrong_class_moments(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean and population variance (ddof = 0) of the wrong-class probabilities.

    ``probs`` is ``[B, C]`` with rows summing to 1. Over the ``C - 1`` entries ``k != y``::

        e = Σ_{k≠y} q_k / (C - 1) = (1 - q_y) / (C - 1)       the paper's derived average
        v = Σ_{k≠y} (q_k - e)^2 / (C - 1)                     the paper's derived variance

    Both are computed from the wrong classes themselves (two passes, not ``1 - q_y`` or
    ``E[q^2] - e^2``), so they keep full relative precision when ``q_y`` is close to 1.
    Returns two ``[B]`` tensors.
    """
    idx = _check_labels(probs, labels)
    C = probs.shape[-1]
    if C < 2:
        raise ValueError(f"wrong-class statistics need at least 2 classes, got {C}")
    wrong = probs.scatter(-1, idx, 0.0)
    mean = wrong.sum(dim=-1) / (C - 1)
    # the zeroed label slot adds (0 - mean)^2 to the sum of squares: take it out
    sq = (wrong - mean.unsqueeze(-1)).square().sum(dim=-1) - mean.square()
    return mean, (sq / (C - 1)).clamp_min(0.0)


def label_gap(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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


def _exp_sums(d: torch.Tensor, betas: Sequence[float]) -> dict[float, torch.Tensor]:
    """``{beta: sum_k exp(beta * d_k)}`` (``[B]``, as float64) for every ``beta`` in ``betas``.

    ``exp(2 beta d) = exp(beta d)^2``: a ``beta`` whose half is also wanted costs a squaring (or,
    for the last of a doubling chain, just the row norm), not a multiply and an ``exp``. ISATS's
    default grid (τ2 a factor √2 apart, each needing ``beta = 1/τ2`` and ``2/τ2``) needs two
    ``exp`` passes instead of five.
    """
    wanted = sorted(set(betas))

    def find(b: float) -> float | None:
        return next((w for w in wanted if math.isclose(w, b, rel_tol=1e-9)), None)

    sums: dict[float, torch.Tensor] = {}
    for beta in wanted:
        if beta in sums:
            continue
        e = torch.mul(d, beta).exp_()
        sums[beta] = e.sum(dim=1).double()
        nxt = find(2.0 * beta)
        while nxt is not None and nxt not in sums:
            sums[nxt] = torch.linalg.vector_norm(e, dim=1).double().square_()
            beta, nxt = nxt, find(2.0 * nxt)
            if nxt is None or nxt in sums:
                break
            e.square_()  # exp(beta d) for the new beta
    return sums


def isats_select_tau_wrong(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau_correct: float,
    candidates: Sequence[float],
    keep_label_argmax: bool = True,
) -> torch.Tensor:
    """ISATS: per sample, the τ2 among ``candidates`` that maximizes the derived variance.

    For each candidate τ2, the ATS target ``p = ats_target_probs(z, y, τ1, τ2)`` has the
    wrong-class population variance ``v(p) = (1 - p_y)^2 · v(p̃)`` (``wrong_class_moments``). Each
    sample gets the τ2 with the largest ``v(p)``, subject to:

    * ``keep_label_argmax`` (default): only candidates whose target keeps the label the argmax
      (``label_gap == 0``) compete. Without this, a small τ2 wins whenever the top wrong logit
      is positive, because a target that is one-hot on a wrong class has the largest possible
      variance: the "best" target would contradict the label. Samples where no candidate keeps
      the label on top (the teacher misclassifies them by a wide margin) get the candidate whose
      target has the smallest gap between the top wrong class and the label (``label_gap``).
    * ties go to the larger τ2 (candidates are tried largest first).

    The targets are never formed. With ``m`` the largest wrong-class logit, ``d_k = z_k - m``
    (``k != y``), ``beta = 1 / τ2``, ``S_j = sum_{k != y} exp(j beta d_k)`` and
    ``a = z_y / τ1 - beta m`` (the label's log-weight against the top wrong class, weight 1)::

        1 - p_y = S_1 / (S_1 + e^a),   v(p̃) = S_2 / ((C - 1) S_1^2) - 1 / (C - 1)^2
        label_gap = p_y - max_k p_k = min(0, e^a - 1) / (S_1 + e^a)

    so each candidate costs the row sums ``S_1`` and ``S_2`` of ``exp(beta d)`` (``_exp_sums``); the
    rest is ``[B]`` arithmetic in float64. Returns a ``[B]`` tensor of temperatures
    in the logits' dtype.
    """
    return _isats_search(teacher_logits, labels, tau_correct, candidates, keep_label_argmax)[0]


@torch.no_grad()
def _isats_search(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    tau_correct: float,
    candidates: Sequence[float],
    keep_label_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``isats_select_tau_wrong``'s choice, with its buffer ``d = z - m`` (``-inf`` on the label) and
    ``m`` ``[B, 1]``, the largest wrong-class logit, from which ``_isats_target`` builds the target."""
    cands = sorted((check_positive("tau_wrong candidate", c, "isats") for c in candidates), reverse=True)
    if not cands:
        raise ValueError("isats: the tau_wrong candidate set is empty; pass at least one temperature")
    idx = _check_labels(teacher_logits, labels)
    C = teacher_logits.shape[-1]
    if C < 2:
        raise ValueError(f"isats: wrong-class statistics need at least 2 classes, got {C}")
    d = teacher_logits.scatter(-1, idx, -math.inf)  # wrong classes only: exp() gives 0 on the label
    top = d.amax(dim=-1, keepdim=True)
    d = d.sub_(top)
    sums = _exp_sums(d, [b for c in cands for b in (1.0 / c, 2.0 / c)])
    s1 = torch.stack([_lookup(sums, 1.0 / c) for c in cands])  # [K, B]
    s2 = torch.stack([_lookup(sums, 2.0 / c) for c in cands])
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
    return taus[best], d, top


@torch.no_grad()
def _isats_target(
    d: torch.Tensor, top: torch.Tensor, teacher_logits: torch.Tensor, idx: torch.Tensor, tau_correct: float,
    tau_wrong: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ats_target_probs(z, y, τ1, τ2)`` built in place in the search's buffer ``d`` (``z - m`` with
    ``-inf`` on the label; ``m = top`` the largest wrong-class logit), without a fresh ``[B, C]`` tensor.

    The log-weights against the top wrong class are ``d_k / τ2`` (``k != y``, at most 0) and
    ``a = z_y / τ1 - m / τ2`` for the label, so ``max(a, 0)`` is the row maximum and the shift that
    keeps ``exp`` from overflowing. Returns ``(p, flipped, induced)``: ``[B]`` flags as
    ``label_gap(p) < 0`` and ``(label_gap(p) < 0) & (label_gap(z) >= 0)``."""
    t2 = tau_wrong.unsqueeze(1)
    z_y = teacher_logits.gather(1, idx)
    a = z_y / tau_correct - top / t2
    shift = a.clamp_min(0.0)
    p = torch.addcmul(-shift, d, 1.0 / t2, out=d).scatter_(1, idx, a - shift).exp_()
    # the flags of ``_ats_objective`` without another pass: the target puts a wrong class above the
    # label iff a < 0, and the teacher ranks the label first iff z_y >= m
    flipped = (a < 0).squeeze(1)
    return p.mul_(1.0 / p.sum(dim=1, keepdim=True)), flipped, flipped & (z_y >= top).squeeze(1)


def _lookup(sums: dict[float, torch.Tensor], beta: float) -> torch.Tensor:
    return next(v for b, v in sums.items() if math.isclose(b, beta, rel_tol=1e-9))


def _check_lambda(kd_weight: float, loss: str) -> float:
    lam = check_non_negative("kd_weight", kd_weight, loss)
    if lam > 1:
        raise ValueError(
            f"{loss}: kd_weight (λ) must be in [0, 1], got {kd_weight!r}: cross-entropy gets weight "
            f"1 - λ, which would be negative. The authors use λ = 0.5."
        )
    return lam


def _ats_objective(
    loss: DistillLoss,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    tau_wrong: float | None,
) -> dict[str, torch.Tensor]:
    """Shared forward of ``ats`` and ``isats``; ``tau_wrong=None`` selects τ2 per sample (ISATS)."""
    x = loss.prepare(student_logits, teacher_logits, target)
    out: dict[str, torch.Tensor] = {}
    with loss.float32(x.student):
        zt = standardize_logits(x.teacher) if loss.logit_standardize else x.teacher
        if tau_wrong is None:  # ISATS: the target is built in the search's buffer
            tau_wrong, d, top = _isats_search(
                zt, x.labels, loss.tau_correct, loss.tau_wrong_candidates, loss.keep_label_argmax
            )
            out["tau_wrong_mean"] = tau_wrong.mean()
            idx = x.labels.unsqueeze(1)
            p, flipped, induced = _isats_target(d, top, zt, idx, loss.tau_correct, tau_wrong)
        else:
            p = ats_target_probs(zt, x.labels, loss.tau_correct, tau_wrong)
            flipped = label_gap(p, x.labels) < 0
            # flips made by the temperatures, not by the teacher: its own logits rank the label first
            induced = flipped & (label_gap(zt, x.labels) >= 0)
        # (1 - λ) CE + λ s^2 softCE(p, softmax(z_s / s)) in one Function (``_fused.py``)
        total, ce, kd = soft_target_objective(
            x.student, x.labels, x.target if x.soft else None, p, loss.student_tau, 1.0 - loss.kd_weight,
            loss.kd_weight, None, STANDARDIZE_EPS if loss.logit_standardize else None,
        )
        out["target_flip"] = flipped.float().mean()
        out["induced_flip"] = induced.float().mean()
    return {"loss": total, "ce": ce, "kd": kd, **out}


@register_loss("ats")
class ATSLoss(DistillLoss):
    """ATS: ``(1 - λ) CE + λ s² · softCE(ats_target_probs(z_t, y, τ1, τ2), softmax(z_s / s))``.

    Args:
        tau_correct: τ1, the temperature of the label's logit (4.0).
        tau_wrong: τ2, the temperature of every wrong class's logit (3.0); τ1 > τ2 enlarges the
            spread of the wrong-class probabilities, τ1 = τ2 is plain temperature scaling.
        student_tau: s, the student's softmax temperature (1.0, all the authors' scripts).
        kd_weight: λ in [0, 1]; cross-entropy gets 1 - λ (0.5, the authors' scripts).
        logit_standardize: z-score teacher and student logits (``standardize_logits``) before
            the temperatures (Sun et al., CVPR 2024). Not in the ATS paper; off by default.
        check_inputs: validate labels and finiteness on every call (one host sync).

    Returns ``{"loss", "ce", "kd", "target_flip", "induced_flip"}``: ``target_flip`` is the
    fraction of the batch whose ATS target puts a wrong class above the label (see the module
    docstring), ``induced_flip`` the part of it where the teacher's own logits rank the label
    first (the flips the temperatures make; the engine warns when it exceeds 5 %).
    """

    name = "ats"

    def __init__(
        self,
        tau_correct: float = 4.0,
        tau_wrong: float = 3.0,
        student_tau: float = 1.0,
        kd_weight: float = 0.5,
        logit_standardize: bool = False,
        check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.tau_correct = check_positive("tau_correct", tau_correct, self.name)
        self.tau_wrong = check_positive("tau_wrong", tau_wrong, self.name)
        self.student_tau = check_positive("student_tau", student_tau, self.name)
        self.kd_weight = _check_lambda(kd_weight, self.name)
        self.logit_standardize = bool(logit_standardize)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        return _ats_objective(self, student_logits, teacher_logits, target, self.tau_wrong)


@register_loss("isats")
class ISATSLoss(DistillLoss):
    """ISATS: ATS with τ2 chosen per sample to maximize the wrong-class variance (arXiv 2405.13078).

    The follow-up paper chooses, per example, the wrong-class temperature that maximizes the
    variance of its wrong-class probabilities, without publishing the search in detail. Here:
    τ1 is fixed; for each sample τ2 is the candidate (a geometric grid, ``isats_candidates``)
    whose ATS target has the largest derived variance among those that keep the label the
    argmax (``isats_select_tau_wrong``), computed from the teacher logits without gradient. The
    rest is ``ats``: same KD term, same weights.

    Args:
        tau_correct: τ1 (4.0, as ``ats``).
        tau_wrong_min, tau_wrong_max: range of the τ2 grid (1.0 and τ1: the authors' grids keep
            τ2 >= 1, and τ2 > τ1 would shrink the wrong-class spread, the opposite of ATS).
        num_candidates: grid size (5: 4, 2.83, 2, 1.41, 1 for the default range). Each candidate
            costs two row sums of ``exp`` over the teacher logits (``isats_select_tau_wrong``).
        tau_wrong_candidates: an explicit candidate list instead of the grid.
        keep_label_argmax: exclude, per sample, candidates whose target puts a wrong class above
            the label (True; see ``isats_select_tau_wrong``).
        student_tau, kd_weight, logit_standardize, check_inputs: as ``ats``.

    Returns ``{"loss", "ce", "kd", "tau_wrong_mean", "target_flip", "induced_flip"}``; ``tau_wrong_mean`` is
    the batch mean of the chosen τ2.
    """

    name = "isats"

    def __init__(
        self,
        tau_correct: float = 4.0,
        tau_wrong_min: float = 1.0,
        tau_wrong_max: float | None = None,
        num_candidates: int = 5,
        tau_wrong_candidates: Sequence[float] | None = None,
        keep_label_argmax: bool = True,
        student_tau: float = 1.0,
        kd_weight: float = 0.5,
        logit_standardize: bool = False,
        check_inputs: bool = True,
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
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        return _ats_objective(self, student_logits, teacher_logits, target, None)
