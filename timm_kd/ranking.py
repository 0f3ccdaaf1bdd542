"""Teacher statistics, and a score that ranks candidate teachers before any student is trained.

A more accurate teacher can teach worse (Cho & Hariharan, ICCV 2019; Müller et al., NeurIPS 2019;
Li et al., NeurIPS 2022): what a KD student learns from is the teacher's tempered target *on its own
training images*, and a teacher that memorised them gives near one-hot targets there, whatever its
accuracy on new images. The statistics here describe both sides, from teacher logits alone:

* on a sample of the **training** images, at the distillation temperature τ (KD's 4 by default):
  top-1, mean max-probability (at τ = 1), the ATS paper's wrong-class std σ(q) and entropy of the
  renormalised wrong classes, the share of targets ATS's authors' (4, 3) would flip
  (``timm_kd.diagnostics.wrong_class_stats``), and the **dark knowledge** below;
* on **held-out** images (never trained on): top-1, negative log-likelihood and expected
  calibration error (ECE; Guo et al., ICML 2017: 15 equal-width confidence bins,
  ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over the top-1 confidence).

**Dark knowledge** of one target ``q = softmax(z / τ)`` with label ``y`` over ``C`` classes: the KL
divergence from ``q`` to its label-smoothing projection ``s`` (the same mass ``q_y`` on the label,
the rest spread evenly), ``KL(q || s) = (1 - q_y) * (log(C - 1) - H(q̃))`` with ``q̃`` the wrong
classes renormalised. It is what KD adds beyond cross-entropy plus label smoothing: zero for a
one-hot target (no wrong-class mass) and for a label-smoothed one (no wrong-class structure), large
when much mass sits on a few plausible wrong classes. Samples the teacher gets wrong count zero.

**Score** (fixed before the capacity study's students were trained; docs/capacity_study.md
reports how well it ranks them): ``score = heldout_top1 * dark_knowledge``, the held-out accuracy
as a fraction times the mean training-set dark knowledge in nats. A student can only learn what the
teacher gets right on new images (the first factor), and learns it only through the
non-trivial part of the targets it trains on (the second).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .diagnostics import (
    ATS_AUTHORS_TAUS,
    TeacherAtChanceError,
    check_teacher_logits,
    suggest_ats_temperatures,
    uninformative_teacher,
    wrong_class_stats,
)

__all__ = [
    "ECE_BINS",
    "TEACHER_STATS_TAU",
    "LOW_DARK_KNOWLEDGE",
    "dark_knowledge",
    "wrong_class_entropy",
    "calibration_error",
    "expected_calibration_error",
    "SCORE_DEFINITION",
    "teacher_statistics",
    "teacher_score",
    "suggest_method",
    "rank_teachers",
    "spearman",
    "format_ranking_table",
    "plot_ranking",
]

#: KD's temperature (Hinton et al.; mdistiller's CIFAR-100 setting): the statistics' default τ
TEACHER_STATS_TAU = 4.0
#: nats of dark knowledge at τ 4 under which ``suggest_method`` keeps to plain KD and the engine's
#: teacher check warns: between the capacity study's label-smoothed teachers and the others
#: (100 classes; docs/capacity_study.md)
LOW_DARK_KNOWLEDGE = 0.2
#: confidence bins of the expected calibration error (Guo et al., 2017)
ECE_BINS = 15
#: the score, in words, for the records that hold it
SCORE_DEFINITION = (
    "score = heldout_top1 / 100 * dark_knowledge: the held-out top-1 as a fraction times the mean, over "
    "the training sample, of KL(q || s) in nats, q = softmax(logits / tau) and s its label-smoothing "
    "projection (0 where the teacher is wrong); a teacher without class information ranks last"
)


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """Expected calibration error, a fraction in [0, 1], from per-sample top-1 confidences ``[N]``
    (probabilities) and whether the top-1 was right ``[N]``.

    Bins ``(k / B, (k + 1) / B]`` of the confidence (the first bin also holds 0);
    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|``.
    """
    if int(num_bins) < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins!r}")
    conf, correct = confidence.double().reshape(-1), correct.double().reshape(-1)
    if conf.numel() == 0 or conf.shape != correct.shape:
        raise ValueError(
            f"need as many confidences as correct flags (>= 1): {conf.numel()}, {correct.numel()}"
        )
    bins = (conf * num_bins).ceil().clamp(1, num_bins).long() - 1
    n = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    acc = torch.zeros_like(n).index_add_(0, bins, correct)
    cf = torch.zeros_like(n).index_add_(0, bins, conf)
    return float((acc - cf).abs().sum() / conf.numel())


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """Top-1 expected calibration error of ``softmax(logits)`` (``calibration_error``)."""
    z, labels = check_teacher_logits(logits, target)
    conf, pred = z.softmax(dim=-1).max(dim=-1)
    return calibration_error(conf, pred == labels, num_bins)


def wrong_class_entropy(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``H(q̃)`` (nats) of the wrong classes of ``softmax(z)`` renormalised
    (the label's column removed), for checked, already tempered logits ``z`` ``[N, C]``."""
    logq = z.scatter(-1, labels.unsqueeze(-1), -math.inf).log_softmax(dim=-1)
    return -(logq.exp() * logq.nan_to_num(neginf=0.0)).sum(dim=-1)


def dark_knowledge(
    logits: torch.Tensor, target: torch.Tensor, tau: float = TEACHER_STATS_TAU, *, chunk_size: int = 4096
) -> torch.Tensor:
    """Per-sample ``KL(q || s)`` in nats (module docstring), ``[N]`` float64; 0 where the
    teacher's argmax is not the label. Needs ``C >= 3`` (for two classes ``s = q``)."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    z, labels = check_teacher_logits(logits, target)
    C = z.shape[1]
    if C < 3:
        raise ValueError(f"dark knowledge needs at least 3 classes (got {C}): with 2 it is always 0")
    out = []
    for start in range(0, z.shape[0], chunk_size):
        zc, yc = z[start : start + chunk_size] / tau, labels[start : start + chunk_size]
        idx = yc.unsqueeze(-1)
        q_y = zc.softmax(dim=-1).gather(-1, idx).squeeze(-1)
        correct = zc.argmax(dim=-1) == yc
        out.append(torch.where(correct, (1.0 - q_y) * (math.log(C - 1) - wrong_class_entropy(zc, yc)), 0.0))
    return torch.cat(out)


def teacher_statistics(
    train_logits: torch.Tensor,
    train_target: torch.Tensor,
    heldout_logits: torch.Tensor | None = None,
    heldout_target: torch.Tensor | None = None,
    *,
    tau: float = TEACHER_STATS_TAU,
) -> dict[str, Any]:
    """The statistics of the module docstring, as floats (accuracies in percent).

    Keys from the training sample: ``train_top1``, ``train_max_prob``, ``wrong_std`` and
    ``wrong_entropy`` (at ``tau``), ``ats_induced_flip`` (at the ATS authors' (4, 3)),
    ``dark_knowledge``, ``num_train``; from the held-out one (``None`` without it):
    ``heldout_top1``, ``heldout_nll``, ``heldout_ece``, ``num_heldout``; then ``score``
    (``teacher_score``; ``None`` without held-out data), ``tau`` and ``num_classes``.
    """
    z, labels = check_teacher_logits(train_logits, train_target)
    ts = wrong_class_stats(z, labels, tau, tau)
    stats: dict[str, Any] = {
        "tau": float(tau),
        "num_classes": int(z.shape[1]),
        "num_train": int(z.shape[0]),
        "train_top1": 100.0 * float((z.argmax(dim=-1) == labels).double().mean()),
        "train_max_prob": float(z.softmax(dim=-1).amax(dim=-1).mean()),
        "wrong_std": ts["derived_std"],
        "wrong_entropy": float(wrong_class_entropy(z / tau, labels).mean()),
        "ats_induced_flip": wrong_class_stats(z, labels, *ATS_AUTHORS_TAUS)["induced_flip"],
        "dark_knowledge": float(dark_knowledge(z, labels, tau).mean()),
    }
    keys = ("heldout_top1", "heldout_nll", "heldout_ece", "num_heldout")
    if heldout_logits is None:
        stats.update(dict.fromkeys(keys))
        stats["score"] = None
        return stats
    if heldout_target is None:
        raise ValueError("heldout_logits needs heldout_target (the held-out labels)")
    h, h_labels = check_teacher_logits(heldout_logits, heldout_target)
    if h.shape[1] != z.shape[1]:
        raise ValueError(f"held-out logits have {h.shape[1]} classes, the training logits {z.shape[1]}")
    stats["heldout_top1"] = 100.0 * float((h.argmax(dim=-1) == h_labels).double().mean())
    stats["heldout_nll"] = float(torch.nn.functional.cross_entropy(h, h_labels))
    stats["heldout_ece"] = expected_calibration_error(h, h_labels)
    stats["num_heldout"] = int(h.shape[0])
    stats["score"] = teacher_score(stats)
    return stats


def teacher_score(stats: Mapping[str, Any]) -> float:
    """``heldout_top1 / 100 * dark_knowledge`` (module docstring): higher predicts a better KD
    student. Needs the held-out statistics."""
    if stats.get("heldout_top1") is None:
        raise ValueError("the score needs held-out statistics: pass heldout_logits and heldout_target")
    return stats["heldout_top1"] / 100.0 * stats["dark_knowledge"]


def suggest_method(
    train_logits: torch.Tensor, train_target: torch.Tensor, stats: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"method", "method_kwargs", "method_reason", "ats_alternative"}`` for this teacher.

    A rule of thumb from the capacity study (docs/capacity_study.md), not a validated predictor
    (the score is what the study checks):

    * ``"none"`` (train the student alone) when the logits carry no class information
      (``uninformative_teacher``);
    * ``"kd"`` at its defaults when the training-set targets hold under ``LOW_DARK_KNOWLEDGE`` nats
      (like the study's label-smoothed teachers, from which ``dtkd`` lost to ``kd``);
    * ``"dtkd"`` at its defaults otherwise (it matched or beat ``kd`` from every other teacher).

    ``ats_alternative`` holds ``suggest_ats_temperatures``' ``{"tau_correct", "tau_wrong"}`` when
    it finds a real asymmetry (τ2 < τ1) for this teacher, else ``None``.
    """
    why = uninformative_teacher(train_logits, train_target)
    if why is not None:
        reason = f"the teacher carries no class information: {why}; train the student alone"
        return {"method": "none", "method_kwargs": {}, "method_reason": reason, "ats_alternative": None}
    dk = stats["dark_knowledge"]
    held = f"its training-set targets at tau {stats['tau']:g} hold {dk:.3f} nats of dark knowledge"
    if dk < LOW_DARK_KNOWLEDGE:
        method = "kd"
        reason = f"{held}, under {LOW_DARK_KNOWLEDGE:g}: such teachers of the capacity study did best with kd"
    else:
        method = "dtkd"
        reason = f"{held}: dtkd matched or beat kd from every such teacher of the capacity study"
    try:
        ats = suggest_ats_temperatures(train_logits, train_target)
    except TeacherAtChanceError:  # pragma: no cover - excluded by uninformative_teacher above
        ats = None
    alternative = ats.as_kwargs() if ats is not None and ats.tau_wrong < ats.tau_correct else None
    return {"method": method, "method_kwargs": {}, "method_reason": reason, "ats_alternative": alternative}


def rank_teachers(
    candidates: Mapping[str, Mapping[str, torch.Tensor]], *, tau: float = TEACHER_STATS_TAU
) -> list[dict[str, Any]]:
    """Rank teachers by ``teacher_score``, best first.

    ``candidates`` maps a teacher's name to its logits: ``{"train_logits", "train_target",
    "heldout_logits", "heldout_target"}`` (the teacher in eval mode, on a sample of the training
    images and on held-out images of the same task). Returns one dict per teacher:
    ``name``, ``rank`` (1 = best), the ``teacher_statistics`` and ``method``, ``method_kwargs``,
    ``method_reason`` (``suggest_method``), ``ats_alternative`` (``suggest_ats_temperatures``'
    ``{"tau_correct", "tau_wrong"}`` when it finds an asymmetry, else ``None``). A teacher whose
    logits carry no class information (method ``"none"``) ranks after every other, whatever its
    score: a few lucky right answers can give random logits some dark knowledge.
    """
    if not candidates:
        raise ValueError("rank_teachers needs at least one candidate teacher")
    rows = []
    for name, c in candidates.items():
        missing = {"train_logits", "train_target", "heldout_logits", "heldout_target"} - set(c)
        if missing:
            raise ValueError(f"teacher {name!r}: missing {sorted(missing)}")
        stats = teacher_statistics(
            c["train_logits"], c["train_target"], c["heldout_logits"], c["heldout_target"], tau=tau
        )
        rows.append({"name": name, **stats, **suggest_method(c["train_logits"], c["train_target"], stats)})
    rows.sort(key=lambda r: (r["method"] == "none", -r["score"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the ranks, ties at their average rank);
    ``nan`` when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


#: (column header, key, format) of the printed ranking
_COLUMNS = (
    ("rank", "rank", "{}"),
    ("teacher", "name", "{}"),
    ("score", "score", "{:.3f}"),
    ("held-out top-1 %", "heldout_top1", "{:.2f}"),
    ("ECE", "heldout_ece", "{:.1%}"),
    ("NLL", "heldout_nll", "{:.3f}"),
    ("train top-1 %", "train_top1", "{:.2f}"),
    ("train max prob", "train_max_prob", "{:.3f}"),
    ("dark knowledge", "dark_knowledge", "{:.3f}"),
    ("wrong std", "wrong_std", "{:.2e}"),
    ("wrong entropy", "wrong_entropy", "{:.2f}"),
    ("ATS 4/3 flips", "ats_induced_flip", "{:.1%}"),
    ("method", "method", "{}"),
)


def format_ranking_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rank_teachers``' rows as a Markdown table (ECE and flips as percentages)."""
    lines = ["| " + " | ".join(h for h, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        cells = ["-" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ranking(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> None:
    """Score against held-out top-1, one labelled point per teacher: where the most accurate
    teacher and the best-scored one differ, the picture shows it. matplotlib is imported here."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the [demo] extra
        raise ImportError("plotting needs matplotlib: pip install 'timm-kd[demo]'") from e
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["heldout_top1"] for r in rows]
    ys = [r["score"] for r in rows]
    ax.scatter(xs, ys, color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        label = f"{r['rank']}. {r['name']}"
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("held-out top-1 % (the naive rule ranks by this)")
    ax.set_ylabel("score = held-out top-1 x dark knowledge (nats)")
    ax.set_title(title or "Candidate teachers: accuracy vs predicted KD fitness")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)
