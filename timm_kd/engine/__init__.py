"""The training engine: one Accelerate loop for distillation and for plain (cross-entropy) training.

A recipe is ``argparse -> TrainConfig -> fit(config) -> publish``::

    parser = argparse.ArgumentParser()
    add_train_args(parser, teacher="resnet50.tv_in1k", student="resnet18", method="ats")
    config = config_from_args(parser.parse_args())
    result = fit(config)              # trains, evaluates, saves <output_dir>/student + run_summary.json

The same script runs on one CPU, one GPU or many GPUs (``accelerate launch``), changing nothing but
arguments. What ``fit`` does, in order:

1. Checks the configuration (model and loss names, the loss's arguments, values, ``--resume``
   path), then the data (missing path, empty split, labels outside the classes, corrupt images)
   BEFORE any training.
2. Builds the student with timm (``pretrained=False`` unless asked) and, with a teacher, one
   ``DistillWrapper`` whose teacher is a live network (weights fetched once: main process first)
   or, with ``--teacher-cache``, a ``timm_kd.cache.CachedTeacher`` that rebuilds the teacher's
   logits from columns riding in the batch. Only the student, its optimizer and the loaders go
   through ``accelerator.prepare``; the frozen teacher is moved with ``.to(device)`` and never
   wrapped in DDP.
3. Evaluates the teacher once and stops if it is at chance level (a broken teacher, e.g. a class
   map or normalization mismatch), before hours are spent.
4. Trains: timm's ``create_optimizer_v2`` and ``create_scheduler_v2`` (updated per optimizer step),
   timm transforms, Mixup/CutMix (soft targets go to the loss), optional EMA (``ModelEmaV3``),
   gradient clipping, gradient accumulation, mixed precision (from ``accelerate launch
   --mixed_precision`` or ``mixed_precision=``), optional ``torch.compile``.
5. Evaluates top-1/top-5 after each epoch with the shipped ``evaluate`` metric on predictions
   gathered with ``accelerator.gather_for_metrics``; reports the last and the best epoch.
6. Checkpoints every N optimizer steps and after each epoch (``engine.checkpoint``: safetensors
   weights, the optimizer state read back weights-only, JSON for the rest, a manifest of sizes
   and SHA-256 written last; nothing in a checkpoint runs code when loaded), atomically (written
   to ``checkpoints/.tmp-step_N``, renamed once every rank has written its part), keeping the last
   K, and only with finite weights. ``resume="latest"`` (the newest intact checkpoint) or a path
   continues with the same data order, RNG, optimizer and counters: a resumed run ends with
   exactly the same weights as an uninterrupted one. Flags changed on resume are compared first:
   another student, optimizer or global batch is refused; the learning rate, schedule, epochs
   and the rest apply from that step, announced and recorded.
7. Saves the student in timm's format (``timm_kd.hub.save_pretrained``) into
   ``<output_dir>/student/`` and writes ``<output_dir>/run_summary.json``.

Modules: ``config`` (``TrainConfig``, every option once with its flag, help and choices;
results), ``args`` (the argparse parser generated from it), ``setup`` (accelerator, data,
models, the wrapper, optimizer, scheduler), ``loop`` (train, evaluate, ``fit``), ``evaluate``
(top-k accuracy, the teacher's chance test), ``checkpoint`` (atomic, verified save; exact
resume), ``resume`` (flags changed on resume), ``summary`` (the run folder, ``publish``),
``cache_teacher`` (building a teacher cache, a sibling of ``fit``), ``checks``
(``check_config``), ``recipes`` (the recipes' defaults, ``teacher_stage``), ``diagnose`` (a
teacher's logits on the training data and the ATS diagnostics: ``timm-kd diagnose``; candidate
teachers ranked by their statistics: ``timm-kd rank-teachers``), ``teacher_check`` (the teacher
check before training: chance level, calibration).

The names below are imported on first use (PEP 562): ``config`` and ``args`` import no torch, so
a parser and its ``--help`` are built without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:  # the static view of the lazy names below (and the import graph's edges)
    from .args import HelpFormatter, add_train_args, config_from_args
    from .cache_args import add_cache_args, cache_build_kwargs
    from .cache_teacher import build_cache_from_args, build_teacher_cache
    from .checkpoint import (
        STATE_FILE,
        CheckpointError,
        CheckpointWriteError,
        list_checkpoints,
        load_checkpoint,
        resolve_resume,
        save_checkpoint,
        verify_checkpoint,
    )
    from .checks import check_config, check_model_name
    from .config import (
        CHECKPOINT_DIR,
        CIFAR100_DEFAULTS,
        IMAGENET_DEFAULTS,
        BrokenTeacherError,
        EvalResult,
        FitResult,
        TrainConfig,
        TrainingDivergedError,
    )
    from .diagnose import collect_teacher_logits, diagnose_teacher, rank_teacher_candidates
    from .evaluate import evaluate_model, teacher_is_at_chance
    from .loop import TARGET_FLIP_WARNING, fit
    from .recipes import RECIPES, recipe_defaults, teacher_stage
    from .setup import build_accelerator
    from .summary import PREDICTIONS_FILE, STUDENT_DIR, SUMMARY_FILE, publish
    from .teacher_check import LOW_DARK_KNOWLEDGE

#: public name -> the engine module that defines it
_LAZY = {
    "HelpFormatter": "args",
    "add_train_args": "args",
    "config_from_args": "args",
    "add_cache_args": "cache_args",
    "cache_build_kwargs": "cache_args",
    "build_teacher_cache": "cache_teacher",
    "build_cache_from_args": "cache_teacher",
    "STATE_FILE": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointWriteError": "checkpoint",
    "verify_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint",
    "load_checkpoint": "checkpoint",
    "resolve_resume": "checkpoint",
    "save_checkpoint": "checkpoint",
    "check_config": "checks",
    "check_model_name": "checks",
    "CHECKPOINT_DIR": "config",
    "CIFAR100_DEFAULTS": "config",
    "IMAGENET_DEFAULTS": "config",
    "BrokenTeacherError": "config",
    "EvalResult": "config",
    "FitResult": "config",
    "TrainConfig": "config",
    "TrainingDivergedError": "config",
    "collect_teacher_logits": "diagnose",
    "diagnose_teacher": "diagnose",
    "rank_teacher_candidates": "diagnose",
    "evaluate_model": "evaluate",
    "teacher_is_at_chance": "evaluate",
    "TARGET_FLIP_WARNING": "loop",
    "fit": "loop",
    "RECIPES": "recipes",
    "recipe_defaults": "recipes",
    "teacher_stage": "recipes",
    "build_accelerator": "setup",
    "PREDICTIONS_FILE": "summary",
    "STUDENT_DIR": "summary",
    "SUMMARY_FILE": "summary",
    "publish": "summary",
    "LOW_DARK_KNOWLEDGE": "teacher_check",
}


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)


__all__ = [
    "TrainConfig",
    "IMAGENET_DEFAULTS",
    "CIFAR100_DEFAULTS",
    "FitResult",
    "EvalResult",
    "TrainingDivergedError",
    "BrokenTeacherError",
    "fit",
    "RECIPES",
    "recipe_defaults",
    "teacher_stage",
    "collect_teacher_logits",
    "diagnose_teacher",
    "rank_teacher_candidates",
    "evaluate_model",
    "add_train_args",
    "config_from_args",
    "check_config",
    "check_model_name",
    "build_accelerator",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "verify_checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "teacher_is_at_chance",
    "publish",
    "build_teacher_cache",
    "build_cache_from_args",
    "add_cache_args",
    "cache_build_kwargs",
    "HelpFormatter",
    "TARGET_FLIP_WARNING",
    "LOW_DARK_KNOWLEDGE",
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "SUMMARY_FILE",
    "PREDICTIONS_FILE",
    "STUDENT_DIR",
]
