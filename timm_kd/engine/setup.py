"""Everything a run needs before its first step: accelerator, data, models, the wrapper, loaders,
optimizer, scheduler, EMA, metric, and the state of a resumed run.

``setup_run`` does it in named steps (``_load_data``, ``_build_models``, ``_build_loaders``,
``_build_schedule``, ``_resume``) and returns a ``Run``, which the loop reads. Only the student,
its optimizer and the loaders go through ``accelerator.prepare``; the teacher (a live
``timm_kd.teacher.Teacher`` or a cache's ``CachedTeacher``, inside the one ``DistillWrapper``) is
moved with ``.to(device)`` and never wrapped in DDP.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm  # noqa: F401 - registers the models
import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from .. import data as D
from ..cache import CachedTeacher, TeacherCache
from ..losses import get_loss_entrypoint
from ..metrics import load_topk_metric
from ..models import model_num_classes, read_class_map, resolve_model
from ..wrapper import DistillWrapper
from .checkpoint import load_checkpoint, resolve_resume
from .config import CHECKPOINT_DIR, TrainConfig

__all__ = ["build_accelerator", "setup_run", "Run"]


def build_accelerator(config: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``config``; mixed precision and compile default to the launcher's."""
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


def _resolve_lr(config: TrainConfig, world_size: int) -> float:
    """``--lr``, or timm's linear scaling rule ``lr_base * global_batch / lr_base_size``."""
    if config.lr is not None:
        return float(config.lr)
    global_batch = config.batch_size * world_size * config.grad_accum_steps
    return config.lr_base * global_batch / config.lr_base_size


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


@dataclass
class _Data:
    train: Any
    val: Any
    num_classes: int
    label_names: list[str] | None
    num_corrupt: int


def _load_data(config: TrainConfig, accelerator) -> _Data:
    """Load, check and (optionally) verify both splits; every failure raises before training."""
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
    return resolve_model(
        config.student,
        pretrained=config.pretrained_student,
        checkpoint=config.student_checkpoint,
        num_classes=num_classes,
        replace_head=True,
        role="student",
    )


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


def _build_wrapper(
    config: TrainConfig, accelerator, student: nn.Module, teacher: nn.Module | None, data_config: dict
) -> DistillWrapper:
    """The one ``DistillWrapper``: its teacher is a cache's ``CachedTeacher`` (``--teacher-cache``)
    or a live network (given, or built from ``config.teacher``)."""
    if config.teacher_cache:
        with accelerator.main_process_first():  # the parquet shards are converted to Arrow once
            cached = CachedTeacher(TeacherCache(config.teacher_cache), tail=config.teacher_cache_tail)
        return DistillWrapper(student, cached, loss=config.method, **_loss_kwargs(config))
    with accelerator.main_process_first():  # teacher weights fetched once, then read from the cache
        return DistillWrapper(
            student,
            teacher if teacher is not None else config.teacher,
            loss=config.method,
            class_map=read_class_map(config.class_map),
            teacher_pretrained=config.pretrained_teacher,
            teacher_checkpoint=config.teacher_checkpoint if teacher is None else None,
            data_config=data_config,
            teacher_channels_last=config.channels_last,
            compile_teacher=config.compile_teacher,
            verbose=accelerator.is_main_process,
            **_loss_kwargs(config),
        )


def _build_models(
    config: TrainConfig, accelerator, num_classes: int, student: nn.Module | None, teacher: nn.Module | None
) -> tuple[nn.Module, DistillWrapper | None, dict[str, Any]]:
    """The student (built here unless given), the wrapper (None for ``method="ce"``) and the data
    config the student's transforms follow."""
    if student is None:
        student = _create_student(config, num_classes)
    have = model_num_classes(student)
    if have is not None and have != num_classes:
        raise ValueError(
            f"the student predicts {have} classes but {config.dataset!r} has labels 0..{num_classes - 1}: "
            f"labels outside the model's classes. Build the student with num_classes={num_classes}, or "
            f"drop --num-classes."
        )
    data_config = D.resolve_model_data_config(
        student, dataset_name=config.dataset, **_data_config_overrides(config)
    )
    wrapper = None
    if config.method != "ce":
        wrapper = _build_wrapper(config, accelerator, student, teacher, data_config)
        wrapper.to(accelerator.device)  # the frozen teacher (or the cache's prior): moved, never prepared
    student.to(accelerator.device)
    if config.channels_last:
        student.to(memory_format=torch.channels_last)
    return student, wrapper, data_config


def _build_loaders(
    config: TrainConfig, accelerator, data: _Data, data_config: dict, wrapper: DistillWrapper | None
) -> tuple[Any, Any]:
    """Transforms (timm) and loaders; sample order and augmentation are pure functions of the seed.
    A cached teacher's training set replays the cached views (and refuses a cache built for other
    data, teacher or transform)."""
    ds_name = config.dataset
    train_tf = D.create_timm_transform(
        data_config, is_training=True, dataset_name=ds_name, **_train_aug_kwargs(config)
    )
    eval_tf = D.create_timm_transform(data_config, is_training=False, dataset_name=ds_name)
    cache = (
        wrapper.teacher.cache if wrapper is not None and isinstance(wrapper.teacher, CachedTeacher) else None
    )
    if cache is not None:
        cache.check(config, data.train, data.num_classes, train_tf)
        train_set = cache.dataset(data.train, train_tf, seed=config.seed)
    else:
        train_set = D.apply_transform(data.train, train_tf, seed=config.seed, on_corrupt=config.on_corrupt)
    val_set = D.apply_transform(data.val, eval_tf, seed=config.seed, on_corrupt=config.on_corrupt)
    world = accelerator.num_processes
    if hasattr(train_set, "__len__") and len(train_set) < config.batch_size * world:
        raise ValueError(
            f"{config.dataset}[{config.train_split}] has {len(train_set)} images, fewer than one batch of "
            f"{config.batch_size} for each of the {world} processes. Lower --batch-size or use more data."
        )
    loader_kw = _loader_kwargs(config, accelerator.device)
    train_loader = D.create_loader(
        train_set,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        drop_last=True,
        **loader_kw,
        **({"collate_fn": cache.collate} if cache is not None else {}),
    )
    val_loader = D.create_loader(
        val_set, config.eval_batch_size or config.batch_size, shuffle=False, **loader_kw
    )
    return train_loader, val_loader


def _build_schedule(config: TrainConfig, accelerator, optimizer, train_loader) -> tuple[Any, int, int, int]:
    """timm's scheduler, counting optimizer updates (``step_update``); returns it with the batches
    and updates per epoch and the run's total updates."""
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
    total_updates = config.epochs * updates_per_epoch
    if config.max_train_steps is not None:
        total_updates = min(total_updates, config.max_train_steps)
    return scheduler, batches_per_epoch, updates_per_epoch, total_updates


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


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


def _new_state(config: TrainConfig, world: int) -> dict[str, Any]:
    """The loop's counters and history (what ``trainer_state.json`` holds)."""
    return {
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


@dataclass
class Run:
    """The objects of one training run, handed from one step of ``fit`` to the next."""

    config: TrainConfig
    accelerator: Any
    student: nn.Module  # prepared (DDP / compiled as the launcher says)
    wrapper: DistillWrapper | None  # None for cross-entropy training
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
            tqdm.write(msg)


def _resume(run: Run) -> None:
    """Load the checkpoint ``--resume`` names into the prepared objects and the run's state."""
    config, state = run.config, run.state
    resume_dir = resolve_resume(config.resume, run.out_dir)
    if config.resume == "latest" and resume_dir is None:
        run.log(
            f"--resume latest: no checkpoint in {run.out_dir / CHECKPOINT_DIR} yet, starting from scratch"
        )
    if resume_dir is None:
        return
    saved = load_checkpoint(run.accelerator, resume_dir)
    if saved.get("fingerprint") != state["fingerprint"]:
        warnings.warn(
            f"resuming {resume_dir} with other settings: saved {saved.get('fingerprint')}, now "
            f"{state['fingerprint']}. The run continues but will not match an uninterrupted one."
        )
    state.update({k: v for k, v in saved.items() if k != "fingerprint"})
    run.last_good = str(resume_dir)
    run.log(f"resumed from {resume_dir} (epoch {state['epoch'] + 1}, step {state['global_step']})")


def setup_run(config: TrainConfig, accelerator, student: nn.Module | None, teacher: nn.Module | None) -> Run:
    """Data (checked), models, loaders, optimizer, scheduler, EMA, metric; resume if asked."""
    set_seed(config.seed)
    data = _load_data(config, accelerator)
    student, wrapper, data_config = _build_models(config, accelerator, data.num_classes, student, teacher)
    train_loader, val_loader = _build_loaders(config, accelerator, data, data_config, wrapper)

    # optimizer (timm), EMA, then prepare the student, its optimizer and loaders only
    world = accelerator.num_processes
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
    scheduler, batches_per_epoch, updates_per_epoch, total_updates = _build_schedule(
        config, accelerator, optimizer, train_loader
    )
    if model_ema is not None:
        accelerator.register_for_checkpointing(model_ema)
    mixup_fn = None
    if config.mixup > 0 or config.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.smoothing,
            num_classes=data.num_classes,
        )
    with accelerator.main_process_first():  # copies the metric module into the HF modules cache once
        metric = load_topk_metric()
    run = Run(
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
        num_classes=data.num_classes,
        label_names=data.label_names,
        num_corrupt=data.num_corrupt,
        data_config=dict(data_config),
        lr=lr,
        batches_per_epoch=batches_per_epoch,
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        state=_new_state(config, world),
        bad_step=torch.full((), -1, dtype=torch.long, device=accelerator.device),
    )
    _resume(run)
    return run
