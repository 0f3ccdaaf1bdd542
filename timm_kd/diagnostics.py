"""Teacher diagnostics from the ATS paper: what temperature scaling does to the wrong classes.

Li et al., "Asymmetric Temperature Scaling Makes Larger Networks Teach Well Again", NeurIPS 2022,
arXiv 2210.04427, Section 4 and Figure 7 (authors' plot script: lxcnju/ATS-LargeKD
``plot_fig7_fig13.py``). For a teacher target ``q`` (plain temperature scaling, TS, or ATS with
τ1 on the label and τ2 on the other classes; ``timm_kd.losses.ats_target_probs``) and label ``y``
over ``C`` classes, per sample:

* derived average ``e(q) = mean_{k≠y} q_k = (1 - q_y) / (C - 1)``: how much probability the
  wrong classes get (the paper's "smooth regularization").
* derived variance ``v(q)``: population variance (ddof = 0) of the ``C - 1`` wrong-class
  probabilities, and derived std ``σ(q) = sqrt(v(q))``, what Figure 7 plots: how distinct the
  wrong classes are ("class discriminability").
* inherent variance ``v(q̃)``, with ``q̃`` the wrong-class probabilities renormalised to sum to 1
  (``q̃ = softmax(z_{k≠y} / τ2)``: it depends on τ2 only). Then ``v(q) = (1 - q_y)^2 · v(q̃)``.

Raising the temperature raises ``e(q)`` but flattens ``q̃``; plain TS (τ1 = τ2) cannot get both,
ATS (τ1 > τ2) can: a high τ1 moves mass to the wrong classes (for a positive label logit, the
usual case: ``z_y / τ1`` falls as τ1 rises), a low τ2 keeps them distinct. The
statistics here are averaged over samples (per-sample values with ``reduction="none"``), like
the authors' script (numpy's per-sample std, ddof = 0, then the mean over samples).

ATS has a failure mode: with τ1 > τ2 a wrong class can overtake the label (``z_k / τ2 > z_y / τ1``),
and the KD term then pulls against cross-entropy. ``wrong_class_stats`` counts these samples
(``induced_flip``), and ``suggest_ats_temperatures`` picks (τ1, τ2) for a given teacher that avoid
them; it refuses (``TeacherAtChanceError``) logits that carry no class information, a teacher at
chance or with near-uniform logits (``uninformative_teacher``), rather than fit temperatures to
noise. Everything takes teacher logits ``[N, C]`` (collect them with the teacher in eval mode) and
targets ``[N]`` (or soft ``[N, C]``, reduced to their argmax), and computes in float64.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .losses import ats_target_probs, label_gap, wrong_class_moments

__all__ = [
    "ATS_AUTHORS_TAUS",
    "FIG7_TAUS",
    "wrong_class_stats",
    "temperature_sweep",
    "format_sweep_table",
    "plot_temperature_sweep",
    "ATSSuggestion",
    "TeacherAtChanceError",
    "suggest_ats_temperatures",
    "uninformative_teacher",
    "check_teacher_logits",
    "chance_bound",
]

#: The ATS authors' (τ1, τ2): the argparse defaults of their MindSpore port, and ``ats``'s defaults.
ATS_AUTHORS_TAUS: tuple[float, float] = (4.0, 3.0)

#: The temperature grid of the paper's Figure 7 (authors' ``plot_fig7_fig13.py``).
FIG7_TAUS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.4) + tuple(0.5 * k for k in range(1, 21))

#: The ATS curve of Figure 7 uses τ1 = 1.25 τ and τ2 = 0.75 τ at each temperature τ.
FIG7_ATS_SCALES: tuple[float, float] = (1.25, 0.75)

_PER_SAMPLE_KEYS = (
    "label_prob",
    "derived_average",
    "derived_std",
    "derived_variance",
    "inherent_variance",
    "target_flip",
    "induced_flip",
    "teacher_correct",
)


def check_teacher_logits(teacher_logits: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits as float64 ``[N, C]`` and labels ``[N]``, with errors that say what to fix."""
    z = torch.as_tensor(teacher_logits)
    if z.dim() != 2 or z.shape[0] < 1:
        raise ValueError(
            f"teacher_logits must be an [N, classes] array of logits, got shape {tuple(z.shape)}; "
            f"stack the teacher's outputs over your samples first"
        )
    if not z.is_floating_point():
        raise ValueError(f"teacher_logits must be floating point logits, got dtype {z.dtype}")
    N, C = z.shape
    if C < 2:
        raise ValueError(f"teacher_logits has {C} class; wrong-class statistics need at least 2")
    z = z.detach().to(dtype=torch.float64)
    if not bool(torch.isfinite(torch.stack(torch.aminmax(z))).all()):  # NaN/inf reach min or max
        raise ValueError(
            "teacher_logits contain NaN or inf: check the teacher's weights and input normalization, "
            "or compute its logits in float32"
        )
    t = torch.as_tensor(target).detach()
    if t.dim() == 2:
        if tuple(t.shape) != (N, C):
            raise ValueError(f"soft target shape {tuple(t.shape)} does not match teacher_logits {(N, C)}")
        labels = t.argmax(dim=-1)
    elif t.dim() == 1:
        if t.shape[0] != N:
            raise ValueError(f"target has {t.shape[0]} labels for {N} rows of teacher_logits")
        if t.is_floating_point():
            raise ValueError(f"target must hold integer class indices, got dtype {t.dtype}; use .long()")
        labels = t.long()
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= C:
            raise ValueError(
                f"target label {lo if lo < 0 else hi} is outside [0, {C}) for teacher_logits with {C} "
                f"classes; check that the labels index the teacher's classes"
            )
    else:
        raise ValueError(f"target must be labels [N] or soft targets [N, C], got shape {tuple(t.shape)}")
    return z, labels.to(z.device)


def _check_tau(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite temperature > 0, got {value!r}")
    return v


def _per_sample_stats(
    z: torch.Tensor, labels: torch.Tensor, tau_correct: float, tau_wrong: float, chunk_size: int
) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {k: [] for k in _PER_SAMPLE_KEYS}
    for start in range(0, z.shape[0], chunk_size):
        zc, yc = z[start : start + chunk_size], labels[start : start + chunk_size]
        idx = yc.unsqueeze(-1)
        q = ats_target_probs(zc, yc, tau_correct, tau_wrong)
        mean, var = wrong_class_moments(q, yc)
        # q̃: the wrong classes alone at τ2, renormalised (the label column removed)
        q_tilde = (zc / tau_wrong).scatter(-1, idx, -math.inf).softmax(dim=-1)
        _, inherent = wrong_class_moments(q_tilde, yc)
        flip = label_gap(q, yc) < 0
        correct = zc.gather(-1, idx).squeeze(-1) >= zc.amax(dim=-1)
        out["label_prob"].append(q.gather(-1, idx).squeeze(-1))
        out["derived_average"].append(mean)
        out["derived_std"].append(var.sqrt())
        out["derived_variance"].append(var)
        out["inherent_variance"].append(inherent)
        out["target_flip"].append(flip.double())
        out["induced_flip"].append((flip & correct).double())
        out["teacher_correct"].append(correct.double())
    return {k: torch.cat(v) for k, v in out.items()}


def wrong_class_stats(
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    tau_correct: float,
    tau_wrong: float,
    *,
    reduction: str = "mean",
    chunk_size: int = 4096,
) -> dict[str, Any]:
    """The paper's wrong-class statistics of the (A)TS teacher target. TS is τ1 = τ2.

    Args:
        teacher_logits: ``[N, C]`` teacher logits (tensor or array).
        target: ``[N]`` labels, or ``[N, C]`` soft targets (their argmax is the label).
        tau_correct: τ1, the temperature of the label's logit.
        tau_wrong: τ2, the temperature of the other logits.
        reduction: ``"mean"`` (floats, averaged over samples) or ``"none"`` (``[N]`` tensors).
        chunk_size: rows processed at once (bounds memory for large N·C).

    Returns a dict with, per sample or averaged:
        ``derived_average`` e(q) = (1 - q_y)/(C - 1); ``derived_std`` σ(q) and
        ``derived_variance`` v(q) (population, over the C - 1 wrong classes);
        ``inherent_variance`` v(q̃); ``label_prob`` q_y; ``target_flip`` (1 where a wrong class
        has a higher target probability than the label); ``induced_flip`` (a flip on a sample
        whose raw teacher logits rank the label first: a flip made by ATS, never by TS);
        ``teacher_correct`` (label is the teacher's argmax). The mean dict also holds
        ``tau_correct``, ``tau_wrong``, ``num_samples``, ``num_classes``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    t1 = _check_tau("tau_correct", tau_correct)
    t2 = _check_tau("tau_wrong", tau_wrong)
    z, labels = check_teacher_logits(teacher_logits, target)
    if reduction == "none":
        return _per_sample_stats(z, labels, t1, t2, int(chunk_size))
    return _mean_stats(z, labels, t1, t2, int(chunk_size))


def _mean_stats(
    z: torch.Tensor, labels: torch.Tensor, tau_correct: float, tau_wrong: float, chunk_size: int = 4096
) -> dict[str, Any]:
    """``wrong_class_stats(..., reduction="mean")`` on checked inputs."""
    per = _per_sample_stats(z, labels, tau_correct, tau_wrong, chunk_size)
    stats: dict[str, Any] = {"tau_correct": tau_correct, "tau_wrong": tau_wrong}
    stats.update({k: float(v.mean()) for k, v in per.items()})
    stats["num_samples"], stats["num_classes"] = int(z.shape[0]), int(z.shape[1])
    return stats


def temperature_sweep(
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    taus: Sequence[float] = FIG7_TAUS,
    *,
    ats_scales: tuple[float, float] = FIG7_ATS_SCALES,
    name: str = "teacher",
    plot_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Wrong-class statistics of TS and ATS over a temperature grid (the paper's Figure 7).

    At each ``tau``: a TS row (τ1 = τ2 = tau) and an ATS row (τ1 = ``ats_scales[0]``·tau,
    τ2 = ``ats_scales[1]``·tau; 1.25 and 0.75 in the authors' plot script). Each row is
    ``wrong_class_stats``' mean dict plus ``teacher`` (``name``), ``method`` ("TS"/"ATS") and
    ``tau``. Concatenate the rows of several teachers (different ``name``) to plot them side by
    side. Print with ``format_sweep_table``; ``plot_path`` also saves the PNG plot
    (``plot_temperature_sweep``).
    """
    if not taus:
        raise ValueError("taus is empty; pass temperatures such as timm_kd.diagnostics.FIG7_TAUS")
    c_scale = _check_tau("ats_scales[0]", ats_scales[0])
    w_scale = _check_tau("ats_scales[1]", ats_scales[1])
    grid = [_check_tau("taus", t) for t in taus]
    z, labels = check_teacher_logits(teacher_logits, target)
    rows = []
    for tau in grid:
        for method, t1, t2 in (("TS", tau, tau), ("ATS", c_scale * tau, w_scale * tau)):
            row = {"teacher": str(name), "method": method, "tau": tau}
            row.update(_mean_stats(z, labels, t1, t2))
            rows.append(row)
    if plot_path is not None:
        plot_temperature_sweep(rows, plot_path)
    return rows


_TABLE_COLUMNS = (
    ("teacher", "{}"),
    ("method", "{}"),
    ("tau", "{:g}"),
    ("tau_correct", "{:.3g}"),
    ("tau_wrong", "{:.3g}"),
    ("label_prob", "{:.4f}"),
    ("derived_average", "{:.3e}"),
    ("derived_std", "{:.3e}"),
    ("inherent_variance", "{:.3e}"),
    ("induced_flip", "{:.2%}"),
)


def format_sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of ``temperature_sweep`` rows (or any ``wrong_class_stats`` dicts)."""
    cols = [(k, f) for k, f in _TABLE_COLUMNS if any(k in r for r in rows)]
    cells = [[k for k, _ in cols]] + [[f.format(r[k]) if k in r else "" for k, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_MARK_COLORS = ("#1f77b4", "#2ca02c", "#d62728", "#ff7f0e")


def plot_temperature_sweep(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    dpi: int = 120,
    marks: Mapping[str, float] | None = None,
) -> str:
    """Save the Figure 7 plot of ``temperature_sweep`` rows as a PNG; returns the path.

    One panel per (teacher, method), in order of appearance: derived average e(q) (solid, left
    axis) and derived std σ(q) (dashed, right axis) against the temperature τ (log scale), with
    the same axis limits in every panel so the panels compare. Uses matplotlib's Agg canvas
    directly (no pyplot, no global backend change); matplotlib is imported only here.

    ``marks`` (label -> temperature), e.g. ``{"suggested τ1": 4.0, "suggested τ2": 2.5}``, draws a
    dotted vertical line per temperature in every panel, labelled with its value. In the TS panel
    the curves there are plain TS at that temperature; in the ATS panel the x axis is the sweep's
    τ (τ1 = 1.25 τ, τ2 = 0.75 τ), so a mark shows where a temperature falls on that grid.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the [demo] extra
        raise ImportError("plotting needs matplotlib: pip install 'timm-kd[demo]'") from e
    if not rows:
        raise ValueError("no rows to plot; pass the output of temperature_sweep")
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        panels.setdefault((str(r.get("teacher", "teacher")), str(r["method"])), []).append(r)
    e_all = [r["derived_average"] for r in rows]
    s_all = [r["derived_std"] for r in rows]
    fig = Figure(figsize=(3.2 * len(panels), 2.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, ((teacher, method), pr) in enumerate(panels.items()):
        pr = sorted(pr, key=lambda r: r["tau"])
        ax = axes[i]
        twin = ax.twinx()
        taus = [r["tau"] for r in pr]
        ax.plot(taus, [r["derived_average"] for r in pr], color="#660066", label="e(q)")
        twin.plot(taus, [r["derived_std"] for r in pr], color="#663333", linestyle="--", label="σ(q)")
        ax.set_xscale("log")
        ax.set_ylim(0, max(e_all) * 1.2)
        twin.set_ylim(0, max(s_all) * 1.2)
        ax.set_xlabel("temperature τ")
        ax.set_title(f"{teacher}: {method}")
        for j, (name, tau) in enumerate((marks or {}).items()):
            ax.axvline(float(tau), color=_MARK_COLORS[j % len(_MARK_COLORS)], linestyle=":",
                       label=f"{name} = {float(tau):g}")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        if i == 0:
            ax.set_ylabel("derived average e(q)")
        else:
            ax.tick_params(labelleft=False)
        if i == len(panels) - 1:
            twin.set_ylabel("derived std σ(q)")
        else:
            twin.tick_params(labelright=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=dpi)
    return path


class TeacherAtChanceError(ValueError):
    """The teacher's logits carry no class information (top-1 at chance, or near-uniform logits):
    no temperature can be suggested from them."""


#: near-uniform logits: the teacher's softmax holds less than this share of the information of a
#: one-hot target, ``mean KL(softmax(z / τ) || uniform) < share * log C``
_UNIFORM_INFO_SHARE = 0.01


def chance_bound(num_classes: int, num_samples: int) -> float:
    """The top-1 (a fraction) a teacher must reach on ``num_samples`` to be clearly above chance
    ``p0 = 1 / num_classes``: ``p0 + max(3 sd, min(p0, (1 - p0) / 4))`` with the binomial
    ``sd = sqrt(p0 (1 - p0) / num_samples)``; twice chance for many classes, 62.5 % for two."""
    p0 = 1.0 / max(int(num_classes), 1)
    return p0 + max(3.0 * math.sqrt(p0 * (1.0 - p0) / max(int(num_samples), 1)), min(p0, (1.0 - p0) / 4.0))


def uninformative_teacher(
    teacher_logits: torch.Tensor, target: torch.Tensor, *, tau: float = 1.0
) -> str | None:
    """Why these teacher logits carry no class information, or ``None`` when they do.

    Two tests, on ``[N, C]`` logits and ``[N]`` labels (or soft ``[N, C]`` targets):

    * **top-1 at chance**: the share of rows whose first argmax is the label, ``a``, is not clearly
      above chance ``p0 = 1 / C``: ``a < p0 + max(3 sd, min(p0, (1 - p0) / 4))`` with the binomial
      ``sd = sqrt(p0 (1 - p0) / N)``; twice chance for many classes, 62.5 % for two.
    * **near-uniform logits**: at temperature ``tau`` (the sharpest a suggestion would use) the
      softmax is almost flat, ``mean_n KL(softmax(z_n / tau) || uniform) < 0.01 log C``: less than
      1 % of a one-hot target's information. Constant logits pass the top-1 test on ties
      (every class is "the maximum"), so this test is the one that catches them.

    A wrong class order (class map), input size or normalization, untrained weights or logits
    taken in train mode land here; a trained teacher is far from both bounds.
    """
    z, labels = check_teacher_logits(teacher_logits, target)
    N, C = z.shape
    p0 = 1.0 / C
    top1 = float((z.argmax(dim=-1) == labels).double().mean())
    bound = chance_bound(C, N)
    if top1 < bound:
        return (
            f"its top-1 on these {N} samples is {100 * top1:.2f} %, not clearly above chance "
            f"({100 * p0:.2f} % for {C} classes; the bound is {100 * bound:.2f} %)"
        )
    logp = torch.log_softmax(z / _check_tau("tau", tau), dim=-1)
    info = float((logp.exp() * logp).sum(dim=-1).mean()) + math.log(C)  # mean KL(p || uniform)
    if info < _UNIFORM_INFO_SHARE * math.log(C):
        return (
            f"its logits are near-uniform: at tau={tau:g} its softmax holds {info:.3g} nats of the "
            f"{math.log(C):.3g} a one-hot target holds ({100 * info / math.log(C):.2f} %, under "
            f"{100 * _UNIFORM_INFO_SHARE:g} %)"
        )
    return None


@dataclass(frozen=True)
class ATSSuggestion:
    """Suggested ATS temperatures and why. Unpacks as ``tau_correct, tau_wrong = suggestion``."""

    tau_correct: float
    tau_wrong: float
    reason: str
    #: mean TS label probability at ``tau_correct`` over the samples the teacher gets right
    label_prob: float
    #: fraction of all samples whose ATS target puts a wrong class first though the teacher does not
    induced_flip: float
    #: mean derived std σ(q) of plain TS at ``tau_correct`` and of the suggested ATS target
    derived_std_ts: float
    derived_std_ats: float

    def __iter__(self):
        yield self.tau_correct
        yield self.tau_wrong

    def as_kwargs(self) -> dict[str, float]:
        """``create_loss("ats", **suggestion.as_kwargs())``."""
        return {"tau_correct": self.tau_correct, "tau_wrong": self.tau_wrong}


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def _mean_label_prob(z: torch.Tensor, labels: torch.Tensor, tau: float, chunk_size: int) -> float:
    total = 0.0
    for start in range(0, z.shape[0], chunk_size):
        zc, yc = z[start : start + chunk_size], labels[start : start + chunk_size]
        q = ats_target_probs(zc, yc, tau, tau)
        total += float(q.gather(-1, yc.unsqueeze(-1)).sum())
    return total / z.shape[0]


def suggest_ats_temperatures(
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    label_prob: float = 0.5,
    tau_range: tuple[float, float] = (1.0, 16.0),
    min_ratio: float = 0.25,
    num_ratios: int = 9,
    max_flip_rate: float = 0.01,
    max_samples: int = 10000,
    seed: int = 0,
    chunk_size: int = 4096,
    check_teacher: bool = True,
) -> ATSSuggestion:
    """Suggest (τ1, τ2) for ``ats`` from a teacher's logits on (a sample of) its training data.

    Rule, in two steps:

    1. **τ1 from the teacher's logit scale.** τ1 is the temperature at which plain TS gives the
       samples the teacher classifies correctly a mean label probability of ``label_prob``
       (0.5), found by bisection in log τ within ``tau_range`` (1 to 16; clamped at the ends).
       For those samples ``q_y(τ)`` decreases monotonically with τ, so the answer is unique.
       Why: temperature only acts through ``z / τ``, so a teacher with twice the logit scale
       needs twice the temperature for the same target (the rule is scale-equivariant: logits
       ×a give τ1 and τ2 ×a); a fixed τ1 = 4 is far too soft for a small-logit teacher and too
       hard for an over-confident one. Half the mass on the label keeps the label's guidance
       (any ``q_y > 0.5`` is the argmax) and gives the other half to the wrong classes, raising
       the derived average e(q) ("smooth regularization" in the paper).
    2. **τ2 for the largest wrong-class spread that keeps the label first.** τ2 = r·τ1 for r on a
       geometric grid from 1 down to ``min_ratio`` (``num_ratios`` points). A ratio is admissible
       when the ATS target puts a wrong class above the label on at most ``max_flip_rate`` (1 %)
       of the samples where the teacher's own logits rank the label first (``induced_flip``: TS
       never does this, ATS does when ``z_k / τ2 > z_y / τ1``, and then KD pulls against
       cross-entropy). Among admissible ratios the one with the largest mean derived variance
       v(q) wins (the quantity ATS is designed to raise; ISATS maximizes it per sample). r = 1
       (plain TS) is always admissible, so a teacher for which asymmetry does not help, or only
       helps by flipping targets, gets τ2 = τ1, and the reason says so.

    Flips depend on the ratios and offsets of the logits, not on their scale: a teacher whose
    runner-up logits come close to the label's (fine-grained classes, or logits shifted by a
    large positive constant) gets a ratio near 1, where the authors' fixed τ1 = 4, τ2 = 3 would
    flip many targets. Temperatures are rounded to 3 significant digits before the checks.

    Args:
        teacher_logits: ``[N, C]`` teacher logits (eval mode), ideally on training images.
        target: ``[N]`` labels (or ``[N, C]`` soft targets).
        label_prob: TS label probability that sets τ1, in (1/C, 1).
        tau_range: bounds for τ1.
        min_ratio, num_ratios: the τ2/τ1 grid.
        max_flip_rate: admissible fraction of ATS-induced flips.
        max_samples: use a random subset of this many rows (``seed``) when N is larger.
        chunk_size: rows processed at once.
        check_teacher: refuse a teacher whose logits carry no class information
            (``uninformative_teacher``: top-1 at chance or near-uniform logits) instead of fitting
            temperatures to noise (True); False suggests anyway.

    Raises:
        TeacherAtChanceError: (a ``ValueError``) with ``check_teacher``, when the sampled logits
            are uninformative; the message says which test failed and what to check.
    """
    z, labels = check_teacher_logits(teacher_logits, target)
    lo, hi = _check_suggestion_args(z.shape[1], label_prob, tau_range, min_ratio, num_ratios, max_flip_rate)
    N = z.shape[0]
    if N > max_samples:
        gen = torch.Generator().manual_seed(int(seed))
        keep = torch.randperm(N, generator=gen)[: int(max_samples)].to(z.device)
        z, labels = z[keep], labels[keep]
    why_not = uninformative_teacher(z, labels, tau=lo) if check_teacher else None
    if why_not is not None:
        raise TeacherAtChanceError(
            f"cannot suggest ATS temperatures for this teacher: {why_not}. Temperatures fitted to "
            f"such logits would only shape noise. Check that the logits come from the trained teacher "
            f"in eval mode, that its classes are in the labels' order (a class map), and that it sees "
            f"its input size and normalization; pass check_teacher=False to get a suggestion anyway."
        )
    tau1, p_label, why1 = _suggest_tau_correct(z, labels, float(label_prob), lo, hi, chunk_size)
    n = int(num_ratios)
    ratios = [1.0] if n == 1 else [float(min_ratio) ** (k / (n - 1)) for k in range(n)]
    tau2, st, rejected = _suggest_tau_wrong(z, labels, tau1, ratios, max_flip_rate, chunk_size)
    ts = _mean_stats(z, labels, tau1, tau1, chunk_size)
    reason = f"tau_correct={tau1:g}: {why1}. "
    if tau2 == tau1:
        reason += "tau_wrong=tau_correct (plain TS): no smaller ratio raises the wrong-class variance"
        if rejected:
            reason += f" without flipping more than {max_flip_rate:.1%} of the targets"
        reason += "."
    else:
        reason += (
            f"tau_wrong={tau2:g} (ratio {tau2 / tau1:.2f}) maximizes the mean wrong-class variance among "
            f"ratios whose ATS target puts a wrong class above the label on at most {max_flip_rate:.1%} "
            f"of the samples (measured {st['induced_flip']:.2%}); derived std {ts['derived_std']:.3g} "
            f"(TS) -> {st['derived_std']:.3g} (ATS)."
        )
    if rejected:
        t, f = max(rejected)
        reason += f" A lower tau_wrong, e.g. {t:g}, would flip {f:.1%}."
    return ATSSuggestion(
        tau_correct=tau1,
        tau_wrong=tau2,
        reason=reason,
        label_prob=p_label,
        induced_flip=st["induced_flip"],
        derived_std_ts=ts["derived_std"],
        derived_std_ats=st["derived_std"],
    )


def _check_suggestion_args(
    C: int,
    label_prob: float,
    tau_range: tuple[float, float],
    min_ratio: float,
    num_ratios: int,
    max_flip_rate: float,
) -> tuple[float, float]:
    """Checks ``suggest_ats_temperatures``' options; returns the checked ``tau_range``."""
    if not (1.0 / C < float(label_prob) < 1.0):
        raise ValueError(
            f"label_prob must be between 1/C = {1.0 / C:.4g} and 1, got {label_prob!r}: it is the "
            f"probability plain TS at tau_correct leaves on the label (0.5 by default)"
        )
    lo, hi = (_check_tau("tau_range", t) for t in tau_range)
    if lo > hi:
        raise ValueError(f"tau_range must be (low, high) with low <= high, got {tau_range!r}")
    if not (0 < float(min_ratio) <= 1):
        raise ValueError(f"min_ratio (smallest tau_wrong / tau_correct) must be in (0, 1], got {min_ratio!r}")
    if int(num_ratios) < 1:
        raise ValueError(f"num_ratios must be >= 1, got {num_ratios!r}")
    if not (0 <= float(max_flip_rate) < 1):
        raise ValueError(f"max_flip_rate must be in [0, 1), got {max_flip_rate!r}")
    return lo, hi


def _suggest_tau_correct(
    z: torch.Tensor, labels: torch.Tensor, label_prob: float, lo: float, hi: float, chunk_size: int
) -> tuple[float, float, str]:
    """Step 1: τ1 where plain TS leaves ``label_prob`` on the label of the samples the teacher gets
    right (bisection in log τ within [lo, hi], then 3 significant digits); returns τ1, the label
    probability there and the reason."""
    correct = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) >= z.amax(dim=-1)
    note = ""
    zc, yc = z[correct], labels[correct]
    if zc.shape[0] == 0:
        zc, yc, note = z, labels, " (the teacher gets no sample right: all samples used)"

    def label_prob_at(tau: float) -> float:
        return _mean_label_prob(zc, yc, tau, chunk_size)

    if label_prob_at(lo) <= label_prob:
        tau1, why = lo, f"already at tau={lo:g} the label probability is at most {label_prob:g}"
    elif label_prob_at(hi) > label_prob:
        tau1, why = hi, f"even tau={hi:g} leaves a label probability above {label_prob:g}"
    else:
        a, b = math.log(lo), math.log(hi)
        while b - a > 1e-4:  # τ1 within 0.01 %, finer than the 3-digit rounding below
            m = 0.5 * (a + b)
            a, b = (m, b) if label_prob_at(math.exp(m)) > label_prob else (a, m)
        tau1 = math.exp(0.5 * (a + b))
        why = f"plain TS there leaves a mean label probability of {label_prob:g}"
    tau1 = _round(tau1)
    why += f" on the {zc.shape[0]} samples the teacher ranks right{note}"
    return tau1, label_prob_at(tau1), why


def _suggest_tau_wrong(
    z: torch.Tensor,
    labels: torch.Tensor,
    tau1: float,
    ratios: Sequence[float],
    max_flip_rate: float,
    chunk_size: int,
) -> tuple[float, dict[str, Any], list[tuple[float, float]]]:
    """Step 2: τ2 = r·τ1 with the largest mean derived variance among the ratios whose induced flip
    rate is at most ``max_flip_rate``; returns τ2, its statistics and the rejected (τ2, flip rate)."""
    best = None
    rejected = []
    for r in ratios:
        tau2 = _round(tau1 * r)
        st = _mean_stats(z, labels, tau1, tau2, chunk_size)
        if st["induced_flip"] > max_flip_rate:
            rejected.append((tau2, st["induced_flip"]))
            continue
        if best is None or st["derived_variance"] > best[1]["derived_variance"]:
            best = (tau2, st)
    assert best is not None  # r = 1 is plain TS: no induced flips
    return best[0], best[1], rejected
