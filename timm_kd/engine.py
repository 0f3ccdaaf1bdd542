"""The training engine: one Accelerate loop for distillation and for plain (cross-entropy) training.

A recipe is ``argparse -> TrainConfig -> fit(config) -> publish``::

    parser = argparse.ArgumentParser()
    add_train_args(parser, teacher="resnet50.tv_in1k", student="resnet18", method="ats")
    config = config_from_args(parser.parse_args())
    result = fit(config)              # trains, evaluates, saves <output_dir>/student + run_summary.json

The same script runs on one CPU, one GPU or many GPUs (``accelerate launch``), changing nothing but
arguments. What ``fit`` does, in order:

1. Checks the configuration (model and loss names, values, ``--resume`` path), then the data
   (missing path, empty split, labels outside the classes, corrupt images) BEFORE any training.
2. Builds the student with timm (``pretrained=False`` unless asked) and, with a teacher, a
   ``DistillWrapper`` (teacher weights fetched once: main process first). Only the student, its
   optimizer and the loaders go through ``accelerator.prepare``; the frozen teacher is moved with
   ``.to(device)`` and never wrapped in DDP.
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

Reproducibility. The order of the training samples is a pure function of ``(seed, epoch)``
(``timm_kd.data.SeededSampler``), the augmentation of a sample a pure function of ``(seed, epoch,
index)`` (``TransformedImageDataset``), and the global RNGs (Mixup/CutMix, drop-path, dropout) are
re-seeded before every batch from ``(seed, rank, epoch, batch)``. So skipping the first batches of
an epoch on resume replays exactly what an uninterrupted run would have seen.

Steps. ``global_step`` counts optimizer updates (``grad_accum_steps`` batches each); the scheduler,
``checkpoint_every``, ``log_every`` and ``max_train_steps`` all count optimizer updates.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

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
    "build_accelerator",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "teacher_is_at_chance",
    "publish",
    "HelpFormatter",
]

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "run_summary.json"
PREDICTIONS_FILE = "predictions.safetensors"
STUDENT_DIR = "student"
_CKPT_RE = re.compile(r"^step_(\d+)$")
_LOCAL_MODEL_PREFIXES = ("local-dir:",)
# what a teacher-cache batch carries for the loss (timm_kd.cache.TEACHER_KEYS)
_CACHE_KEYS = ("teacher_values", "teacher_indices", "teacher_lse", "teacher_tail_lse")
_HUB_MODEL_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class BrokenTeacherError(RuntimeError):
    """The teacher's accuracy on the validation split is at chance level."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything one training run needs. Field names match the recipes' flags (``--weight-decay``
    -> ``weight_decay``); ``add_train_args`` documents each one."""

    # models
    student: str = "resnet18"
    teacher: str | None = "resnet50.tv_in1k"
    pretrained_teacher: bool = True
    teacher_checkpoint: str | None = None
    teacher_cache: str | None = None
    teacher_cache_tail: str = "prior"
    pretrained_student: bool = False
    student_checkpoint: str | None = None
    num_classes: int | None = None
    class_map: str | None = None
    # method
    method: str = "ats"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # data
    dataset: str = "imagenet-1k"
    train_split: str = "train"
    val_split: str = "validation"
    streaming: bool = False
    image_column: str | None = None
    label_column: str | None = None
    embedded_kwargs: dict[str, Any] = field(default_factory=dict)
    verify_images: str = "auto"
    on_corrupt: str = "error"
    num_workers: int = 4
    pin_memory: bool | None = None  # None: on when training on CUDA
    persistent_workers: bool = True
    prefetch_factor: int | None = None  # batches loaded ahead per worker (None: torch's 2)
    steps_per_epoch: int | None = None
    # transforms and augmentation (None: timm's default for the student)
    input_size: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    no_aug: bool = False
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None
    hflip: float | None = None
    color_jitter: float | None = None
    auto_augment: str | None = None
    reprob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.0
    # optimization
    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: int | None = None
    grad_accum_steps: int = 1
    opt: str = "sgd"
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad: float | None = None
    clip_mode: str = "norm"
    sched: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    decay_milestones: tuple[int, ...] = (30, 60, 90)
    decay_rate: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # runtime
    seed: int = 42
    mixed_precision: str | None = None
    compile: bool = False
    compile_teacher: bool = False
    compile_loss: bool = False
    channels_last: bool = False
    output_dir: str = "runs/train"
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    resume: str | None = None
    max_train_steps: int | None = None
    max_eval_steps: int | None = None
    log_every: int = 50
    report_to: str | None = None
    teacher_check: str = "auto"
    progress: bool = True
    license: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: ImageNet-1k practice of the KD literature for ResNets (mdistiller and torchdistill's ImageNet
#: settings: SGD, momentum 0.9, lr 0.1 per 256 images, weight decay 1e-4, 100 epochs, lr x0.1 at
#: epochs 30/60/90; random-resized crop + flip, 224 px, bilinear, crop 0.875), shared by every
#: ImageNet recipe. The teacher is a plain cross-entropy-trained torchvision ResNet-50 (76.1 % top-1);
#: timm's a1/a2/a3 ResNet weights were trained with binary cross-entropy ("ResNet strikes back"), so
#: their softmax is not the distribution KD losses expect.
IMAGENET_DEFAULTS: dict[str, Any] = dict(
    dataset="imagenet-1k",
    train_split="train",
    val_split="validation",
    teacher="resnet50.tv_in1k",
    student="resnet18",
    epochs=100,
    batch_size=64,
    opt="sgd",
    lr_base=0.1,
    lr_base_size=256,
    momentum=0.9,
    weight_decay=1e-4,
    sched="multistep",
    decay_milestones=(30, 60, 90),
    decay_rate=0.1,
    input_size=224,
    crop_pct=0.875,
    interpolation="bilinear",
    color_jitter=0.0,
    hflip=0.5,
    num_workers=8,
    checkpoint_every=2000,
    log_every=100,
    output_dir="runs/imagenet",
)

#: CIFAR-100 practice of the ATS, DTKD and mdistiller papers: SGD, momentum 0.9, lr 0.05, weight
#: decay 5e-4, 240 epochs, lr x0.1 at epochs 150/180/210, 32 px, flips. Batch size and warm-up are
#: per method (see recipes/cifar100.py).
CIFAR100_DEFAULTS: dict[str, Any] = dict(
    dataset="uoft-cs/cifar100",
    train_split="train",
    val_split="test",
    teacher=None,
    student="resnet18",
    epochs=240,
    batch_size=64,
    opt="sgd",
    lr=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    sched="multistep",
    decay_milestones=(150, 180, 210),
    decay_rate=0.1,
    input_size=32,
    crop_pct=1.0,
    scale=(0.6, 1.0),
    hflip=0.5,
    color_jitter=0.0,
    mean=(0.5071, 0.4867, 0.4408),
    std=(0.2675, 0.2565, 0.2761),
    num_workers=4,
    output_dir="runs/cifar100",
)


@dataclass
class EvalResult:
    """Top-k accuracy of one model on the validation split, with the gathered predictions."""

    metrics: dict[str, float]  # {"top1": %, "top5": %, "num_samples": n}
    topk: torch.Tensor  # [N, k] class ids ranked best first (CPU)
    labels: torch.Tensor  # [N] (CPU)


@dataclass
class FitResult:
    """What ``fit`` returns (identical on every rank)."""

    student: nn.Module  # the trained student, unwrapped, in eval mode (the EMA weights with model_ema)
    metrics: dict[str, float] | None  # last evaluation
    best_metrics: dict[str, float] | None
    best_epoch: int | None
    teacher_metrics: dict[str, float] | None
    summary: dict[str, Any]  # the content of run_summary.json
    output_dir: Path
    global_step: int
    is_main_process: bool

    @property
    def card_meta(self) -> dict[str, Any]:
        """The model-card metadata of the run (``run_summary.json`` without its ``"run"`` details)."""
        return {k: v for k, v in self.summary.items() if k != "run"}


def check_config(config: TrainConfig) -> None:
    """Validate names and values; raise ``ValueError``/``FileNotFoundError`` naming the fix."""
    from .losses import get_loss_entrypoint

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
    for name in ("teacher_checkpoint", "student_checkpoint"):
        path = getattr(config, name)
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path!r} does not exist.")
    positive = {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "log_every": config.log_every,
        "keep_checkpoints": config.keep_checkpoints,
    }
    for opt_name in (
        "checkpoint_every",
        "max_train_steps",
        "max_eval_steps",
        "steps_per_epoch",
        "eval_batch_size",
    ):
        if getattr(config, opt_name) is not None:
            positive[opt_name] = getattr(config, opt_name)
    for k, v in positive.items():
        if int(v) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    choices = {
        "on_corrupt": ("error", "skip"),
        "verify_images": ("auto", "yes", "no"),
        "teacher_check": ("auto", "error", "warn", "off"),
        "clip_mode": ("norm", "value", "agc"),
        "mixed_precision": (None, "no", "fp16", "bf16", "fp8"),
    }
    for k, allowed in choices.items():
        if getattr(config, k) not in allowed:
            raise ValueError(
                f"--{k.replace('_', '-')} must be one of {[a for a in allowed if a]}, "
                f"got {getattr(config, k)!r}"
            )
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise ValueError(f"--lr must be a finite number > 0, got {config.lr}")
    if config.num_workers < 0:
        raise ValueError(
            f"--num-workers must be >= 0 (0: load in the training process), got {config.num_workers}"
        )
    if config.prefetch_factor is not None and config.prefetch_factor < 1:
        raise ValueError(f"--prefetch-factor must be >= 1, got {config.prefetch_factor}")
    if config.teacher_cache and config.method != "ce":
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
    if config.teacher_cache_tail not in ("prior", "flat"):
        raise ValueError(
            f"--teacher-cache-tail must be 'prior' (default) or 'flat', got {config.teacher_cache_tail!r}."
        )
    if config.resume not in (None, "", "latest") and not os.path.isdir(config.resume):
        raise FileNotFoundError(
            f"--resume {config.resume!r} is not a checkpoint folder. Pass a folder written by a previous "
            f"run ({config.output_dir}/{CHECKPOINT_DIR}/step_N) or 'latest'."
        )


def check_model_name(name: str, role: str) -> None:
    """Raise a ``ValueError`` with suggestions if ``name`` is not a timm model (or hub/local id)."""
    import timm

    if not isinstance(name, str) or not name:
        raise ValueError(f"{role} model name must be a non-empty string, got {name!r}")
    if name.startswith(_LOCAL_MODEL_PREFIXES):
        path = name.split(":", 1)[1]
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{role} {name!r}: folder {path!r} does not exist. A local-dir: model is a folder "
                f"with config.json and model.safetensors (what timm_kd.hub.save_pretrained writes)."
            )
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


def _resolve_lr(config: TrainConfig, world_size: int) -> float:
    """``--lr``, or timm's linear scaling rule ``lr_base * global_batch / lr_base_size``."""
    if config.lr is not None:
        return float(config.lr)
    global_batch = config.batch_size * world_size * config.grad_accum_steps
    return config.lr_base * global_batch / config.lr_base_size


# --------------------------------------------------------------------------------------------------
# Command line: every recipe shares these flags; recipes only change the defaults
# --------------------------------------------------------------------------------------------------


def _parse_pair(text: str) -> tuple[float, float]:
    a, b = (float(x) for x in text.split(","))
    return (a, b)


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _parse_kv(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "") else int(text)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Recipe ``--help``: the script's docstring as written, and each flag's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, True, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def add_train_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add the engine's flags to ``parser``, with ``defaults`` (TrainConfig field names) overriding
    the TrainConfig defaults. Returns ``parser``. ``config_from_args`` turns the result into a
    ``TrainConfig``."""
    d = TrainConfig(
        **{k: v for k, v in defaults.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    )
    unknown = set(defaults) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"add_train_args: unknown defaults {sorted(unknown)}")

    g = parser.add_argument_group("models")
    g.add_argument(
        "--student", default=d.student, help="timm model name of the student (or hf-hub:/local-dir:)"
    )
    g.add_argument(
        "--teacher",
        default=d.teacher,
        help="teacher: a timm name with pretrained tag (e.g. resnet50.tv_in1k), hf-hub:org/name or "
        "local-dir:PATH; ignored with --method ce",
    )
    g.add_argument(
        "--no-pretrained-teacher",
        dest="pretrained_teacher",
        action="store_false",
        default=d.pretrained_teacher,
        help="build the teacher with random weights (smoke tests only; the teacher check then only warns)",
    )
    g.add_argument(
        "--teacher-checkpoint", default=d.teacher_checkpoint, help="teacher weights (.safetensors)"
    )
    g.add_argument(
        "--teacher-cache",
        default=d.teacher_cache,
        metavar="DIR",
        help="distill from the stored top-k logits of a `timm-kd cache-teacher` folder instead of running "
        "the teacher (no teacher in memory; see docs/cache.md)",
    )
    g.add_argument(
        "--teacher-cache-tail",
        choices=("prior", "flat"),
        default=d.teacher_cache_tail,
        help="how the logits the cache dropped are rebuilt: shaped by the cache's tail prior (the teacher's "
        "mean log-probabilities per top-1 class; default) or one flat value (an ablation)",
    )
    g.add_argument(
        "--pretrained-student",
        action="store_true",
        default=d.pretrained_student,
        help="start the student from timm's pretrained weights",
    )
    g.add_argument(
        "--student-checkpoint", default=d.student_checkpoint, help="student weights (.safetensors)"
    )
    g.add_argument(
        "--num-classes",
        type=int,
        default=d.num_classes,
        help="student classes (default: the dataset's number of classes)",
    )
    g.add_argument(
        "--class-map",
        default=d.class_map,
        help="file mapping teacher classes to dataset classes, for a teacher trained on other classes",
    )

    g = parser.add_argument_group("distillation method")
    g.add_argument(
        "--method",
        default=d.method,
        help="loss name from timm_kd.list_losses() (kd, ats, isats, dtkd, dkd, dist, lskd), or 'ce' to train "
        "the student alone with cross-entropy",
    )
    g.add_argument(
        "--loss-arg",
        dest="loss_args",
        action="append",
        type=_parse_kv,
        default=[],
        metavar="KEY=VALUE",
        help=f"loss hyper-parameter, repeatable (e.g. --loss-arg tau_wrong=2); defaults: {d.loss_kwargs}",
    )

    g = parser.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.dataset,
        help="'embedded' (built-in digits task, no download), a local image folder or saved dataset, "
        "or a Hugging Face Hub dataset id (imagenet-1k, uoft-cs/cifar100)",
    )
    g.add_argument("--train-split", default=d.train_split, help="training split name")
    g.add_argument("--val-split", default=d.val_split, help="evaluation split name")
    g.add_argument(
        "--streaming",
        action="store_true",
        default=d.streaming,
        help="stream the dataset instead of downloading it (needs --steps-per-epoch if the size is unknown)",
    )
    g.add_argument("--image-column", default=d.image_column, help="image column (default: detected)")
    g.add_argument("--label-column", default=d.label_column, help="label column (default: detected)")
    g.add_argument(
        "--verify-images",
        choices=("auto", "yes", "no"),
        default=d.verify_images,
        help="decode every image before training to find corrupt files ('auto': for local folders only)",
    )
    g.add_argument(
        "--on-corrupt",
        choices=("error", "skip"),
        default=d.on_corrupt,
        help="a corrupt image stops the run before training ('error') or is skipped and counted ('skip')",
    )
    g.add_argument(
        "--num-workers", type=int, default=d.num_workers, help="data loader worker processes per rank"
    )
    g.add_argument(
        "--pin-memory",
        action=argparse.BooleanOptionalAction,
        default=d.pin_memory,
        help="page-locked batches, copied to the GPU asynchronously (default: on with CUDA)",
    )
    g.add_argument(
        "--persistent-workers",
        action=argparse.BooleanOptionalAction,
        default=d.persistent_workers,
        help="keep the loader workers alive between epochs (with --num-workers > 0)",
    )
    g.add_argument(
        "--prefetch-factor",
        type=int,
        default=d.prefetch_factor,
        help="batches each worker loads ahead (default: torch's 2; with --num-workers > 0)",
    )
    g.add_argument(
        "--steps-per-epoch",
        type=int,
        default=d.steps_per_epoch,
        help="batches per epoch and rank for streamed datasets of unknown size",
    )
    g.add_argument(
        "--embedded-arg",
        dest="embedded_args",
        action="append",
        type=_parse_kv,
        default=[],
        metavar="KEY=VALUE",
        help="argument of timm_kd.data.make_embedded_dataset for --dataset embedded, repeatable "
        f"(e.g. num_train=2000); defaults: {d.embedded_kwargs}",
    )

    g = parser.add_argument_group("transforms and augmentation (timm)")
    g.add_argument("--input-size", type=int, default=d.input_size, help="image side (default: the student's)")
    g.add_argument("--crop-pct", type=float, default=d.crop_pct, help="eval center-crop fraction")
    g.add_argument(
        "--interpolation", default=d.interpolation, help="resize interpolation (bilinear, bicubic)"
    )
    g.add_argument("--mean", type=_parse_floats, default=d.mean, help="normalization mean, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_parse_floats, default=d.std, help="normalization std")
    g.add_argument(
        "--no-aug", action="store_true", default=d.no_aug, help="no random augmentation when training"
    )
    g.add_argument(
        "--scale", type=_parse_pair, default=d.scale, help="random-resized-crop area range, e.g. 0.08,1"
    )
    g.add_argument("--ratio", type=_parse_pair, default=d.ratio, help="random-resized-crop aspect range")
    g.add_argument("--hflip", type=float, default=d.hflip, help="horizontal flip probability (timm: 0.5)")
    g.add_argument("--color-jitter", type=float, default=d.color_jitter, help="color jitter strength")
    g.add_argument(
        "--aa", dest="auto_augment", default=d.auto_augment, help="AutoAugment policy, e.g. rand-m9-mstd0.5"
    )
    g.add_argument("--reprob", type=float, default=d.reprob, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=d.mixup, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="cutmix alpha (0: off)")
    g.add_argument(
        "--mixup-prob", type=float, default=d.mixup_prob, help="probability of mixup/cutmix per batch"
    )
    g.add_argument(
        "--mixup-switch-prob", type=float, default=d.mixup_switch_prob, help="cutmix instead of mixup"
    )
    g.add_argument("--smoothing", type=float, default=d.smoothing, help="label smoothing (soft targets)")

    g = parser.add_argument_group("optimization (timm factories)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size per process (GPU)")
    g.add_argument(
        "--eval-batch-size", type=int, default=d.eval_batch_size, help="eval batch size per process"
    )
    g.add_argument(
        "--grad-accum-steps", type=int, default=d.grad_accum_steps, help="batches per optimizer step"
    )
    g.add_argument("--opt", default=d.opt, help="timm optimizer name (sgd, adamw, lamb, ...)")
    g.add_argument(
        "--lr",
        type=float,
        default=d.lr,
        help="learning rate (default: lr-base * global batch / lr-base-size)",
    )
    g.add_argument(
        "--lr-base", type=float, default=d.lr_base, help="learning rate for a global batch of lr-base-size"
    )
    g.add_argument("--lr-base-size", type=int, default=d.lr_base_size, help="batch size lr-base refers to")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient clipping threshold (off)")
    g.add_argument("--clip-mode", default=d.clip_mode, choices=("norm", "value", "agc"), help="clipping mode")
    g.add_argument("--sched", default=d.sched, help="timm scheduler (cosine, step, multistep, constant, ...)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up epochs")
    g.add_argument(
        "--warmup-lr", type=float, default=d.warmup_lr, help="learning rate at the start of warm-up"
    )
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="lower bound of the cosine schedule")
    g.add_argument(
        "--decay-milestones",
        type=_parse_ints,
        default=d.decay_milestones,
        help="epochs at which multistep multiplies the lr by decay-rate, e.g. 150,180,210",
    )
    g.add_argument("--decay-rate", type=float, default=d.decay_rate, help="multistep/step decay factor")
    g.add_argument(
        "--model-ema",
        action="store_true",
        default=d.model_ema,
        help="keep an EMA of the student (evaluated each epoch and saved as the final student)",
    )
    g.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay, help="EMA decay")

    g = parser.add_argument_group("runtime, checkpoints and logging")
    g.add_argument(
        "--seed", type=int, default=d.seed, help="seed of everything (init, data order, augmentation)"
    )
    g.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=d.mixed_precision,
        help="mixed precision (default: what `accelerate launch` / `accelerate config` says)",
    )
    g.add_argument("--compile", action="store_true", default=d.compile, help="torch.compile the student")
    g.add_argument(
        "--compile-teacher",
        action="store_true",
        default=d.compile_teacher,
        help="torch.compile the frozen teacher (eager, with a warning, where it cannot compile)",
    )
    g.add_argument(
        "--compile-loss",
        action="store_true",
        default=d.compile_loss,
        help="torch.compile the distillation loss (create_loss(..., compile=True): one graph whatever the "
        "epoch; faster on CPU, docs/losses.md#speed)",
    )
    g.add_argument(
        "--channels-last",
        action="store_true",
        default=d.channels_last,
        help="channels-last memory format (student, teacher and batches)",
    )
    g.add_argument(
        "--output-dir", default=d.output_dir, help="run folder (checkpoints, student/, run_summary.json)"
    )
    g.add_argument(
        "--checkpoint-every",
        type=_optional_int,
        default=d.checkpoint_every,
        help="also checkpoint every N optimizer steps (a checkpoint is always written after each epoch)",
    )
    g.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (last K)"
    )
    g.add_argument(
        "--resume",
        default=d.resume,
        help="continue from a checkpoint folder, or 'latest' (the newest in OUTPUT_DIR/checkpoints)",
    )
    g.add_argument(
        "--max-train-steps", type=int, default=d.max_train_steps, help="stop after N optimizer steps"
    )
    g.add_argument(
        "--max-eval-steps", type=int, default=d.max_eval_steps, help="evaluate on N batches per rank only"
    )
    g.add_argument("--log-every", type=int, default=d.log_every, help="log losses, lr, img/s every N steps")
    g.add_argument(
        "--report-to",
        default=d.report_to,
        help="experiment trackers: tensorboard, wandb, all (logs in OUTPUT_DIR/logs)",
    )
    g.add_argument(
        "--teacher-check",
        choices=("auto", "error", "warn", "off"),
        default=d.teacher_check,
        help="a teacher at chance level on the eval split stops the run ('auto': error for pretrained or "
        "checkpointed teachers, warning for random ones)",
    )
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=d.progress,
        help="no progress bar (logs only)",
    )
    g.add_argument("--license", default=d.license, help="license recorded in the model card")

    g = parser.add_argument_group("publishing")
    g.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="after training, push the student (timm format + model card) to this Hub repo, e.g. "
        "your-name/resnet18-ats; the id and a token are checked before training starts",
    )
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    parser.set_defaults(_loss_defaults=dict(d.loss_kwargs), _embedded_defaults=dict(d.embedded_kwargs))
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from parsed ``add_train_args`` flags (extra recipe flags are ignored)."""
    values = vars(args)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in values.items() if k in names}
    kw["loss_kwargs"] = {**values.get("_loss_defaults", {}), **dict(values.get("loss_args", []))}
    kw["embedded_kwargs"] = {**values.get("_embedded_defaults", {}), **dict(values.get("embedded_args", []))}
    return TrainConfig(**kw)


# --------------------------------------------------------------------------------------------------
# Accelerator, data, models
# --------------------------------------------------------------------------------------------------


def build_accelerator(config: TrainConfig):
    """An ``Accelerator`` for ``config``; mixed precision and compile default to the launcher's."""
    from accelerate import Accelerator, DataLoaderConfiguration

    kwargs: dict[str, Any] = {}
    if config.report_to:
        kwargs["log_with"] = [s.strip() for s in config.report_to.split(",")]
        kwargs["project_dir"] = os.path.join(config.output_dir, "logs")
    if config.compile:
        kwargs["dynamo_backend"] = "inductor"
    return Accelerator(
        cpu=_cpu_processes(),
        mixed_precision=config.mixed_precision,
        # the loaders' order comes from timm_kd.data.SeededSampler; no sampler replacement needed
        # non_blocking: with pinned batches the host-to-device copy overlaps the previous step
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=False, non_blocking=_pin_memory(config, torch.cuda.is_available())
        ),
        **kwargs,
    )


def _pin_memory(config: TrainConfig, cuda: bool) -> bool:
    """``--pin-memory`` as given, else on when training on CUDA (page-locked memory helps only there)."""
    return bool(cuda) if config.pin_memory is None else bool(config.pin_memory)


def _loader_kwargs(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """timm-style loader settings: workers, pinned memory on CUDA, persistent workers, prefetching."""
    kw: dict[str, Any] = {
        "num_workers": config.num_workers,
        "pin_memory": _pin_memory(config, device.type == "cuda"),
        "persistent_workers": config.persistent_workers,
    }
    if config.prefetch_factor is not None:
        kw["prefetch_factor"] = config.prefetch_factor
    return kw


def _cpu_processes() -> bool:
    """Whether this is one of several launched processes on a machine without an accelerator.

    ``accelerate launch --multi_gpu --num_processes N`` on such a machine starts N processes, but
    Accelerate makes them a process group (gloo) only if told they run on CPU; otherwise each would
    silently train alone on the whole data set.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return False
    acc = getattr(torch, "accelerator", None)
    return not (acc is not None and acc.is_available())


@dataclass
class _Data:
    train: Any
    val: Any
    num_classes: int
    label_names: list[str] | None
    num_corrupt: int


def _load_data(config: TrainConfig, accelerator) -> _Data:
    """Load, check and (optionally) verify both splits; every failure raises before training."""
    from . import data as D

    common = dict(
        streaming=config.streaming,
        image_column=config.image_column,
        label_column=config.label_column,
        embedded_kwargs=dict(config.embedded_kwargs) or None,
    )
    with accelerator.main_process_first():  # download / cache once
        train = D.load_image_dataset(config.dataset, config.train_split, **common)
        val = D.load_image_dataset(config.dataset, config.val_split, **{**common, "streaming": False})
    num_classes = config.num_classes or D.get_num_classes(train) or D.get_num_classes(val)
    if num_classes is None:
        raise ValueError(
            f"cannot tell the number of classes of {config.dataset!r} (no ClassLabel feature, streaming): "
            f"pass --num-classes N."
        )
    D.check_labels(train, num_classes, name=f"{config.dataset}[{config.train_split}]")
    D.check_labels(val, num_classes, name=f"{config.dataset}[{config.val_split}]")
    verify = config.verify_images == "yes" or (
        config.verify_images == "auto"
        and not config.streaming
        and os.path.isdir(os.path.expanduser(config.dataset))
    )
    num_corrupt = 0
    if verify:
        with accelerator.main_process_first():
            if not config.streaming:
                train, bad = D.verify_images(
                    train, on_corrupt=config.on_corrupt, progress=accelerator.is_local_main_process
                )
                num_corrupt += len(bad)
            val, bad = D.verify_images(
                val, on_corrupt=config.on_corrupt, progress=accelerator.is_local_main_process
            )
            num_corrupt += len(bad)
    return _Data(train, val, int(num_classes), D.get_label_names(train), num_corrupt)


def _create_student(config: TrainConfig, num_classes: int) -> nn.Module:
    from .teacher import resolve_model

    return resolve_model(
        config.student,
        pretrained=config.pretrained_student,
        checkpoint=config.student_checkpoint,
        num_classes=num_classes,
        replace_head=True,
        role="student",
    )


# --------------------------------------------------------------------------------------------------
# Checkpoints: atomic, last K kept, resumable
# --------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir/checkpoints`` (``step_N`` with a state file), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``resume`` names (``"latest"``: the newest complete one, or None)."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume!r} is not a complete timm-kd checkpoint (no {STATE_FILE}). "
            f"Complete checkpoints of this run: {[str(p) for p in list_checkpoints(output_dir)] or 'none'}."
        )
    return path


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step_{global_step}``, atomically; keep the last ``keep``.

    Every rank writes its own part (the main process the weights, optimizer and scheduler; each
    rank its RNG state) into ``checkpoints/.tmp-step_N``; after a barrier the main process adds
    ``trainer_state.json`` and renames the folder; a second barrier makes the result visible to all
    ranks. A run killed while saving leaves only a ``.tmp-`` folder, which is never resumed from.
    All ranks must call this together (it holds barriers) and none of them waits on work only
    another rank could skip.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    name = f"step_{int(state['global_step']):08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """``accelerator.load_state(path)`` (weights via safetensors, the rest with ``weights_only``);
    returns the saved counters (``trainer_state.json``)."""
    path = Path(path)
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    accelerator.load_state(str(path))
    return state


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


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
    from tqdm.auto import tqdm

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


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _reseed(seed: int, rank: int, epoch: int, batch_idx: int) -> None:
    """Seed the global RNGs (Mixup/CutMix, drop-path, dropout) from ``(seed, rank, epoch, batch)``.

    Done before every batch, so the randomness of a batch does not depend on what ran before it
    in this process. ``accelerator.load_state`` also restores the RNG states of a checkpoint, but
    it skips them with only an info-level log line when it cannot read them; with this, a resumed
    run that skips the first batches of an epoch draws the same numbers either way.
    """
    s = int(np.random.SeedSequence([seed, rank, epoch, batch_idx]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _hardware(accelerator) -> str:
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n}x {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n}x {accelerator.device.type.upper()} process{'es' if n > 1 else ''}"


def _fmt(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "n/a"
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("top"))


def _metric_floats(m: dict[str, Any]) -> dict[str, float]:
    return {k: (float(v) if k.startswith("top") else int(v)) for k, v in m.items()}


def _fingerprint(config: TrainConfig, world: int) -> dict[str, Any]:
    """Settings that must not change across a resume for it to reproduce the uninterrupted run."""
    return {
        "student": config.student,
        "teacher": config.teacher,
        "method": config.method,
        "dataset": config.dataset,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "world_size": world,
        "epochs": config.epochs,
    }


@dataclass
class _Run:
    """The objects of one training run, handed from one step of ``fit`` to the next."""

    config: TrainConfig
    accelerator: Any
    student: nn.Module  # prepared (DDP / compiled as the launcher says)
    wrapper: Any  # DistillWrapper, or None for cross-entropy training
    optimizer: Any
    scheduler: Any
    model_ema: Any
    mixup_fn: Any
    train_loader: Any
    val_loader: Any
    metric: Any
    num_classes: int
    label_names: list[str] | None
    num_corrupt: int
    data_config: dict[str, Any]
    lr: float
    batches_per_epoch: int
    updates_per_epoch: int
    total_updates: int
    state: dict[str, Any]
    last_good: str | None = None
    bad_step: torch.Tensor | None = None  # first optimizer step with a non-finite loss, -1 if none
    warned_flip: bool = False

    @property
    def out_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def k_top(self) -> int:
        return min(5, self.num_classes)

    def log(self, msg: str) -> None:
        """A console line on the main process that does not break the progress bar."""
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(msg)


def _setup(config: TrainConfig, accelerator, student: nn.Module | None, teacher: nn.Module | None) -> _Run:
    """Data (checked), models, loaders, optimizer, scheduler, EMA, metric; resume if asked."""
    import timm  # noqa: F401 - registers the models
    from accelerate.utils import set_seed
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from . import data as D
    from .metrics import load_topk_metric
    from .teacher import model_num_classes

    set_seed(config.seed)
    data = _load_data(config, accelerator)
    num_classes = data.num_classes

    # models: the student is built here (same code with or without a teacher)
    if student is None:
        student = _create_student(config, num_classes)
    have = model_num_classes(student)
    if have is not None and have != num_classes:
        raise ValueError(
            f"the student predicts {have} classes but {config.dataset!r} has labels 0..{num_classes - 1}: "
            f"labels outside the model's classes. Build the student with num_classes={num_classes}, or "
            f"drop --num-classes."
        )
    ds_name = config.dataset
    data_config = D.resolve_model_data_config(student, dataset_name=ds_name, **_data_config_overrides(config))
    wrapper = cache = None
    if config.method != "ce" and config.teacher_cache:
        from .cache import CachedDistill, TeacherCache

        with accelerator.main_process_first():  # the parquet shards are converted to Arrow once
            cache = TeacherCache(config.teacher_cache)
        wrapper = CachedDistill(
            student, config.method, num_classes, cache=cache, tail=config.teacher_cache_tail,
            **_loss_kwargs(config),
        )
        wrapper.to(accelerator.device)  # the loss's own state, if any; there is no teacher
    elif config.method != "ce":
        from .wrapper import DistillWrapper

        with accelerator.main_process_first():  # teacher weights fetched once, then read from the cache
            wrapper = DistillWrapper(
                student,
                teacher if teacher is not None else config.teacher,
                loss=config.method,
                class_map=_read_class_map(config.class_map),
                teacher_pretrained=config.pretrained_teacher,
                teacher_checkpoint=config.teacher_checkpoint if teacher is None else None,
                data_config=data_config,
                teacher_channels_last=config.channels_last,
                compile_teacher=config.compile_teacher,
                verbose=accelerator.is_main_process,
                **_loss_kwargs(config),
            )
        wrapper.to(accelerator.device)  # the frozen teacher: moved, never prepared
    student.to(accelerator.device)
    if config.channels_last:
        student.to(memory_format=torch.channels_last)

    # transforms (timm) and loaders (order and augmentation a pure function of the seed)
    train_tf = D.create_timm_transform(
        data_config, is_training=True, dataset_name=ds_name, **_train_aug_kwargs(config)
    )
    eval_tf = D.create_timm_transform(data_config, is_training=False, dataset_name=ds_name)
    train_set = D.apply_transform(data.train, train_tf, seed=config.seed, on_corrupt=config.on_corrupt)
    if cache is not None:  # replay the cached views (refuses a cache built for other data/teacher/transform)
        cache.check(config, data.train, num_classes, train_tf)
        train_set = cache.dataset(data.train, train_tf, seed=config.seed)
    val_set = D.apply_transform(data.val, eval_tf, seed=config.seed, on_corrupt=config.on_corrupt)
    world = accelerator.num_processes
    if hasattr(train_set, "__len__") and len(train_set) < config.batch_size * world:
        raise ValueError(
            f"{config.dataset}[{config.train_split}] has {len(train_set)} images, fewer than one batch of "
            f"{config.batch_size} for each of the {world} processes. Lower --batch-size or use more data."
        )
    train_loader = D.create_loader(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        drop_last=True,
        **_loader_kwargs(config, accelerator.device),
        **({"collate_fn": cache.collate} if cache is not None else {}),
    )
    val_loader = D.create_loader(
        val_set,
        config.eval_batch_size or config.batch_size,
        shuffle=False,
        **_loader_kwargs(config, accelerator.device),
    )

    # optimizer (timm), EMA, then prepare the student, its optimizer and loaders only
    lr = _resolve_lr(config, world)
    optimizer = create_optimizer_v2(
        student, opt=config.opt, lr=lr, weight_decay=config.weight_decay, momentum=config.momentum
    )
    model_ema = ModelEmaV3(student, decay=config.model_ema_decay) if config.model_ema else None
    student, optimizer, train_loader, val_loader = accelerator.prepare(
        student, optimizer, train_loader, val_loader
    )
    if wrapper is not None:
        wrapper.student = student

    # the schedule counts optimizer updates (timm's step_update)
    if config.steps_per_epoch is not None:
        batches_per_epoch = config.steps_per_epoch * config.grad_accum_steps
    else:
        try:
            batches_per_epoch = len(train_loader)
        except TypeError:
            raise ValueError(
                f"{config.dataset!r} is streamed and its size is unknown: pass --steps-per-epoch N."
            ) from None
    updates_per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum_steps))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        decay_milestones=list(config.decay_milestones),
        decay_rate=config.decay_rate,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)
    if model_ema is not None:
        accelerator.register_for_checkpointing(model_ema)
    total_updates = config.epochs * updates_per_epoch
    if config.max_train_steps is not None:
        total_updates = min(total_updates, config.max_train_steps)
    mixup_fn = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.smoothing,
            num_classes=num_classes,
        )
    with accelerator.main_process_first():  # copies the metric module into the HF modules cache once
        metric = load_topk_metric()

    state: dict[str, Any] = {
        "epoch": 0,  # 0-based epoch in progress
        "step_in_epoch": 0,  # optimizer updates done in that epoch
        "global_step": 0,
        "history": [],
        "best_metrics": None,
        "best_epoch": None,
        "teacher_metrics": None,
        "num_skipped": 0,
        "epoch_partial": None,  # mid-epoch checkpoints: {"n": batches, "sums": loss-term sums}
        "fingerprint": _fingerprint(config, world),
    }
    run = _Run(
        config=config,
        accelerator=accelerator,
        student=student,
        wrapper=wrapper,
        optimizer=optimizer,
        scheduler=scheduler,
        model_ema=model_ema,
        mixup_fn=mixup_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        metric=metric,
        num_classes=num_classes,
        label_names=data.label_names,
        num_corrupt=data.num_corrupt,
        data_config=dict(data_config),
        lr=lr,
        batches_per_epoch=batches_per_epoch,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        state=state,
        bad_step=torch.full((), -1, dtype=torch.long, device=accelerator.device),
    )
    resume_dir = resolve_resume(config.resume, run.out_dir)
    if config.resume == "latest" and resume_dir is None:
        run.log(
            f"--resume latest: no checkpoint in {run.out_dir / CHECKPOINT_DIR} yet, starting from scratch"
        )
    if resume_dir is not None:
        saved = load_checkpoint(accelerator, resume_dir)
        if saved.get("fingerprint") != state["fingerprint"]:
            warnings.warn(
                f"resuming {resume_dir} with other settings: saved {saved.get('fingerprint')}, now "
                f"{state['fingerprint']}. The run continues but will not match an uninterrupted one."
            )
        state.update({k: v for k, v in saved.items() if k != "fingerprint"})
        run.last_good = str(resume_dir)
        run.log(f"resumed from {resume_dir} (epoch {state['epoch'] + 1}, step {state['global_step']})")
    return run


def _data_config_overrides(config: TrainConfig) -> dict[str, Any]:
    """The data-config flags that were given (``input_size``, ``crop_pct``, ...)."""
    return {
        k: v
        for k, v in dict(
            input_size=(3, config.input_size, config.input_size) if config.input_size else None,
            crop_pct=config.crop_pct,
            interpolation=config.interpolation,
            mean=config.mean,
            std=config.std,
        ).items()
        if v is not None
    }


def _train_aug_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The augmentation flags that were given, as ``timm.data.create_transform`` arguments."""
    return {
        k: v
        for k, v in dict(
            no_aug=config.no_aug or None,
            scale=config.scale,
            ratio=config.ratio,
            hflip=config.hflip,
            color_jitter=config.color_jitter,
            auto_augment=config.auto_augment,
            re_prob=config.reprob or None,
        ).items()
        if v is not None
    }


def _loss_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The loss's keyword arguments; per-step input checks off where the engine does them itself.

    The registered losses check label range and finiteness on every call, a device-to-host sync
    per step. The engine checks the labels once before training and the loss's finiteness at
    logging steps, so it turns those per-step checks off unless ``check_inputs`` is given.
    """
    import inspect

    from .losses import get_loss_entrypoint

    kwargs = dict(config.loss_kwargs)
    try:
        params = inspect.signature(get_loss_entrypoint(config.method)).parameters
    except (TypeError, ValueError):
        params = {}
    if "check_inputs" in params:
        kwargs.setdefault("check_inputs", False)
    if config.compile_loss:
        kwargs["compile"] = True  # create_loss's own switch (compile_loss), not a loss parameter
    return kwargs


def _read_class_map(class_map: Any) -> Any:
    """``--class-map FILE``: one teacher class index per line (or a JSON list), in student class order."""
    if class_map is None or not isinstance(class_map, (str, os.PathLike)):
        return class_map
    text = Path(class_map).read_text()
    try:
        return [int(x) for x in json.loads(text)]
    except json.JSONDecodeError:
        return [int(line.split()[0]) for line in text.splitlines() if line.strip()]


def _check_teacher(run: _Run, teacher_given: bool) -> None:
    """Evaluate the teacher once; a teacher at chance level is an error (or a warning)."""
    config, state = run.config, run.state
    if run.wrapper is None or state["teacher_metrics"] is not None or config.teacher_check == "off":
        return
    if config.teacher_cache:  # no teacher in memory: its top-1 on the views it cached, from the build
        m = run.wrapper.cache.manifest
        name, top1, n = m["teacher"], float(m["teacher_view_top1"]), int(m["num_rows"])
        tail = "dropped logits rebuilt flat"
        if m["top_k"] == m["num_classes"]:
            tail = "every logit stored"
        elif run.wrapper.tail_prior is not None:
            tail = "dropped logits rebuilt from the tail prior"
        run.log(
            f"teacher {name} from cache {run.wrapper.cache.root}: top-1 {top1:.2f}% on its {n} cached "
            f"training views (top-{m['top_k']} logits, {m['bytes_per_view']:.1f} bytes per view; {tail})"
        )
        where = f"on its own {n} cached training views"
        fix = "Rebuild the cache with a trained teacher (pretrained tag or --teacher-checkpoint)."
    else:
        res = evaluate_model(
            run.accelerator,
            run.wrapper.teacher_logits,
            run.val_loader,
            run.metric,
            max_steps=config.max_eval_steps,
            k=run.k_top,
            desc="teacher eval",
            progress=config.progress,
        )
        state["teacher_metrics"] = _metric_floats(res.metrics)
        name, top1, n = config.teacher, res.metrics["top1"], res.metrics["num_samples"]
        run.log(f"teacher {name}: {_fmt(res.metrics)} on {n} {config.val_split} images")
        where = f"on {config.dataset}[{config.val_split}] ({n} images)"
        fix = (
            "Check that the teacher predicts this dataset's classes (--class-map for another label set), "
            "that its weights loaded (pretrained tag or --teacher-checkpoint) and its input normalization."
        )
    if not teacher_is_at_chance(top1, run.num_classes, n):
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
    warnings.warn(msg)
    run.log("WARNING: " + msg)


def _check_finite(run: _Run, where: str) -> None:
    """Raise ``TrainingDivergedError`` if any rank saw a NaN/inf loss (one host sync, all ranks)."""
    big = 2**62
    flag = torch.where(run.bad_step < 0, torch.full_like(run.bad_step, big), run.bad_step).reshape(1)
    step = int(run.accelerator.gather(flag).min()) if run.accelerator.num_processes > 1 else int(flag)
    if step < big:
        good = run.last_good
        raise TrainingDivergedError(
            f"the loss became NaN/inf at optimizer step {step} (epoch {run.state['epoch'] + 1}; "
            f"found {where}). "
            f"Last good checkpoint: {good or 'none (none written yet)'}. Resume from it with "
            f"--resume {good or 'latest'} and a lower --lr, --clip-grad 1.0, or bf16 instead of fp16."
        )


#: warn (once per run) when an ATS-family target ranks a wrong class first, where the teacher's own
#: logits rank the label first (the loss's ``induced_flip``), on more than this fraction of the
#: samples: docs/capacity_study.md measured 11-34 % with the authors' tau 4 / 3 on
#: teachers whose logits are small for 100 classes, and ats then trailed kd by 3 points.
TARGET_FLIP_WARNING = 0.05


def _warn_target_flip(run: _Run, flip: float | None) -> None:
    if flip is None or run.warned_flip or flip <= TARGET_FLIP_WARNING:
        return
    run.warned_flip = True
    kw = run.config.loss_kwargs
    run.log(
        f"WARNING: the {run.config.method} target ranks a wrong class above the label on "
        f"{100 * flip:.1f} % of the training samples the teacher itself gets right "
        f"(tau_correct={kw.get('tau_correct', 'default')}, tau_wrong={kw.get('tau_wrong', 'default')}), "
        "so its KD term pulls against cross-entropy there. "
        "These temperatures are too far apart for this teacher's logit scale: pick them with "
        "timm_kd.diagnostics.suggest_ats_temperatures(teacher_logits, labels) on training-set logits, "
        "or raise tau_wrong towards tau_correct."
    )


def _train_epoch(run: _Run, bar) -> dict[str, float]:
    """Train until the end of the epoch (or ``max_train_steps``); return the epoch's mean loss terms.

    The hot loop keeps every statistic on the device; values reach the host only every
    ``log_every`` steps (and for checkpoints).
    """
    from timm.data.mixup import one_hot
    from timm.utils import dispatch_clip_grad

    from .losses import cross_entropy

    config, acc, state = run.config, run.accelerator, run.state
    student, accum, world = run.student, config.grad_accum_steps, acc.num_processes
    epoch = state["epoch"]
    student.train()
    run.train_loader.set_epoch(epoch)
    skip = state["step_in_epoch"] * accum
    batches = iter(acc.skip_first_batches(run.train_loader, skip) if skip else run.train_loader)
    batch_idx = skip - 1
    sums: dict[str, torch.Tensor] = {}  # since the last log
    ep_sums: dict[str, Any] = {}  # since the start of the epoch (this process' part of it)
    ep_n = 0
    if skip and state.get("epoch_partial"):  # resumed mid-epoch: the epoch's sums so far (rank mean)
        ep_sums, ep_n = dict(state["epoch_partial"]["sums"]), state["epoch_partial"]["n"]
    n_sum = img_log = 0
    t_log = time.time()
    while state["step_in_epoch"] < run.updates_per_epoch and state["global_step"] < run.total_updates:
        # one optimizer update = `accum` batches (fewer for the last update of an epoch)
        n_group = min(accum, run.batches_per_epoch - state["step_in_epoch"] * accum)
        done = 0
        for micro in range(n_group):
            batch_idx += 1
            _reseed(config.seed, acc.process_index, epoch, batch_idx)
            batch = next(batches, None)
            if batch is None:
                break
            images, target = batch["pixel_values"], batch["label"]
            state["num_skipped"] += int(batch.get("num_skipped", 0))
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if run.mixup_fn is not None:
                images, target = run.mixup_fn(images, target)
            elif config.smoothing > 0:
                off = config.smoothing / run.num_classes
                target = one_hot(
                    target, run.num_classes, on_value=1.0 - config.smoothing + off, off_value=off
                )
            epoch_f = epoch + 1 + state["step_in_epoch"] / run.updates_per_epoch  # 1-based, fractional
            sync = micro == n_group - 1
            with contextlib.nullcontext() if sync else acc.no_sync(student):
                try:
                    with acc.autocast():
                        if run.wrapper is not None:
                            # cached teacher logits ride in the batch (none for online distillation)
                            cached = {k: batch[k] for k in _CACHE_KEYS if k in batch}
                            out = run.wrapper(images, target, epoch=epoch_f, **cached)
                        else:
                            logits = student(images)
                            ce = cross_entropy(logits.float(), target)
                            out = {"loss": ce, "ce": ce.detach(), "output": logits}
                except FloatingPointError as e:  # the loss's own finiteness check (NaN/inf logits)
                    good = run.last_good
                    # an earlier NaN loss seen here; no collective, this may be the only rank raising
                    earlier = int(run.bad_step)
                    step = earlier if earlier >= 0 else state["global_step"] + 1
                    raise TrainingDivergedError(
                        f"the loss became NaN/inf at optimizer step {step} (epoch {epoch + 1}): "
                        f"{e} Last good checkpoint: {good or 'none (none written yet)'}; resume with "
                        f"--resume {good or 'latest'} and a lower --lr or --clip-grad 1.0."
                    ) from e
                acc.backward(out["loss"] / n_group)
            first_bad = torch.full_like(run.bad_step, state["global_step"] + 1)
            bad = ~torch.isfinite(out["loss"].detach())
            run.bad_step = torch.where(bad & (run.bad_step < 0), first_bad, run.bad_step)
            terms = {
                k: v.detach().float()
                for k, v in out.items()
                if k not in ("output", "teacher_output") and torch.is_tensor(v) and v.dim() == 0
            }
            if "teacher_output" in out:
                same = out["output"].argmax(-1) == out["teacher_output"].argmax(-1)
                terms["agreement"] = same.float().mean() * 100
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v
                ep_sums[k] = ep_sums.get(k, 0) + v
            n_sum += 1
            ep_n += 1
            img_log += images.shape[0] * world
            done += 1
        if done == 0:
            break  # a streamed loader ran out early
        if config.clip_grad is not None:
            if config.clip_mode == "norm":
                acc.clip_grad_norm_(student.parameters(), config.clip_grad)
            else:
                acc.unscale_gradients()
                dispatch_clip_grad(list(student.parameters()), config.clip_grad, mode=config.clip_mode)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        gs = state["global_step"]
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=gs)
        if run.model_ema is not None:
            run.model_ema.update(acc.unwrap_model(student), step=gs)
        bar.update(1)

        if gs % config.log_every == 0 or gs == run.total_updates:
            _check_finite(run, "at a logging step")
            logs = {f"train/{k}": v / max(n_sum, 1) for k, v in _rank_mean(acc, sums).items()}
            logs["train/lr"] = run.optimizer.param_groups[0]["lr"]
            logs["train/img_per_s"] = img_log / max(time.time() - t_log, 1e-9)
            shown = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in logs.items()}
            bar.set_postfix(shown, refresh=False)
            run.log(
                f"step {gs}/{run.total_updates} epoch {epoch + 1}: "
                + " ".join(f"{k} {v}" for k, v in shown.items())
            )
            if config.report_to:
                acc.log(logs, step=gs)
            _warn_target_flip(run, logs.get("train/induced_flip"))
            sums, n_sum, img_log, t_log = {}, 0, 0, time.time()
        mid_epoch = state["step_in_epoch"] < run.updates_per_epoch
        if (
            config.checkpoint_every
            and gs % config.checkpoint_every == 0
            and mid_epoch
            and gs < run.total_updates
        ):
            _check_finite(run, "before writing a checkpoint")
            state["epoch_partial"] = {"n": ep_n, "sums": _rank_mean(acc, ep_sums)}
            run.last_good = str(
                save_checkpoint(acc, run.out_dir, _state_json(state), config.keep_checkpoints)
            )
    _check_finite(run, "at the end of the epoch")
    state["epoch_partial"] = None
    return {k: v / max(ep_n, 1) for k, v in _rank_mean(acc, ep_sums).items()}


def _rank_mean(acc, values: dict[str, Any]) -> dict[str, float]:
    """The mean over processes of each value (a collective: every rank calls it at the same point)."""
    keys = list(values)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=acc.device) for k in keys])
    return dict(zip(keys, acc.reduce(stacked, reduction="mean").tolist()))


def _evaluate_epoch(run: _Run, train_means: dict[str, float]) -> EvalResult:
    """Evaluate the student (its EMA with ``model_ema``), record the epoch, log it."""
    config, state, acc = run.config, run.state, run.accelerator
    epoch = state["epoch"]
    model = run.model_ema.module if run.model_ema is not None else run.student
    model.eval()
    res = evaluate_model(
        acc,
        model,
        run.val_loader,
        run.metric,
        max_steps=config.max_eval_steps,
        k=run.k_top,
        desc=f"eval epoch {epoch + 1}",
        progress=config.progress,
    )
    m = _metric_floats(res.metrics)
    state["history"].append(
        {"epoch": epoch + 1, "global_step": state["global_step"], **m, "train": train_means}
    )
    if state["best_metrics"] is None or m["top1"] > state["best_metrics"]["top1"]:
        state["best_metrics"], state["best_epoch"] = m, epoch + 1
    terms = " ".join(f"{k} {v:.4g}" for k, v in train_means.items())
    run.log(
        f"epoch {epoch + 1}/{config.epochs} (step {state['global_step']}): train {terms} | val {_fmt(m)} | "
        f"best top1 {state['best_metrics']['top1']:.2f} (epoch {state['best_epoch']})"
    )
    if config.report_to:
        logs = {f"val/{k}": v for k, v in m.items() if k.startswith("top")}
        acc.log({**logs, "epoch": epoch + 1}, step=state["global_step"])
    return res


def _state_json(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(state, default=_json_default))


def fit(
    config: TrainConfig | argparse.Namespace,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    accelerator=None,
    card_meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train one student: distill it from a teacher, or with ``method="ce"`` train it alone.

    See the module docstring for what happens, in order.

    Args:
        config: a ``TrainConfig`` (or the ``argparse`` namespace of ``add_train_args``).
        student: an already built student (else ``config.student`` is created with timm).
        teacher: an already built teacher module (else built from ``config.teacher``).
        accelerator: an ``Accelerator`` (else ``build_accelerator(config)``).
        card_meta: extra run metadata for the model card (``timm_kd.hub.META_KEYS``), e.g.
            ``{"student_alone_metrics": {...}}``.

    Raises (all before training where the cause is known up front):
        ValueError / FileNotFoundError: bad configuration or data.
        BrokenTeacherError: the teacher is at chance level on the eval split.
        TrainingDivergedError: the loss became NaN/inf; names the step and the last good checkpoint.
    """
    from tqdm.auto import tqdm

    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    t_start = time.time()
    if config.method == "ce" and config.teacher is not None:
        config = dataclasses.replace(config, teacher=None)  # trained alone: the teacher is not used
    check_config(config)
    accelerator = accelerator or build_accelerator(config)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    run = _setup(config, accelerator, student, teacher)
    if config.report_to:
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()
        }
        accelerator.init_trackers(run.out_dir.name or "timm_kd", config=flat)
    _check_teacher(run, teacher_given=teacher is not None)

    state = run.state
    n_params = sum(p.numel() for p in accelerator.unwrap_model(run.student).parameters()) / 1e6
    how = (
        f"with {config.method}{' (compiled)' if config.compile_loss else ''} from {config.teacher}"
        if run.wrapper is not None
        else "alone (cross-entropy)"
    )
    run.log(
        f"training {config.student} ({n_params:.2f}M params) {how}: {accelerator.num_processes} "
        f"process(es) x batch {config.batch_size} x accumulation {config.grad_accum_steps}, "
        f"{run.updates_per_epoch} steps/epoch, {run.total_updates} steps, lr {run.lr:.4g}"
    )
    bar = tqdm(
        total=run.total_updates,
        initial=state["global_step"],
        desc="train",
        disable=not (config.progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    last_eval = None
    while state["epoch"] < config.epochs and state["global_step"] < run.total_updates:
        train_means = _train_epoch(run, bar)
        finished = state["step_in_epoch"] >= run.updates_per_epoch
        if finished or state["global_step"] >= run.total_updates:
            last_eval = _evaluate_epoch(run, train_means)
        if finished:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            run.last_good = str(
                save_checkpoint(accelerator, run.out_dir, _state_json(state), config.keep_checkpoints)
            )
    bar.close()
    return _finish(run, last_eval, t_start, card_meta or {})


def _finish(run: _Run, last_eval: EvalResult | None, t_start: float, card_meta: dict[str, Any]) -> FitResult:
    """Save the student (timm format), the gathered predictions and ``run_summary.json``."""
    from .hub import save_pretrained

    config, state, acc = run.config, run.state, run.accelerator
    final = acc.unwrap_model(run.model_ema.module if run.model_ema is not None else run.student)
    final = getattr(final, "_orig_mod", final)  # torch.compile's wrapper
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
    metrics = _metric_floats(last_eval.metrics)
    distill = run.wrapper is not None
    meta = {
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
        "teacher_metrics": state["teacher_metrics"],
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
        from safetensors.torch import save_file

        save_file(
            {"topk": last_eval.topk.contiguous(), "labels": last_eval.labels.contiguous()},
            str(out / PREDICTIONS_FILE),
        )
        _write_json_atomic(out / SUMMARY_FILE, summary)
    acc.wait_for_everyone()
    run.log(
        f"done in {summary['run']['wall_time_s']:.0f}s, {state['global_step']} steps: "
        f"last epoch {_fmt(metrics)} | best epoch {state['best_epoch']}: {_fmt(state['best_metrics'])}"
        + (f" | teacher {_fmt(state['teacher_metrics'])}" if state["teacher_metrics"] else "")
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
    from .hub import push_to_hub

    meta = {k: v for k, v in result.card_meta.items() if v is not None}
    return push_to_hub(result.output_dir / STUDENT_DIR, repo_id, private=private, token=token, **meta)
