"""Resuming with other flags: what a checkpoint's configuration and this run's may differ in.

A checkpoint stores the run's ``TrainConfig`` and what it resolved to (learning rate, classes,
processes, global batch, optimizer steps per epoch). ``compare_config`` sorts the differences:
refused (the checkpoint's tensors would not fit, or its position in the epoch would mean other
samples), applied and recorded (what the student learns from: learning rate and schedule,
epochs, loss, teacher, augmentation, seed), applied only (how the run is watched or fed).
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare_config", "REFUSED", "REFUSED_RESOLVED", "NOT_COMPARED", "RUNTIME"]


#: flags a resume cannot change: the checkpoint's tensors would not fit, or mean something else
REFUSED = {
    "student": "the checkpoint's weights belong to another architecture",
    "opt": "the optimizer state (momentum buffers, moments) belongs to another optimizer",
    "model_ema": "the checkpoint holds EMA weights exactly when --model-ema was on",
}
#: resolved values a resume cannot change (not flags themselves, but what flags and data decide)
REFUSED_RESOLVED = {
    "num_classes": "the classifier has another number of outputs",
    "global_batch_size": (
        "the global batch (batch size x processes x accumulation) changed, so the position in the "
        "epoch and the schedule, which count optimizer steps, would mean other samples"
    ),
    "updates_per_epoch": (
        "the optimizer steps per epoch changed (dataset size or --steps-per-epoch), so the position in "
        "the epoch and the schedule would mean other samples"
    ),
}
#: flags that say where a run starts or writes: not compared
NOT_COMPARED = ("resume", "output_dir", "pretrained_student", "student_checkpoint")
#: flags that change how a run is watched or fed, not what it learns: applied, not recorded
RUNTIME = (
    "num_workers", "pin_memory", "persistent_workers", "prefetch_factor", "progress", "report_to",
    "log_every", "checkpoint_every", "keep_checkpoints", "max_eval_steps", "eval_batch_size",
    "teacher_check", "license", "verify_images", "compile", "compile_teacher", "compile_loss",
    "max_train_steps",
)  # fmt: skip


def compare_config(saved: dict[str, Any], now: dict[str, Any], flags: dict[str, str]):
    """What differs between a checkpoint's run and this one.

    ``saved`` / ``now``: ``{"config": TrainConfig fields, "resolved": {...}}`` as JSON values;
    ``flags``: field name -> command-line flag. Returns ``(refused, applied)``: lists of
    ``(flag, old, new, why)`` (``why`` empty for applied ones); ``applied`` entries whose flag is in
    ``RUNTIME`` are marked with ``why="runtime"``.
    """
    refused, applied = [], []
    old_cfg, new_cfg = saved.get("config", {}), now["config"]
    for name, new in new_cfg.items():
        if name in NOT_COMPARED or name not in old_cfg or old_cfg[name] == new:
            continue
        flag, old = flags.get(name, "--" + name.replace("_", "-")), old_cfg[name]
        if name in REFUSED:
            refused.append((flag, old, new, REFUSED[name]))
        else:
            applied.append((flag, old, new, "runtime" if name in RUNTIME else ""))
    old_res, new_res = saved.get("resolved", {}), now["resolved"]
    for name, new in new_res.items():
        if name in old_res and old_res[name] != new:
            if name in REFUSED_RESOLVED:
                refused.append((name.replace("_", " "), old_res[name], new, REFUSED_RESOLVED[name]))
            elif name not in ("lr",) or (old_cfg.get("lr") == new_cfg.get("lr")):
                applied.append((name.replace("_", " "), old_res[name], new, ""))
    return refused, applied
