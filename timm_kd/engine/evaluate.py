"""Evaluation: top-k accuracy (and, on request, per-sample statistics) gathered from every rank, and the
chance-level test of a teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..diagnostics import chance_bound
from .config import EvalResult

if TYPE_CHECKING:
    from .setup import Run

__all__ = ["evaluate_model", "evaluate_on_val", "teacher_is_at_chance"]


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
    per_sample: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> EvalResult:
    """Top-1/top-k of ``forward(images) -> logits`` over ``loader`` (prepared), gathered from all ranks.

    Each rank ranks its own logits (``topk``), the ranked ids and labels are gathered with
    ``accelerator.gather_for_metrics`` (which drops the samples Accelerate duplicated to even out
    the last batch), and the shipped ``evaluate`` metric computes the accuracies on every rank.
    ``per_sample(logits, labels) -> {name: [B] tensor}``, when given, runs on each batch and its
    tensors are gathered the same way (``EvalResult.per_sample``, ``[N]`` each on the CPU of every
    rank): the teacher check's calibration and dark knowledge, without keeping the logits.
    """
    tops, labels, kept = [], [], {}
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
        if per_sample is not None:
            for name, v in accelerator.gather_for_metrics(per_sample(logits.float(), batch["label"])).items():
                kept.setdefault(name, []).append(v.cpu())
        bar.update(1)
    bar.close()
    topk = torch.cat(tops) if tops else torch.zeros(0, k, dtype=torch.long)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    metrics = metric.compute(predictions=topk.tolist(), references=labels_t.tolist(), k=(1, k))
    return EvalResult(metrics, topk, labels_t, {k: torch.cat(v) for k, v in kept.items()} if kept else None)


def evaluate_on_val(
    run: Run, forward: Callable[[torch.Tensor], torch.Tensor], desc: str, **kwargs: Any
) -> EvalResult:
    """``evaluate_model`` of ``forward`` over the run's evaluation split, with the run's settings
    (``--max-eval-steps``, its top-k, progress bars); ``kwargs`` go to ``evaluate_model``."""
    config = run.config
    return evaluate_model(
        run.accelerator,
        forward,
        run.val_loader,
        run.metric,
        max_steps=config.max_eval_steps,
        k=run.k_top,
        desc=desc,
        progress=config.progress,
        **kwargs,
    )


def teacher_is_at_chance(top1: float, num_classes: int, num_samples: int) -> bool:
    """Whether a top-1 (percent) is not clearly above chance: under
    ``timm_kd.diagnostics.chance_bound``, the bound ``timm-kd diagnose`` and ``rank-teachers`` use.
    A correctly loaded pretrained teacher is far above it; a wrong class map or normalization lands
    near chance."""
    return top1 / 100.0 < chance_bound(num_classes, num_samples)


def format_metrics(metrics: dict[str, float] | None) -> str:
    """``"top1 71.20 top5 90.10"`` (``"n/a"`` without metrics)."""
    if not metrics:
        return "n/a"
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("top"))


def metric_floats(m: dict[str, Any]) -> dict[str, float]:
    """Accuracies as floats, counts as ints (plain JSON values)."""
    return {k: (float(v) if k.startswith("top") else int(v)) for k, v in m.items()}
