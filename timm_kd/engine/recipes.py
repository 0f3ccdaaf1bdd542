"""The recipes' defaults by name: what ``timm-kd train --recipe NAME`` and ``recipes/NAME.py`` start from.

A recipe is a table of ``TrainConfig`` defaults: the dataset's practice (``IMAGENET_DEFAULTS``,
``CIFAR100_DEFAULTS``) plus the method's settings. ``recipe_defaults(name, method)`` merges them;
``add_train_args(parser, **recipe_defaults(...))`` shows them in ``--help``. This module, like
``config`` and ``args``, imports no torch.

A recipe whose defaults name no teacher (``cifar100``) first trains one with cross-entropy, as the
papers do before distilling: ``teacher_stage`` gives that run's configuration and the distillation's,
which then reads the trained teacher from its timm-format folder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .config import CIFAR100_DEFAULTS, IMAGENET_DEFAULTS, TrainConfig

__all__ = [
    "RECIPES",
    "CIFAR100_METHODS",
    "IMAGENET_ATS",
    "IMAGENET_DTKD",
    "recipe_defaults",
    "teacher_stage",
    "TEACHER_STAGE_DIR",
]

#: ATS on ImageNet: the authors' default temperatures tau_correct=4, tau_wrong=3, student
#: temperature 1, lambda=0.5 (kd_weight).
IMAGENET_ATS: dict[str, Any] = dict(
    method="ats",
    loss_kwargs={"tau_correct": 4.0, "tau_wrong": 3.0, "student_tau": 1.0, "kd_weight": 0.5},
    output_dir="runs/imagenet_ats",
)

#: DTKD on ImageNet: the authors' tau=4, alpha=3 (dtkd_weight), beta=1 (kd_weight), gamma=1
#: (ce_weight). They warm the KD terms up over 20 of 240 CIFAR epochs; on ImageNet's 100 epochs the
#: warm-up is 1 epoch, as mdistiller's ImageNet settings do for DKD.
IMAGENET_DTKD: dict[str, Any] = dict(
    method="dtkd",
    loss_kwargs={"tau": 4.0, "dtkd_weight": 3.0, "kd_weight": 1.0, "ce_weight": 1.0, "warmup_epochs": 1},
    output_dir="runs/imagenet_dtkd",
)

#: CIFAR-100 settings per method (everything else: ``CIFAR100_DEFAULTS``). ATS/ISATS: batch 128 and
#: a 5-epoch linear warm-up (ATS authors' scripts); DTKD: the authors' res32x4 -> res8x4 setting;
#: KD: mdistiller's. Other losses: batch 64 and their own defaults; ``ce``: the student alone.
CIFAR100_METHODS: dict[str, dict[str, Any]] = {
    "ats": dict(
        batch_size=128,
        warmup_epochs=5,
        warmup_lr=0.0,
        loss_kwargs={"tau_correct": 4.0, "tau_wrong": 3.0, "student_tau": 1.0, "kd_weight": 0.5},
    ),
    "isats": dict(
        batch_size=128, warmup_epochs=5, warmup_lr=0.0, loss_kwargs={"tau_correct": 4.0, "kd_weight": 0.5}
    ),
    "dtkd": dict(
        batch_size=64,
        loss_kwargs={"tau": 4.0, "dtkd_weight": 3.0, "kd_weight": 1.0, "ce_weight": 1.0, "warmup_epochs": 20},
    ),
    "kd": dict(batch_size=64, loss_kwargs={"tau": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}),
}

#: recipe name -> (the dataset's defaults, the method's settings; for cifar100, per method)
RECIPES: dict[str, Any] = {
    "imagenet_ats": (IMAGENET_DEFAULTS, IMAGENET_ATS),
    "imagenet_dtkd": (IMAGENET_DEFAULTS, IMAGENET_DTKD),
    "cifar100": (CIFAR100_DEFAULTS, CIFAR100_METHODS),
}

#: where ``teacher_stage`` trains the teacher, under the run's output folder
TEACHER_STAGE_DIR = "teacher"


def recipe_defaults(name: str, method: str | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` defaults of recipe ``name``; ``method`` replaces the recipe's method
    (cifar100 then takes that method's settings; an ImageNet recipe keeps its schedule and drops its
    loss arguments, which belong to its own loss)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    base, settings = RECIPES[name]
    if name == "cifar100":
        method = method or "ats"
        return {**base, "method": method, **settings.get(method, {})}
    out = {**base, **settings}
    if method is not None and method != out["method"]:
        out.update(method=method, loss_kwargs={})
    return out


def teacher_stage(
    config: TrainConfig, arch: str, epochs: int
) -> tuple[TrainConfig | None, TrainConfig]:
    """``(teacher_config, distill_config)``: with a distillation method and no teacher (no
    ``--teacher``, no ``--teacher-checkpoint``), a cross-entropy run of ``arch`` for ``epochs`` into
    ``<output_dir>/teacher`` and the distillation from its saved student; otherwise ``(None, config)``."""
    if config.method == "ce" or config.teacher is not None or config.teacher_checkpoint is not None:
        return None, config
    teacher_dir = os.path.join(config.output_dir, TEACHER_STAGE_DIR)
    teacher = dataclasses.replace(
        config, student=arch, method="ce", loss_kwargs={}, epochs=epochs, output_dir=teacher_dir
    )
    distill = dataclasses.replace(
        config, teacher=f"local-dir:{os.path.join(teacher_dir, 'student')}", pretrained_teacher=True
    )
    return teacher, distill
