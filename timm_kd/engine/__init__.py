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
6. Checkpoints with ``accelerator.save_state`` every N optimizer steps and after each epoch,
   atomically (written to ``checkpoints/.tmp-step_N``, renamed by the main process once every rank
   has written its part), keeping the last K. ``resume="latest"`` (or a path) continues with the
   same data order, RNG, optimizer, scheduler and counters: a resumed run ends with exactly the
   same weights as an uninterrupted one.
7. Saves the student in timm's format (``timm_kd.hub.save_pretrained``) into
   ``<output_dir>/student/`` and writes ``<output_dir>/run_summary.json``.

Modules: ``config`` (``TrainConfig``, every option once with its flag, help and choices; results;
``check_config``), ``args`` (the argparse parser generated from it), ``setup`` (accelerator, data,
models, the wrapper, optimizer, scheduler), ``loop`` (train, evaluate, ``fit``), ``evaluate``
(top-k accuracy, the teacher's chance test), ``checkpoint`` (atomic save, exact resume),
``summary`` (the run folder, ``publish``), ``cache_teacher`` (building a teacher cache, a sibling
of ``fit``).
"""

from .args import HelpFormatter, add_train_args, config_from_args
from .cache_teacher import build_teacher_cache
from .checkpoint import STATE_FILE, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .config import (
    CHECKPOINT_DIR,
    CIFAR100_DEFAULTS,
    IMAGENET_DEFAULTS,
    BrokenTeacherError,
    EvalResult,
    FitResult,
    TrainConfig,
    TrainingDivergedError,
    check_config,
    check_model_name,
)
from .evaluate import evaluate_model, teacher_is_at_chance
from .loop import TARGET_FLIP_WARNING, fit
from .setup import build_accelerator
from .summary import PREDICTIONS_FILE, STUDENT_DIR, SUMMARY_FILE, publish

__all__ = [
    "TrainConfig",
    "IMAGENET_DEFAULTS",
    "CIFAR100_DEFAULTS",
    "FitResult",
    "EvalResult",
    "TrainingDivergedError",
    "BrokenTeacherError",
    "fit",
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
    "teacher_is_at_chance",
    "publish",
    "build_teacher_cache",
    "HelpFormatter",
    "TARGET_FLIP_WARNING",
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "SUMMARY_FILE",
    "PREDICTIONS_FILE",
    "STUDENT_DIR",
]
