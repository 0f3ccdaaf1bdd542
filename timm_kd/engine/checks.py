"""Checks of a ``TrainConfig`` before anything is loaded: names, values, choices, paths.

Separate from ``config`` because they need timm and the loss registry (torch), while the options
themselves, and the parser generated from them, do not: ``--help`` never imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os

import timm

from ..losses import create_loss, get_loss_entrypoint
from ..models import check_checkpoint_file, check_local_dir
from .config import CHECKPOINT_DIR, TrainConfig, option_flag

__all__ = ["check_config", "check_model_name"]

_LOCAL_MODEL_PREFIXES = ("local-dir:",)
_HUB_MODEL_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")


def _check_choices(config: TrainConfig) -> None:
    """Every field with ``choices`` metadata holds one of them (or None where its default is None)."""
    for f in dataclasses.fields(TrainConfig):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed is None or value in allowed or (value is None and f.default is None):
            continue
        names = [repr(a) + (" (default)" if a == f.default else "") for a in allowed]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{option_flag(f)} must be {listed}, got {value!r}.")


def _check_positive(config: TrainConfig) -> None:
    names = ["epochs", "batch_size", "grad_accum_steps", "log_every", "keep_checkpoints"]
    optional = ["checkpoint_every", "max_train_steps", "max_eval_steps", "steps_per_epoch", "eval_batch_size"]
    for name in names + [n for n in optional if getattr(config, n) is not None]:
        v = getattr(config, name)
        if int(v) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {config.lr}")
    if config.num_workers < 0:
        raise ValueError(
            f"--num-workers must be >= 0 (0: load in the training process), got {config.num_workers}"
        )
    if config.prefetch_factor is not None and config.prefetch_factor < 1:
        raise ValueError(f"--prefetch-factor must be >= 1, got {config.prefetch_factor}")


def _check_teacher_cache(config: TrainConfig) -> None:
    if not (config.teacher_cache and config.method != "ce"):
        return
    if not os.path.isdir(config.teacher_cache):
        raise FileNotFoundError(
            f"--teacher-cache {config.teacher_cache!r} does not exist; build it first with "
            f"`timm-kd cache-teacher --cache-dir {config.teacher_cache} ...` (see docs/cache.md)."
        )
    if config.mixup > 0 or config.cutmix > 0:
        raise ValueError(
            "--teacher-cache stores the teacher's logits of single images; Mixup/CutMix mix images "
            "after the teacher ran, so their teacher logits are unknown. Drop --mixup/--cutmix, or "
            "distill online (no --teacher-cache)."
        )
    if config.streaming:
        raise ValueError(
            "--teacher-cache replays views by row index; it does not work with --streaming. Drop one."
        )


#: --report-to name -> (module it needs, pip package)
_TRACKERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def _check_trackers(config: TrainConfig) -> None:
    """Each tracker named in ``--report-to`` is installed: accelerate would skip a missing one with a
    log line and the run would train unrecorded."""
    for name in (s.strip() for s in (config.report_to or "").split(",")):
        module, package = _TRACKERS.get(name, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ValueError(
                f"--report-to {name}: {module} is not installed, so the run would not be recorded. "
                f"Install it (pip install {package}) or drop {name} from --report-to."
            )


def check_config(config: TrainConfig) -> None:
    """Validate names and values before any data is read; raise ``ValueError``/``FileNotFoundError``
    naming the fix.

    With a distillation method the loss is created once here with ``loss_kwargs``, so an unknown
    loss name or a mistyped ``--loss-arg`` fails now (the error names the loss's parameters).
    """
    if config.method != "ce":
        get_loss_entrypoint(config.method)  # unknown names raise with a suggestion
        if config.teacher is None:
            raise ValueError(
                f"method {config.method!r} distills from a teacher but no teacher was given: pass "
                f"--teacher MODEL (a timm name, hf-hub:org/name or local-dir:PATH), or --method ce to "
                f"train the student alone."
            )
    check_model_name(config.student, "student")
    if config.teacher is not None and config.method != "ce":
        check_model_name(config.teacher, "teacher")
    for role in ("teacher", "student"):
        path = getattr(config, f"{role}_checkpoint")
        if path is not None:
            check_checkpoint_file(path, role)  # a folder is named as one, with what to pass instead
    _check_positive(config)
    _check_choices(config)
    _check_teacher_cache(config)
    _check_trackers(config)
    if config.resume not in (None, "", "latest") and not os.path.isdir(config.resume):
        raise FileNotFoundError(
            f"--resume {config.resume!r} is not a checkpoint folder. Pass a folder written by a previous "
            f"run ({config.output_dir}/{CHECKPOINT_DIR}/step_N) or 'latest'."
        )
    if config.method != "ce":
        create_loss(config.method, **config.loss_kwargs)  # bad --loss-arg: names the loss's parameters


def check_model_name(name: str, role: str) -> None:
    """Raise a ``ValueError`` with suggestions if ``name`` is not a timm model (or hub/local id)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{role} model name must be a non-empty string, got {name!r}")
    if name.startswith(_LOCAL_MODEL_PREFIXES):
        check_local_dir(name, role)  # missing folder, no config.json, a run folder (its student/)
        return
    if name.startswith(_HUB_MODEL_PREFIXES):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown {role} model {name!r}.{hint} Use a timm architecture name "
            f"(timm.list_models('*resnet*') lists them; a pretrained tag such as 'resnet50.tv_in1k' is "
            f"allowed), 'hf-hub:org/name' for a model on the Hugging Face Hub, or 'local-dir:PATH' for a "
            f"saved timm-format folder."
        )
