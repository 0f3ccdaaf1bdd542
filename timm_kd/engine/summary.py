"""The run folder: how the run was made (at its start), and its results (at its end); publishing.

At the start, before any data or model is loaded, ``run_config.json`` records how the run was
made, so that a run that fails still has it::

    config     every ``TrainConfig`` field, as given (JSON values; no Hub token is ever part of it)
    versions   python, timm-kd, timm, torch, accelerate, datasets, huggingface_hub, safetensors, CUDA
    command    the command line (a value following a ``--...token`` flag is masked)
    world_size, mixed_precision
    resolved   after setup: the learning rate in effect, the global batch, steps, the student's
               data config and the teacher record (``timm_kd.hub.describe_teacher``)

A resumed or relaunched run rewrites it with its own settings. A finished run folder also holds
``student/`` (``config.json`` and ``model.safetensors``, loadable with
``timm.create_model("local-dir:<path>", pretrained=True)``), ``predictions.safetensors`` (the last
evaluation's ranked class ids and labels) and ``run_summary.json``: the model-card metadata
(``timm_kd.hub.META_KEYS``) plus, under ``"run"``, the run's details (history, best epoch, timings).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from ..cache import CachedTeacher
from ..hub import describe_teacher, push_report, push_to_hub, save_pretrained
from ..models import unwrap_model
from ..version import __version__
from .checkpoint import write_json_atomic
from .config import EvalResult, FitResult, TrainConfig
from .evaluate import evaluate_on_val, format_metrics, metric_floats

__all__ = [
    "finish",
    "publish",
    "teacher_record",
    "write_run_config",
    "software_versions",
    "RUN_CONFIG_FILE",
    "SUMMARY_FILE",
    "PREDICTIONS_FILE",
    "STUDENT_DIR",
]

RUN_CONFIG_FILE = "run_config.json"  # not config.json: that name is the student's timm config
SUMMARY_FILE = "run_summary.json"
PREDICTIONS_FILE = "predictions.safetensors"
STUDENT_DIR = "student"


_VERSIONED = ("timm", "torch", "accelerate", "datasets", "huggingface_hub", "safetensors")


def software_versions() -> dict[str, str | None]:
    """The versions a run depends on (None for a package that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "timm-kd": __version__}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON (tuples as lists, anything else unusual as its text)."""
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def _masked_argv(argv: list[str]) -> list[str]:
    """The command line with the value of any ``--...token`` flag replaced by ``***``."""
    out, hide = [], False
    for arg in argv:
        flag, eq, _ = arg.partition("=")
        if hide:
            out.append("***")
        elif flag.startswith("-") and "token" in flag.lower() and eq:
            out.append(f"{flag}=***")
        else:
            out.append(arg)
        hide = flag.startswith("-") and "token" in flag.lower() and not eq
    return out


def write_run_config(accelerator, config: TrainConfig, run=None) -> Path:
    """Write ``<output_dir>/run_config.json`` (main process; see the module docstring). With the
    ``Run`` from setup, its ``resolved`` part too. Returns the file's path."""
    path = Path(config.output_dir) / RUN_CONFIG_FILE
    if not accelerator.is_main_process:
        return path
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record: dict[str, Any] = {
        "config": _json_value({k: v for k, v in fields.items() if "token" not in k.lower()}),
        "versions": software_versions(),
        "command": _masked_argv([sys.executable, *sys.argv]),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resolved": None,
    }
    if run is not None:
        record["resolved"] = _json_value(
            {
                "lr": run.lr,
                "global_batch_size": config.batch_size * accelerator.num_processes * config.grad_accum_steps,
                "updates_per_epoch": run.updates_per_epoch,
                "total_updates": run.total_updates,
                "num_classes": run.num_classes,
                "data_config": run.data_config,
                "teacher": run.teacher_info,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return path


def _count_params(manifest: dict[str, Any], source: str) -> int | None:
    """The parameter count of the network a cache was built with, from a weightless (``meta``
    device) copy of its architecture; None where the architecture or its class count is unknown."""
    name = manifest.get("teacher")
    if not name or source in ("module", "hf-hub"):
        return None
    kwargs: dict[str, Any] = {}
    if manifest.get("class_map") is None and source in ("checkpoint", "random"):
        kwargs["num_classes"] = manifest["num_classes"]  # a checkpoint's head predicts the student's classes
    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # an architecture this install cannot build: not recorded
        return None
    return sum(p.numel() for p in net.parameters())


def teacher_record(run) -> dict[str, Any] | None:
    """What teaches in ``run`` (``timm_kd.hub.describe_teacher``): the live network, or the teacher
    a cache was built with; None for a run without a teacher."""
    if run.wrapper is None:
        return None
    config, teacher = run.config, run.wrapper.teacher
    if isinstance(teacher, CachedTeacher):
        m = teacher.cache.manifest
        info = describe_teacher(
            m.get("teacher") or "",
            pretrained=bool(m.get("pretrained_teacher")),
            checkpoint=m.get("teacher_checkpoint"),
            checkpoint_sha256=m.get("teacher_checkpoint_sha256"),
        )
        if info["num_params"] is None:
            info["num_params"] = _count_params(m, info["source"])
        return {**info, "cache": Path(teacher.cache.root).name, "cache_top1": m.get("teacher_view_top1")}
    name = run.wrapper.teacher_name  # None: a module was given
    return describe_teacher(
        name if name is not None else teacher,
        model=teacher,
        pretrained=config.pretrained_teacher,
        checkpoint=config.teacher_checkpoint if name is not None else None,
    )


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
        "teacher_info": run.teacher_info if distill else None,
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
        "config_changes": run.state.get("config_changes") or None,
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
        last_eval = evaluate_on_val(run, final, "eval")
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
            # flags changed on resume, each with the step it applied from (the card's values are
            # the last ones; these say since when)
            "config_changes": state.get("config_changes") or [],
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
    Prints the repository's URL and the ``timm.create_model`` line that loads it. Returns the
    ``CommitInfo`` on the main process, ``None`` elsewhere.
    """
    if not result.is_main_process:
        return None
    meta = {k: v for k, v in result.card_meta.items() if v is not None}
    info = push_to_hub(result.output_dir / STUDENT_DIR, repo_id, private=private, token=token, **meta)
    print(push_report(repo_id, info), flush=True)
    return info
