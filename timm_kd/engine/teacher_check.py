"""The teacher check before training: the teacher's accuracy (a broken teacher stops the run), its
calibration and the dark knowledge of its targets on the held-out images (a poor teacher is flagged).

A live teacher is evaluated once on the evaluation split, as the student will be. Beside
top-1/top-5, each sample's top-1 probability and dark knowledge at KD's τ 4
(``timm_kd.ranking.dark_knowledge``) are gathered, giving the expected calibration error
(``timm_kd.ranking.calibration_error``), the mean confidence (percent) and the mean dark knowledge
(nats), recorded with the accuracies in ``run.state["teacher_metrics"]`` (so in
``run_summary.json``). A cached teacher is judged by the top-1 its cache recorded on the views it
cached: no teacher runs, no calibration.

The warning. Dark knowledge is what a KD student learns beyond the label and label smoothing; in
the capacity study (docs/capacity_study.md) the teachers trained with label smoothing held little
of it and taught *worse* as they got more accurate, while the others held several times more. A
teacher under ``timm_kd.ranking.LOW_DARK_KNOWLEDGE`` nats gets one warning before training, for
every distillation method, pointing at ``timm-kd rank-teachers``. The threshold comes from that
one study (100 classes); it is a flag, not a verdict.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..cache import CachedTeacher
from ..ranking import LOW_DARK_KNOWLEDGE, TEACHER_STATS_TAU, calibration_error, dark_knowledge
from .config import BrokenTeacherError
from .evaluate import evaluate_on_val, format_metrics, metric_floats, teacher_is_at_chance
from .setup import Run

__all__ = [
    "check_teacher",
    "teacher_sample_stats",
    "teacher_calibration",
    "poor_teacher_warning",
    "LOW_DARK_KNOWLEDGE",
]


def teacher_sample_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per sample: ``confidence`` (top-1 probability), ``correct`` (1.0 where the top-1 is the
    label) and, from 3 classes, ``dark_knowledge`` at τ 4 (nats); ``evaluate_model``'s
    ``per_sample``. Hard labels only (the evaluation split has them)."""
    conf, pred = logits.float().softmax(dim=-1).max(dim=-1)
    out = {"confidence": conf, "correct": (pred == labels).float()}
    if logits.shape[-1] >= 3:
        out["dark_knowledge"] = dark_knowledge(logits, labels, TEACHER_STATS_TAU).float().to(logits.device)
    return out


def teacher_calibration(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{"ece": %, "mean_confidence": %, "dark_knowledge": nats}`` from ``teacher_sample_stats``
    gathered over the evaluation split. Empty when there are no samples or a confidence is not
    finite (the chance test reports those)."""
    confidence = stats.get("confidence")
    if confidence is None or confidence.numel() == 0 or not bool(torch.isfinite(confidence).all()):
        return {}
    out = {
        "ece": 100.0 * calibration_error(confidence, stats["correct"]),
        "mean_confidence": 100.0 * float(confidence.double().mean()),
    }
    if "dark_knowledge" in stats:
        out["dark_knowledge"] = float(stats["dark_knowledge"].double().mean())
    return out


def poor_teacher_warning(name: str, metrics: dict[str, Any], method: str) -> str | None:
    """The warning for a teacher whose targets carry little dark knowledge, or ``None``
    (``method`` ``"ce"``, no measurement, or at least ``LOW_DARK_KNOWLEDGE`` nats)."""
    dk = metrics.get("dark_knowledge")
    if method == "ce" or dk is None or dk >= LOW_DARK_KNOWLEDGE:
        return None
    ece, conf, top1 = metrics.get("ece"), metrics.get("mean_confidence"), metrics.get("top1")
    calibration = f"ECE {ece:.1f} %, mean confidence {conf:.1f} % for a top-1 of {top1:.1f} %"
    return (
        f"teacher {name}'s targets carry little dark knowledge: {dk:.3f} nats at tau 4 on the held-out "
        f"images ({calibration}), under {LOW_DARK_KNOWLEDGE:g}. Its {method} targets are then close to "
        "the label plus label smoothing: the capacity study's teachers like this (trained with label "
        "smoothing) taught worse the more accurate they were (docs/capacity_study.md). Compare "
        "candidates with `timm-kd rank-teachers --teachers A B ...` (docs/ranking.md)."
    )


def _cached_teacher_report(run: Run, teacher: CachedTeacher) -> tuple[str, float, int, str, str]:
    """A cached teacher's top-1 on the views it cached (from the build): no teacher in memory."""
    m = teacher.cache.manifest
    name, top1, n = m["teacher"], float(m["teacher_view_top1"]), int(m["num_rows"])
    tail = "dropped logits rebuilt flat"
    if m["top_k"] == m["num_classes"]:
        tail = "every logit stored"
    elif teacher.tail_prior is not None:
        tail = "dropped logits rebuilt from the tail prior"
    run.log(
        f"teacher {name} from cache {teacher.cache.root}: top-1 {top1:.2f}% on its {n} cached "
        f"training views (top-{m['top_k']} logits, {m['bytes_per_view']:.1f} bytes per view; {tail})"
    )
    fix = "Rebuild the cache with a trained teacher (pretrained tag or --teacher-checkpoint)."
    return name, top1, n, f"on its own {n} cached training views", fix


def _live_teacher_report(run: Run) -> tuple[str, float, int, str, str]:
    """A live teacher's top-1 and calibration on the validation split (recorded in the run's state)."""
    config = run.config
    res = evaluate_on_val(run, run.wrapper.teacher_logits, "teacher eval", per_sample=teacher_sample_stats)
    calibration = teacher_calibration(res.per_sample or {})
    run.state["teacher_metrics"] = {**metric_floats(res.metrics), **calibration}
    name, top1, n = config.teacher, res.metrics["top1"], res.metrics["num_samples"]
    line = f"teacher {name}: {format_metrics(res.metrics)} on {n} {config.val_split} images"
    if calibration:
        line += (
            f"; ECE {calibration['ece']:.1f} % (mean confidence {calibration['mean_confidence']:.1f} %, "
            f"accuracy {top1:.1f} %)"
        )
        if "dark_knowledge" in calibration:
            line += f", dark knowledge {calibration['dark_knowledge']:.3f} nats at tau 4"
    run.log(line)
    sees = run.wrapper.teacher.describe_input(run.data_config["input_size"][-2:])
    fix = (
        "Check that the teacher predicts this dataset's classes (--class-map for another label set), "
        "that its weights loaded (pretrained tag or --teacher-checkpoint), and its input resolution "
        f"and normalization: {sees}. Give what its weights were trained on with --teacher-input-size, "
        "--teacher-mean, --teacher-std (--teacher-interpolation), or a timm config.json beside "
        "--teacher-checkpoint."
    )
    return name, top1, n, f"on {config.dataset}[{config.val_split}] ({n} images)", fix


def check_teacher(run: Run, teacher_given: bool) -> None:
    """Evaluate the teacher once; a teacher at chance level is an error (or a warning), one with
    little dark knowledge a warning (``poor_teacher_warning``)."""
    config, state = run.config, run.state
    if run.wrapper is None or state["teacher_metrics"] is not None or config.teacher_check == "off":
        return
    if isinstance(run.wrapper.teacher, CachedTeacher):
        name, top1, n, where, fix = _cached_teacher_report(run, run.wrapper.teacher)
    else:
        name, top1, n, where, fix = _live_teacher_report(run)
    if not teacher_is_at_chance(top1, run.num_classes, n):
        _warn(run, poor_teacher_warning(name, state["teacher_metrics"] or {}, config.method))
        return
    msg = (
        f"broken teacher: {name} reaches top-1 {top1:.2f}% {where}, chance level is "
        f"{100.0 / run.num_classes:.2f}%; distilling from it would teach noise. {fix} "
        "--teacher-check warn continues anyway."
    )
    mode = config.teacher_check
    if mode == "auto":
        trained = teacher_given or config.pretrained_teacher or config.teacher_checkpoint is not None
        mode = "error" if trained else "warn"
    if mode == "error":
        raise BrokenTeacherError(msg)
    _warn(run, msg)


def _warn(run: Run, msg: str | None) -> None:
    if msg is not None:
        warnings.warn(msg)
        run.log("WARNING: " + msg)
