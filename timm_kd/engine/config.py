"""The configuration of one training run: ``TrainConfig``, every option declared once.

Each ``TrainConfig`` field carries, as dataclass field metadata, what the command line shows of it:
its help group, help text, flag (default ``--field-name``), choices, and how a flag's text becomes
the value (``parse``). ``timm_kd.engine.args`` generates the argparse parser from this metadata and
``engine.checks.check_config`` reads the choices from it, so a new option is one field here.
This module imports no torch or timm, so the parser (and ``--help``) is built without them.

Metadata keys (all optional except ``group`` and ``help``):

- ``flag``: the option string when it is not ``--field-name`` (``--aa``, ``--no-progress``);
  a boolean field whose flag starts with ``--no-`` and whose default is True is switched off by it.
- ``choices``: the allowed values (``None`` is allowed too when the field's default is ``None``).
- ``parse``: a function from the flag's text to the value (tuples, ``KEY=VALUE`` pairs).
- ``action``: ``"optional"`` for a ``--x/--no-x`` pair (``argparse.BooleanOptionalAction``).
- ``metavar``: the placeholder in ``--help``.
- ``dest``: a repeatable ``KEY=VALUE`` flag's own name (``loss_args`` for ``loss_kwargs``).

A ``{default}`` in a help text is replaced by the default in effect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the options and the parser built from them do not import torch
    import torch
    import torch.nn as nn

CHECKPOINT_DIR = "checkpoints"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class BrokenTeacherError(RuntimeError):
    """The teacher's accuracy on the validation split is at chance level."""


# --------------------------------------------------------------------------------------------------
# How a flag's text becomes a value
# --------------------------------------------------------------------------------------------------


def _parse_pair(text: str) -> tuple[float, float]:
    a, b = (float(x) for x in text.split(","))
    return (a, b)


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _parse_kv(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it parses (numbers, lists, true), else kept as text."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "") else int(text)


def _options(group: str):
    """The field maker of one help group: ``make(default, help, **metadata)``; a list or dict
    default becomes a ``default_factory``."""

    def make(default: Any, help: str, **meta: Any) -> Any:
        meta = {"group": group, "help": help, **meta}
        if isinstance(default, (dict, list)):
            return field(default_factory=lambda: type(default)(default), metadata=meta)
        return field(default=default, metadata=meta)

    return make


_models = _options("models")
_method = _options("distillation method")
_data = _options("data")
_aug = _options("transforms and augmentation (timm)")
_optim = _options("optimization (timm factories)")
_runtime = _options("runtime, checkpoints and logging")


# --------------------------------------------------------------------------------------------------
# The options
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything one training run needs, each field with its flag (``--weight-decay`` ->
    ``weight_decay``), help text and choices as field metadata; ``add_train_args`` builds the
    command line from it and ``engine.checks.check_config`` validates it."""

    # fmt: off
    student: str = _models("resnet18", "timm model name of the student (or hf-hub:/local-dir:)")
    teacher: str | None = _models(
        "resnet50.tv_in1k",
        "teacher: a timm name with pretrained tag (e.g. resnet50.tv_in1k), hf-hub:org/name or "
        "local-dir:PATH; ignored with --method ce")
    pretrained_teacher: bool = _models(
        True, "build the teacher with random weights (smoke tests only; the teacher check then only warns)",
        flag="--no-pretrained-teacher")
    teacher_checkpoint: str | None = _models(
        None, "teacher weights file (.safetensors); a timm config.json beside it gives its input size and "
        "normalization")
    teacher_input_size: int | None = _models(
        None, "image side the teacher was trained on (default: its weights' config where known: a "
        "pretrained tag, hf-hub:, local-dir:, a config.json beside --teacher-checkpoint; else the "
        "batch's size: no resize)")
    teacher_mean: tuple[float, ...] | None = _models(
        None, "normalization mean the teacher was trained with (default: its weights' config where "
        "known, else the student's: no re-normalization)", parse=_parse_floats)
    teacher_std: tuple[float, ...] | None = _models(
        None, "normalization std the teacher was trained with (default as --teacher-mean)",
        parse=_parse_floats)
    teacher_interpolation: str | None = _models(
        None, "how batches are resized for the teacher when its size differs (default: its weights' "
        "config, else bicubic)", choices=("bicubic", "bilinear", "nearest"))
    teacher_cache: str | None = _models(
        None,
        "distill from the stored top-k logits of a `timm-kd cache-teacher` folder instead of running "
        "the teacher (no teacher in memory; see docs/cache.md)", metavar="DIR")
    teacher_cache_tail: str = _models(
        "prior",
        "how the logits the cache dropped are rebuilt: shaped by the cache's tail prior (the teacher's "
        "mean log-probabilities per top-1 class; default) or one flat value (an ablation)",
        choices=("prior", "flat"))
    pretrained_student: bool = _models(False, "start the student from timm's pretrained weights")
    student_checkpoint: str | None = _models(None, "student weights (.safetensors)")
    num_classes: int | None = _models(None, "student classes (default: the dataset's number of classes)")
    class_map: str | None = _models(
        None,
        "for a teacher trained on other classes: a text file whose line i holds the teacher's class index "
        "for dataset class i (anything after the index, e.g. a class name, is ignored), or a JSON list "
        "[t0, t1, ...]; the teacher's logits are taken in that order")

    method: str = _method(
        "ats",
        "loss name from timm_kd.list_losses() (kd, ats, isats, dtkd, dkd, dist, lskd), or 'ce' to train "
        "the student alone with cross-entropy")
    loss_kwargs: dict[str, Any] = _method(
        {}, "loss hyper-parameter, repeatable (e.g. --loss-arg tau_wrong=2); defaults: {default}",
        flag="--loss-arg", dest="loss_args", parse=_parse_kv, metavar="KEY=VALUE")

    dataset: str = _data(
        "imagenet-1k",
        "'embedded' (built-in digits task, no download), a local image folder or saved dataset, "
        "or a Hugging Face Hub dataset id (imagenet-1k, uoft-cs/cifar100)")
    train_split: str = _data("train", "training split name")
    val_split: str = _data("validation", "evaluation split name")
    val_fraction: float = _data(
        0.0,
        "hold out this fraction of each class of the training split as the evaluation split, drawn "
        "with --seed (for data without one, e.g. a flat class folder; --val-split is then unused)")
    streaming: bool = _data(
        False,
        "stream the dataset instead of downloading it (needs --steps-per-epoch if the size is unknown)")
    image_column: str | None = _data(None, "image column (default: detected)")
    label_column: str | None = _data(None, "label column (default: detected)")
    verify_images: str = _data(
        "auto", "decode every image before training to find corrupt files, once per version of the data "
        "(a record in the datasets cache skips it at the next start; 'auto': local data only)",
        choices=("auto", "yes", "no"))
    on_corrupt: str = _data(
        "error", "a corrupt image stops the run before training ('error') or is skipped and counted ('skip')",
        choices=("error", "skip"))
    num_workers: int = _data(4, "data loader worker processes per rank (training; evaluation too unless "
                               "--eval-workers)")
    eval_workers: int | None = _data(
        None, "data loader worker processes per rank for evaluation (default: --num-workers)")
    pin_memory: bool | None = _data(
        None, "page-locked batches, copied to the GPU asynchronously (default: on with CUDA)",
        action="optional")
    persistent_workers: bool = _data(
        True, "keep the loader workers alive between epochs (with --num-workers > 0)", action="optional")
    prefetch_factor: int | None = _data(
        None, "batches each worker loads ahead (default: torch's 2; with --num-workers > 0)")
    steps_per_epoch: int | None = _data(
        None, "batches per epoch and rank for streamed datasets of unknown size")
    embedded_kwargs: dict[str, Any] = _data(
        {},
        "argument of timm_kd.data.make_embedded_dataset for --dataset embedded, repeatable "
        "(e.g. num_train=2000); defaults: {default}",
        flag="--embedded-arg", dest="embedded_args", parse=_parse_kv, metavar="KEY=VALUE")

    # None: timm's default for the student
    input_size: int | None = _aug(None, "image side (default: the student's)")
    crop_pct: float | None = _aug(None, "eval center-crop fraction")
    interpolation: str | None = _aug(None, "resize interpolation (bilinear, bicubic)")
    mean: tuple[float, ...] | None = _aug(None, "normalization mean, e.g. 0.5,0.5,0.5", parse=_parse_floats)
    std: tuple[float, ...] | None = _aug(None, "normalization std", parse=_parse_floats)
    no_aug: bool = _aug(False, "no random augmentation when training")
    scale: tuple[float, float] | None = _aug(
        None, "random-resized-crop area range, e.g. 0.08,1", parse=_parse_pair)
    ratio: tuple[float, float] | None = _aug(None, "random-resized-crop aspect range", parse=_parse_pair)
    hflip: float | None = _aug(None, "horizontal flip probability (timm: 0.5)")
    color_jitter: float | None = _aug(None, "color jitter strength")
    auto_augment: str | None = _aug(None, "AutoAugment policy, e.g. rand-m9-mstd0.5", flag="--aa")
    reprob: float = _aug(0.0, "random erasing probability")
    mixup: float = _aug(0.0, "mixup alpha (0: off)")
    cutmix: float = _aug(0.0, "cutmix alpha (0: off)")
    mixup_prob: float = _aug(1.0, "probability of mixup/cutmix per batch")
    mixup_switch_prob: float = _aug(0.5, "cutmix instead of mixup")
    smoothing: float = _aug(0.0, "label smoothing (soft targets)")

    epochs: int = _optim(100, "training epochs")
    batch_size: int = _optim(128, "batch size per process (GPU)")
    eval_batch_size: int | None = _optim(None, "eval batch size per process")
    grad_accum_steps: int = _optim(1, "batches per optimizer step")
    opt: str = _optim("sgd", "timm optimizer name (sgd, adamw, lamb, ...)")
    lr: float | None = _optim(None, "learning rate (default: lr-base * global batch / lr-base-size)")
    lr_base: float = _optim(0.1, "learning rate for a global batch of lr-base-size")
    lr_base_size: int = _optim(256, "batch size lr-base refers to")
    momentum: float = _optim(0.9, "SGD momentum")
    weight_decay: float = _optim(1e-4, "weight decay")
    clip_grad: float | None = _optim(None, "gradient clipping threshold (off)")
    clip_mode: str = _optim("norm", "clipping mode", choices=("norm", "value", "agc"))
    sched: str = _optim("cosine", "timm scheduler (cosine, step, multistep, constant, ...)")
    warmup_epochs: float = _optim(0.0, "linear warm-up epochs")
    warmup_lr: float = _optim(1e-5, "learning rate at the start of warm-up")
    min_lr: float = _optim(0.0, "lower bound of the cosine schedule")
    decay_milestones: tuple[int, ...] = _optim(
        (30, 60, 90), "epochs at which multistep multiplies the lr by decay-rate, e.g. 150,180,210",
        parse=_parse_ints)
    decay_rate: float = _optim(0.1, "multistep/step decay factor")
    model_ema: bool = _optim(
        False, "keep an EMA of the student (evaluated each epoch and saved as the final student)")
    model_ema_decay: float = _optim(0.9998, "EMA decay")

    seed: int = _runtime(42, "seed of everything (init, data order, augmentation)")
    mixed_precision: str | None = _runtime(
        None, "mixed precision (default: what `accelerate launch` / `accelerate config` says)",
        choices=("no", "fp16", "bf16"))
    compile: bool = _runtime(False, "torch.compile the student")
    compile_teacher: bool = _runtime(
        False, "torch.compile the frozen teacher (eager, with a warning, where it cannot compile)")
    compile_loss: bool = _runtime(
        False, "torch.compile the distillation loss (create_loss(..., compile=True): one graph whatever "
        "the epoch)")
    channels_last: bool = _runtime(False, "channels-last memory format (student, teacher and batches)")
    sync_bn: bool = _runtime(
        False, "BatchNorm statistics over the global batch of all processes (SyncBatchNorm, as timm's "
        "train.py); without it each process normalizes its own batch. No effect with one process")
    output_dir: str = _runtime("runs/train", "run folder (checkpoints, student/, run_summary.json)")
    checkpoint_every: int | None = _runtime(
        None, "also checkpoint every N optimizer steps (a checkpoint is always written after each epoch)",
        parse=_optional_int)
    keep_checkpoints: int = _runtime(3, "checkpoints kept (last K)")
    resume: str | None = _runtime(
        None, "continue from a checkpoint folder, or 'latest' (the newest in OUTPUT_DIR/checkpoints)")
    max_train_steps: int | None = _runtime(None, "stop after N optimizer steps")
    max_eval_steps: int | None = _runtime(None, "evaluate on N batches per rank only")
    log_every: int = _runtime(50, "log losses, lr, img/s every N steps")
    report_to: str | None = _runtime(
        None, "experiment trackers: tensorboard, wandb, all (logs in OUTPUT_DIR/logs)")
    teacher_check: str = _runtime(
        "auto",
        "a teacher at chance level on the eval split stops the run ('auto': error for pretrained or "
        "checkpointed teachers, warning for random ones)",
        choices=("auto", "error", "warn", "off"))
    progress: bool = _runtime(True, "no progress bar (logs only)", flag="--no-progress")
    license: str | None = _runtime(None, "license recorded in the model card")
    # fmt: on

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
    per_sample: dict[str, torch.Tensor] | None = None  # {name: [N]} (evaluate_model(per_sample=...))


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


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def option_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a ``TrainConfig`` field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")
