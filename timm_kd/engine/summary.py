"""The end of a run: the student in timm's format, the predictions, ``run_summary.json``; publishing.

A finished run folder holds ``student/`` (``config.json`` and ``model.safetensors``, loadable with
``timm.create_model("local-dir:<path>", pretrained=True)``), ``predictions.safetensors`` (the last
evaluation's ranked class ids and labels) and ``run_summary.json``: the model-card metadata
(``timm_kd.hub.META_KEYS``) plus, under ``"run"``, the run's details (history, best epoch, timings).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from safetensors.torch import save_file

from ..hub import push_to_hub, save_pretrained
from ..models import unwrap_model
from .checkpoint import write_json_atomic
from .config import EvalResult, FitResult
from .evaluate import evaluate_model, format_metrics, metric_floats

__all__ = ["finish", "publish", "SUMMARY_FILE", "PREDICTIONS_FILE", "STUDENT_DIR"]

SUMMARY_FILE = "run_summary.json"
PREDICTIONS_FILE = "predictions.safetensors"
STUDENT_DIR = "student"


def _hardware(accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n}x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n}x {accelerator.device.type.upper()} process{'es' if n > 1 else ''}"


def _card_meta(run, metrics: dict[str, float], card_meta: dict[str, Any]) -> dict[str, Any]:
    """The model-card metadata of the run (``timm_kd.hub.META_KEYS``), ``card_meta`` on top."""
    config, acc = run.config, run.accelerator
    distill = run.wrapper is not None
    return {
        "model_name": config.student,
        "teacher": config.teacher if distill else None,
        "teacher_revision": None,
        "method": config.method,
        "loss_kwargs": dict(config.loss_kwargs) if distill else {},
        "epochs": config.epochs,
        "global_batch_size": config.batch_size * acc.num_processes * config.grad_accum_steps,
        "seed": config.seed,
        "hardware": _hardware(acc),
        "dataset": config.dataset,
        "eval_split": config.val_split,
        "metrics": metrics,
        "teacher_metrics": run.state["teacher_metrics"],
        "student_alone_metrics": None,
        "label_names": run.label_names,
        "license": config.license,
        "data_config": {
            k: run.data_config[k]
            for k in ("input_size", "mean", "std", "crop_pct", "interpolation")
            if k in run.data_config
        },
        **card_meta,
    }


def finish(run, last_eval: EvalResult | None, t_start: float, card_meta: dict[str, Any]) -> FitResult:
    """Save the student (timm format), the gathered predictions and ``run_summary.json``; the
    ``FitResult`` (identical on every rank). ``run`` is the ``timm_kd.engine.setup.Run``."""
    config, state, acc = run.config, run.state, run.accelerator
    final = unwrap_model(acc.unwrap_model(run.model_ema.module if run.model_ema is not None else run.student))
    final.eval()
    if last_eval is None:  # resumed a run that had already finished: evaluate once more
        last_eval = evaluate_model(
            acc,
            final,
            run.val_loader,
            run.metric,
            max_steps=config.max_eval_steps,
            k=run.k_top,
            desc="eval",
            progress=config.progress,
        )
    metrics = metric_floats(last_eval.metrics)
    meta = _card_meta(run, metrics, card_meta)
    summary = {
        **meta,
        # details of the run, not model-card metadata: under one key so the card's keys stay exact
        "run": {
            "best_metrics": state["best_metrics"],
            "best_epoch": state["best_epoch"],
            "last_epoch": state["history"][-1]["epoch"] if state["history"] else None,
            "global_step": state["global_step"],
            "history": state["history"],
            "num_corrupt_images": run.num_corrupt + state["num_skipped"],
            "mixed_precision": acc.mixed_precision,
            "world_size": acc.num_processes,
            "wall_time_s": round(time.time() - t_start, 1),
            "predictions": PREDICTIONS_FILE,
        },
    }
    out = run.out_dir
    if acc.is_main_process:
        save_pretrained(final, out / STUDENT_DIR, **{k: v for k, v in meta.items() if v is not None})
        save_file(
            {"topk": last_eval.topk.contiguous(), "labels": last_eval.labels.contiguous()},
            str(out / PREDICTIONS_FILE),
        )
        write_json_atomic(out / SUMMARY_FILE, summary)
    acc.wait_for_everyone()
    run.log(
        f"done in {summary['run']['wall_time_s']:.0f}s, {state['global_step']} steps: "
        f"last epoch {format_metrics(metrics)} | best epoch {state['best_epoch']}: "
        f"{format_metrics(state['best_metrics'])}"
        + (f" | teacher {format_metrics(state['teacher_metrics'])}" if state["teacher_metrics"] else "")
        + f" | student saved to {out / STUDENT_DIR}"
    )
    if config.report_to:
        acc.end_training()
    result = FitResult(
        student=final,
        metrics=metrics,
        best_metrics=state["best_metrics"],
        best_epoch=state["best_epoch"],
        teacher_metrics=state["teacher_metrics"],
        summary=summary,
        output_dir=out,
        global_step=state["global_step"],
        is_main_process=acc.is_main_process,
    )
    acc.free_memory()
    return result


def publish(result: FitResult, repo_id: str, *, private: bool = False, token: str | None = None) -> Any:
    """Push ``<output_dir>/student`` to the Hub repo ``repo_id`` with the run's card (main process only).

    Check the repo id and token before training with ``timm_kd.hub.check_push_ready(repo_id)``.
    Returns the ``CommitInfo`` on the main process, ``None`` elsewhere.
    """
    if not result.is_main_process:
        return None
    meta = {k: v for k, v in result.card_meta.items() if v is not None}
    return push_to_hub(result.output_dir / STUDENT_DIR, repo_id, private=private, token=token, **meta)
