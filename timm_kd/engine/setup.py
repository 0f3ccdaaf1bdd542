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
from dataclasses import dataclass, fields
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
from .checkpoint import choose_resume, load_checkpoint, read_state, state_json
from .config import CHECKPOINT_DIR, TrainConfig, option_flag
from .resume import compare_config
from .sync_bn import convert_sync_batchnorm

__all__ = ["build_accelerator", "setup_run", "Run", "teacher_data_config"]


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
        if config.val_fraction:  # held out of the training split, the same on every rank
            train, val = D.split_validation(train, config.val_fraction, seed=config.seed)
        else:
            val = D.load_image_dataset(config.dataset, config.val_split, **{**common, "streaming": False})
    num_classes = config.num_classes or D.get_num_classes(train) or D.get_num_classes(val)
    if num_classes is None:
        raise ValueError(
            f"cannot tell the number of classes of {config.dataset!r} (no ClassLabel feature, streaming): "
            f"pass --num-classes N."
        )
    D.check_labels(train, num_classes, name=f"{config.dataset}[{config.train_split}]")
    val_name = f"{config.val_fraction} of {config.train_split}" if config.val_fraction else config.val_split
    D.check_labels(val, num_classes, name=f"{config.dataset}[{val_name}]")
    verify = config.verify_images == "yes" or (
        config.verify_images == "auto"
        and not config.streaming
        and os.path.exists(os.path.expanduser(config.dataset))
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


def teacher_data_config(config: TrainConfig) -> dict[str, Any] | None:
    """The teacher's input the flags state (``--teacher-input-size/-mean/-std/-interpolation``);
    None when none was given (the teacher then gets its weights' known config, else the batch)."""
    size = config.teacher_input_size
    cfg = {
        k: v
        for k, v in dict(
            input_size=(3, size, size) if size else None,
            mean=config.teacher_mean,
            std=config.teacher_std,
            interpolation=config.teacher_interpolation,
        ).items()
        if v is not None
    }
    return cfg or None


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
            teacher_data_config=teacher_data_config(config),
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
    if config.eval_workers is not None:  # evaluation's own workers (default: --num-workers)
        loader_kw = {**loader_kw, "num_workers": config.eval_workers}
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
    total_updates = config.epochs * updates_per_epoch
    if config.max_train_steps is not None:
        total_updates = min(total_updates, config.max_train_steps)
    return scheduler, batches_per_epoch, updates_per_epoch, total_updates


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


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
        "config": None,  # this run's configuration (_config_record), stored with each checkpoint
        "config_changes": [],  # flags changed on resume: {"step", "epoch", "flag", "old", "new"}
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
    stop: Any = None  # the StopMonitor of fit: asked at every optimizer-step boundary
    bad_step: torch.Tensor | None = None  # first optimizer step with a non-finite loss, -1 if none
    warned_flip: bool = False
    diverging_saved: bool = False  # a checkpoint was written with diverging weights (not good)
    teacher_info: dict[str, Any] | None = None  # what teaches (timm_kd.hub.describe_teacher); None for ce

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


def _config_record(run: Run) -> dict[str, Any]:
    """The run's configuration as each checkpoint stores it: every flag, and what flags and data
    resolved to (learning rate, classes, processes, global batch, optimizer steps per epoch)."""
    config, world = run.config, run.accelerator.num_processes
    resolved = {
        "lr": run.lr,
        "num_classes": run.num_classes,
        "world_size": world,
        "global_batch_size": config.batch_size * world * config.grad_accum_steps,
        "updates_per_epoch": run.updates_per_epoch,
    }
    return state_json({"config": config.to_dict(), "resolved": resolved})


def _resume(run: Run) -> None:
    """Continue from the checkpoint ``--resume`` names (the main process chooses, every rank loads it).

    Its configuration is compared with this run's before anything is loaded: what cannot work
    (another student, optimizer, class count, global batch) is refused listing the flags; what can
    (learning rate and schedule, epochs, loss, augmentation, logging) is applied from the
    checkpoint's step, announced, and recorded in ``state["config_changes"]``.
    """
    config, state, acc = run.config, run.state, run.accelerator
    resume_dir, skipped = choose_resume(acc, config.resume, run.out_dir)
    for note in skipped:
        run.log(note)
    if config.resume == "latest" and resume_dir is None:
        run.log(
            f"--resume latest: no checkpoint in {run.out_dir / CHECKPOINT_DIR} yet, starting from scratch"
        )
    if resume_dir is None:
        return
    saved = read_state(resume_dir)
    flags = {f.name: option_flag(f) for f in fields(TrainConfig)}
    refused, applied = compare_config(saved.get("config") or {}, state["config"], flags)
    if refused:
        raise ValueError(
            f"cannot resume {resume_dir} with these changes: "
            + "; ".join(f"{flag} {old!r} -> {new!r} ({why})" for flag, old, new, why in refused)
            + ". Resume with the checkpoint's values, or start a new run in another --output-dir "
            f"(--student-checkpoint {resume_dir}/model.safetensors starts it from these weights)."
        )
    load_checkpoint(acc, resume_dir, model=run.student, optimizer=run.optimizer, model_ema=run.model_ema)
    gs = int(saved["global_step"])
    if run.scheduler is not None:  # not stored: rebuilt from this run's flags, at the checkpoint's step
        run.scheduler.step_update(num_updates=gs)
    changes = [
        {"step": gs, "epoch": saved["epoch"] + 1, "flag": flag, "old": old, "new": new}
        for flag, old, new, why in applied
        if why != "runtime"
    ]
    state.update({k: v for k, v in saved.items() if k != "config"})
    state["config_changes"] = list(saved.get("config_changes") or []) + changes
    run.last_good = str(resume_dir)
    lr_now = run.optimizer.param_groups[0]["lr"]
    run.log(f"resumed from {resume_dir} (epoch {state['epoch'] + 1}, step {gs}), lr now {lr_now:.4g}")
    if applied:
        run.log(
            f"changed on resume, applied from step {gs}: "
            + ", ".join(f"{flag} {old} -> {new}" for flag, old, new, _ in applied)
        )
    if changes:
        msg = (
            f"resuming {resume_dir} with {len(changes)} changed training setting(s) "
            f"({', '.join(c['flag'] for c in changes)}): the run will not match an uninterrupted one; "
            "the changes and their step are recorded in run_summary.json (run.config_changes)."
        )
        warnings.warn(msg)
        run.log("WARNING: " + msg)


def setup_run(config: TrainConfig, accelerator, student: nn.Module | None, teacher: nn.Module | None) -> Run:
    """Data (checked), models, loaders, optimizer, scheduler, EMA, metric; resume if asked."""
    set_seed(config.seed)
    data = _load_data(config, accelerator)
    student, wrapper, data_config = _build_models(config, accelerator, data.num_classes, student, teacher)
    train_loader, val_loader = _build_loaders(config, accelerator, data, data_config, wrapper)

    # optimizer (timm), EMA, then prepare the student, its optimizer and loaders only
    world = accelerator.num_processes
    if config.sync_bn and world > 1:  # before the optimizer, the EMA copy and DDP see the layers
        student, _ = convert_sync_batchnorm(student, accelerator.device)
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
    run.state["config"] = _config_record(run)
    _resume(run)
    return run
