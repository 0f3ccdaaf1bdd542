"""Evaluation: top-k accuracy gathered from every rank, and the chance-level test of a teacher."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import EvalResult

__all__ = ["evaluate_model", "teacher_is_at_chance"]


@torch.no_grad()
def evaluate_model(
    accelerator,
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader,
    metric,
    *,
    max_steps: int | None = None,
    k: int = 5,
    desc: str = "eval",
    progress: bool = True,
) -> EvalResult:
    """Top-1/top-k of ``forward(images) -> logits`` over ``loader`` (prepared), gathered from all ranks.

    Each rank ranks its own logits (``topk``), the ranked ids and labels are gathered with
    ``accelerator.gather_for_metrics`` (which drops the samples Accelerate duplicated to even out
    the last batch), and the shipped ``evaluate`` metric computes the accuracies on every rank.
    """
    tops, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    bar = tqdm(
        total=total, desc=desc, leave=False, disable=not (progress and accelerator.is_local_main_process)
    )
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        with accelerator.autocast():
            logits = forward(batch["pixel_values"])
        kk = min(k, logits.shape[-1])
        top = logits.float().topk(kk, dim=-1).indices
        top, lab = accelerator.gather_for_metrics((top, batch["label"]))
        tops.append(top.cpu())
        labels.append(lab.cpu())
        bar.update(1)
    bar.close()
    topk = torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.long)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    metrics = metric.compute(predictions=topk.tolist(), references=labels_t.tolist(), k=(1, k))
    return EvalResult(metrics, topk, labels_t)


def teacher_is_at_chance(top1: float, num_classes: int, num_samples: int) -> bool:
    """Whether a top-1 (percent) is not clearly above chance ``100 / num_classes``.

    Threshold: ``max(2 * chance, chance + 3 binomial standard deviations)`` for ``num_samples``;
    a correctly loaded pretrained teacher is far above it, a wrong class map or normalization
    lands near chance.
    """
    p0 = 1.0 / max(num_classes, 1)
    sd = math.sqrt(p0 * (1 - p0) / max(num_samples, 1))
    return top1 / 100.0 < max(2 * p0, p0 + 3 * sd)


def format_metrics(metrics: dict[str, float] | None) -> str:
    """``"top1 71.20 top5 90.10"`` (``"n/a"`` without metrics)."""
    if not metrics:
        return "n/a"
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("top"))


def metric_floats(m: dict[str, Any]) -> dict[str, float]:
    """Accuracies as floats, counts as ints (plain JSON values)."""
    return {k: (float(v) if k.startswith("top") else int(v)) for k, v in m.items()}
