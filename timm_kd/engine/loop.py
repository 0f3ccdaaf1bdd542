"""The training loop: ``fit`` reads top to bottom as check, set up, check the teacher, train and
evaluate each epoch, finish.

Reproducibility. The order of the training samples is a pure function of ``(seed, epoch)``
(``timm_kd.data.SeededSampler``), the augmentation of a sample a pure function of ``(seed, epoch,
index)``, and the global RNGs (Mixup/CutMix, drop-path, dropout) are re-seeded before every batch
from ``(seed, rank, epoch, batch)``. So skipping the first batches of an epoch on resume replays
exactly what an uninterrupted run would have seen.

Steps. ``global_step`` counts optimizer updates (``grad_accum_steps`` batches each); the scheduler,
``checkpoint_every``, ``log_every`` and ``max_train_steps`` all count optimizer updates. The hot
loop keeps every statistic on the device; values reach the host only every ``log_every`` steps
(and for checkpoints).

Logs. One unit for shares: percent (0-100), as ``timm.utils.accuracy`` reports accuracy. Top-1/top-5
(student and teacher), the teacher-student top-1 ``agreement`` and the loss's rates
(``PERCENT_TERMS``, fractions in the loss's own output) are percent on the console, in
``run_summary.json`` and in the trackers; loss terms, the learning rate and the ``warmup`` factor
(0-1) are plain numbers. The trackers (``--report-to``) get the step means every ``log_every``
steps (``train/<term>``) and, after each evaluation, the epoch's (``_epoch_logs``). Progress bars
are drawn only where they can redraw in place (a terminal or a notebook); with output going to a
file or a pipe the run prints its plain log lines only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.data.mixup import one_hot
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from ..losses import cross_entropy
from .args import config_from_args
from .checkpoint import WEIGHT_GROWTH_LIMIT, nonfinite_state, save_checkpoint, state_json, weights_absmax
from .checks import check_config
from .config import (
    EvalResult,
    FitResult,
    TrainConfig,
    TrainingDivergedError,
)
from .evaluate import evaluate_on_val, format_metrics, metric_floats
from .processes import RunStoppedError, StopMonitor, check_processes, lock_output_dir
from .setup import Run, build_accelerator, setup_run
from .summary import finish, teacher_record, write_run_config
from .teacher_check import check_teacher

__all__ = ["fit", "TARGET_FLIP_WARNING"]

#: warn (once per run) when an ATS-family target ranks a wrong class first, where the teacher's own
#: logits rank the label first (the loss's ``induced_flip``), on more than this fraction of the
#: samples: docs/capacity_study.md measured 11-34 % with the authors' tau 4 / 3 on
#: teachers whose logits are small for 100 classes, and ats then trailed kd by 3 points.
TARGET_FLIP_WARNING = 0.05

#: loss terms that are rates (fractions of the batch, in the loss's own output) and are logged,
#: like every accuracy and the teacher-student agreement, in percent
PERCENT_TERMS = ("target_flip", "induced_flip")


def _reseed(seed: int, rank: int, epoch: int, batch_idx: int) -> None:
    """Seed the global RNGs (Mixup/CutMix, drop-path, dropout) from ``(seed, rank, epoch, batch)``.

    Done before every batch, so the randomness of a batch does not depend on what ran before it
    in this process. ``load_checkpoint`` also restores each rank's RNG states, but a run resumed
    on another number of processes has none for the new ranks; with this, a resumed run that
    skips the first batches of an epoch draws the same numbers either way.
    """
    s = int(np.random.SeedSequence([seed, rank, epoch, batch_idx]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# --------------------------------------------------------------------------------------------------
# Checks during the run
# --------------------------------------------------------------------------------------------------


def _warn_long_warmup(run: Run) -> None:
    """Warn before training when the loss's warm-up is longer than the run: the distillation terms
    would never reach their full weight (DTKD/DKD's 20 warm-up epochs in a 2-epoch run end below
    15 %). The loss gets the 1-based epoch ``1 + update / updates_per_epoch``."""
    if run.wrapper is None:
        return
    loss = getattr(run.wrapper.loss_fn, "loss_fn", run.wrapper.loss_fn)  # through compile_loss
    warmup = float(getattr(loss, "warmup_epochs", 0) or 0)
    per_epoch = max(run.updates_per_epoch, 1)
    epochs = run.total_updates / per_epoch  # max_train_steps included
    last = 1 + (run.total_updates - 1) / per_epoch  # the 1-based epoch the loss gets at the last step
    if warmup <= last:
        return
    msg = (
        f"the {run.config.method} loss ramps its distillation terms up over warmup_epochs={warmup:g} "
        f"epochs, longer than this run ({epochs:.3g} epochs): they end at {100 * last / warmup:.0f} % "
        f"of their weight, so cross-entropy trains the student most of the time. Pass "
        f"--loss-arg warmup_epochs=N with N at most {epochs:.3g} (the authors ramp over 20 of 240 "
        f"epochs on CIFAR-100, 1 of 100 on ImageNet), or --loss-arg warmup_epochs=0 for none."
    )
    warnings.warn(msg)
    run.log("WARNING: " + msg)


def _interactive() -> bool:
    """Whether progress bars can redraw in place: stdout and stderr are terminals, or a notebook."""
    ttys = all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))
    return ttys or "ipykernel" in sys.modules


def _check_finite(run: Run, where: str) -> None:
    """Raise ``TrainingDivergedError`` if any rank saw a NaN/inf loss (one host sync, all ranks)."""
    big = 2**62
    flag = torch.where(run.bad_step < 0, torch.full_like(run.bad_step, big), run.bad_step).reshape(1)
    step = int(run.accelerator.gather(flag).min()) if run.accelerator.num_processes > 1 else int(flag)
    if step < big:
        raise TrainingDivergedError(
            f"the loss became NaN/inf at optimizer step {step} (epoch {run.state['epoch'] + 1}; "
            f"found {where}). {_recovery_advice(run)}"
        )


def _recovery_advice(run: Run) -> str:
    """Where to go on from after a divergence: the last good checkpoint (finite weights that had
    not grown ``WEIGHT_GROWTH_LIMIT``-fold), with the flags that avoid it."""
    fix = "a lower --lr (applied on resume), --clip-grad 1.0, or bf16 instead of fp16"
    good = run.last_good
    if good:
        return f"Last good checkpoint: {good}. Resume from it with --resume {good} and {fix}."
    if run.diverging_saved:
        return (
            "Last good checkpoint: none (every checkpoint so far was written with the weights already "
            f"diverging). Start over with {fix}."
        )
    return f"Last good checkpoint: none (none written yet). Start over with {fix}."


def _save_checkpoint(run: Run) -> None:
    """Write a checkpoint and make it the last good one, if its weights and optimizer state are
    finite; otherwise raise ``TrainingDivergedError`` naming the previous good checkpoint (a
    checkpoint of non-finite tensors is never written: resuming from it could not train)."""
    acc, state = run.accelerator, run.state
    bad = nonfinite_state(run.student, run.optimizer, run.model_ema)
    if bad:
        raise TrainingDivergedError(
            f"the weights or optimizer state became NaN/inf by optimizer step {state['global_step']} "
            f"(epoch {state['epoch'] + 1}; {', '.join(bad)}), with a finite loss so far; no checkpoint "
            f"was written for this step. {_recovery_advice(run)}"
        )
    absmax = weights_absmax(run.student)
    start = state.get("weights_absmax_start") or absmax
    unhealthy = None
    if absmax > WEIGHT_GROWTH_LIMIT * start:
        unhealthy = (
            f"its largest weight is {absmax:.3g}, {absmax / start:.3g} times the {start:.3g} at the "
            f"start of the run (more than {WEIGHT_GROWTH_LIMIT:g} times): training is diverging"
        )
    path = save_checkpoint(
        acc,
        run.out_dir,
        state_json(state),
        run.config.keep_checkpoints,
        model=run.student,
        optimizer=run.optimizer,
        model_ema=run.model_ema,
        unhealthy=unhealthy,
    )
    if unhealthy is None:
        run.last_good = str(path)
    elif not run.diverging_saved:
        run.diverging_saved = True
        run.log(f"WARNING: checkpoint {path} is not counted as good: {unhealthy}. {_recovery_advice(run)}")


def _warn_target_flip(run: Run, flip: float | None) -> None:
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
        "`timm-kd diagnose --teacher ... --dataset ...` (timm_kd.diagnostics.suggest_ats_temperatures on "
        "the teacher's training-set logits), or raise tau_wrong towards tau_correct."
    )


# --------------------------------------------------------------------------------------------------
# One epoch, in steps
# --------------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Loss-term sums on the device: since the last log, and since the start of the epoch (this
    process' part of it)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0
    images: int = 0
    t: float = field(default_factory=time.time)
    epoch_sums: dict[str, Any] = field(default_factory=dict)
    epoch_n: int = 0

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
            self.epoch_sums[k] = self.epoch_sums.get(k, 0) + v
        self.n += 1
        self.epoch_n += 1
        self.images += images

    def reset_log(self) -> None:
        self.sums, self.n, self.images, self.t = {}, 0, 0, time.time()


def _inputs(run: Run, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's images (channels-last if asked) and targets (Mixup/CutMix or smoothed if asked)."""
    config = run.config
    images, target = batch["pixel_values"], batch["label"]
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if run.mixup_fn is not None:
        images, target = run.mixup_fn(images, target)
    elif config.smoothing > 0:
        off = config.smoothing / run.num_classes
        target = one_hot(target, run.num_classes, on_value=1.0 - config.smoothing + off, off_value=off)
    return images, target


def _forward(run: Run, images, target, batch: dict[str, Any], epoch_f: float) -> dict[str, torch.Tensor]:
    """The loss terms of one batch (distilled, or cross-entropy alone); a loss's own finiteness
    check becomes a ``TrainingDivergedError``."""
    try:
        with run.accelerator.autocast():
            if run.wrapper is not None:
                # a cached teacher's columns ride in the batch (none for a live teacher)
                inputs = {k: batch[k] for k in run.wrapper.teacher_input_keys}
                return run.wrapper(images, target, epoch=epoch_f, **inputs)
            logits = run.student(images)
            ce = cross_entropy(logits.float(), target)
            return {"loss": ce, "ce": ce.detach(), "output": logits}
    except FloatingPointError as e:  # the loss's own finiteness check (NaN/inf logits)
        # an earlier NaN loss seen here; no collective, this may be the only rank raising
        earlier = int(run.bad_step)
        step = earlier if earlier >= 0 else run.state["global_step"] + 1
        raise TrainingDivergedError(
            f"the loss became NaN/inf at optimizer step {step} (epoch {run.state['epoch'] + 1}): "
            f"{e} {_recovery_advice(run)}"
        ) from e


def _terms(run: Run, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scalar loss terms to log (and the student-teacher top-1 agreement); marks the first
    step with a non-finite loss, on the device."""
    first_bad = torch.full_like(run.bad_step, run.state["global_step"] + 1)
    bad = ~torch.isfinite(out["loss"].detach())
    run.bad_step = torch.where(bad & (run.bad_step < 0), first_bad, run.bad_step)
    terms = {
        k: v.detach().float()
        for k, v in out.items()
        if k not in ("output", "teacher_output") and torch.is_tensor(v) and v.dim() == 0
    }
    for k in PERCENT_TERMS:  # rates a loss returns as fractions are logged in percent
        if k in terms:
            terms[k] = terms[k] * 100
    if "teacher_output" in out:
        same = out["output"].argmax(-1) == out["teacher_output"].argmax(-1)
        terms["agreement"] = same.float().mean() * 100
    return terms


def _optimizer_step(run: Run) -> int:
    """Clip, step, advance the counters, the scheduler and the EMA; returns the new global step."""
    config, acc, state = run.config, run.accelerator, run.state
    if config.clip_grad is not None:
        if config.clip_mode == "norm":
            acc.clip_grad_norm_(run.student.parameters(), config.clip_grad)
        else:
            acc.unscale_gradients()
            dispatch_clip_grad(list(run.student.parameters()), config.clip_grad, mode=config.clip_mode)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state["global_step"] += 1
    state["step_in_epoch"] += 1
    gs = state["global_step"]
    if run.scheduler is not None:
        run.scheduler.step_update(num_updates=gs)
    if run.model_ema is not None:
        run.model_ema.update(acc.unwrap_model(run.student), step=gs)
    return gs


def _log(run: Run, stats: _Stats, bar, gs: int) -> None:
    """Log the mean loss terms since the last log (a host sync and a collective)."""
    config, acc = run.config, run.accelerator
    _check_finite(run, "at a logging step")
    logs = {f"train/{k}": v / max(stats.n, 1) for k, v in _rank_mean(acc, stats.sums).items()}
    logs["train/lr"] = run.optimizer.param_groups[0]["lr"]
    logs["train/img_per_s"] = stats.images / max(time.time() - stats.t, 1e-9)
    shown = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in logs.items()}
    bar.set_postfix(shown, refresh=False)
    run.log(
        f"step {gs}/{run.total_updates} epoch {run.state['epoch'] + 1}: "
        + " ".join(f"{k} {v}" for k, v in shown.items())
    )
    if config.report_to:
        acc.log(logs, step=gs)
    flip = logs.get("train/induced_flip")  # percent, as logged
    _warn_target_flip(run, None if flip is None else flip / 100)
    stats.reset_log()


def _train_epoch(run: Run, bar) -> dict[str, float]:
    """Train until the end of the epoch (or ``max_train_steps``); return the epoch's mean loss terms."""
    config, acc, state = run.config, run.accelerator, run.state
    accum, world, epoch = config.grad_accum_steps, acc.num_processes, state["epoch"]
    run.student.train()
    run.train_loader.set_epoch(epoch)
    skip = state["step_in_epoch"] * accum
    batches = iter(acc.skip_first_batches(run.train_loader, skip) if skip else run.train_loader)
    batch_idx = skip - 1
    stats = _Stats()
    if skip and state.get("epoch_partial"):  # resumed mid-epoch: the epoch's sums so far (rank mean)
        stats.epoch_sums, stats.epoch_n = dict(state["epoch_partial"]["sums"]), state["epoch_partial"]["n"]
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
            state["num_skipped"] += int(batch.get("num_skipped", 0))
            images, target = _inputs(run, batch)
            epoch_f = epoch + 1 + state["step_in_epoch"] / run.updates_per_epoch  # 1-based, fractional
            with contextlib.nullcontext() if micro == n_group - 1 else acc.no_sync(run.student):
                out = _forward(run, images, target, batch, epoch_f)
                acc.backward(out["loss"] / n_group)
            stats.add(_terms(run, out), images.shape[0] * world)
            done += 1
        if done == 0:
            break  # a streamed loader ran out early
        gs = _optimizer_step(run)
        bar.update(1)
        _stop_if_asked(run, gs)
        if gs % config.log_every == 0 or gs == run.total_updates:
            _log(run, stats, bar, gs)
        mid_epoch = state["step_in_epoch"] < run.updates_per_epoch
        if (
            config.checkpoint_every
            and gs % config.checkpoint_every == 0
            and mid_epoch
            and gs < run.total_updates
        ):
            _check_finite(run, "before writing a checkpoint")
            state["epoch_partial"] = {"n": stats.epoch_n, "sums": _rank_mean(acc, stats.epoch_sums)}
            _save_checkpoint(run)
    _check_finite(run, "at the end of the epoch")
    state["epoch_partial"] = None
    return {k: v / max(stats.epoch_n, 1) for k, v in _rank_mean(acc, stats.epoch_sums).items()}


def _stop_if_asked(run: Run, gs: int) -> None:
    """Raise ``RunStoppedError`` at this step boundary if the ranks agreed to stop (a signal, or
    the launcher is gone); before this step is logged or checkpointed."""
    why = run.stop.should_stop() if run.stop is not None else None
    if why is None:
        return
    msg = (
        f"stopped after optimizer step {gs} (epoch {run.state['epoch'] + 1}): {why}. The steps since "
        f"the last checkpoint are not saved; last complete checkpoint: {run.last_good or 'none'}. "
        "Continue with the same command plus --resume latest."
    )
    run.log(msg)
    raise RunStoppedError(msg)


def _rank_mean(acc, values: dict[str, Any]) -> dict[str, float]:
    """The mean over processes of each value (a collective: every rank calls it at the same point)."""
    keys = list(values)
    if not keys:
        return {}
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=acc.device) for k in keys])
    return dict(zip(keys, acc.reduce(stacked, reduction="mean").tolist()))


def _evaluate_epoch(run: Run, train_means: dict[str, float]) -> EvalResult:
    """Evaluate the student (its EMA with ``model_ema``), record the epoch, log it."""
    config, state, acc = run.config, run.state, run.accelerator
    epoch = state["epoch"]
    model = run.model_ema.module if run.model_ema is not None else run.student
    model.eval()
    res = evaluate_on_val(run, model, f"eval epoch {epoch + 1}")
    m = metric_floats(res.metrics)
    state["history"].append(
        {"epoch": epoch + 1, "global_step": state["global_step"], **m, "train": train_means}
    )
    if state["best_metrics"] is None or m["top1"] > state["best_metrics"]["top1"]:
        state["best_metrics"], state["best_epoch"] = m, epoch + 1
    terms = " ".join(f"{k} {v:.4g}" for k, v in train_means.items())
    best = f"best top1 {state['best_metrics']['top1']:.2f} (epoch {state['best_epoch']})"
    run.log(
        f"epoch {epoch + 1}/{config.epochs} (step {state['global_step']}): train {terms} | "
        f"val {format_metrics(m)} | {best}"
    )
    if config.report_to:
        acc.log(_epoch_logs(run, m, train_means), step=state["global_step"])
    return res


def _epoch_logs(run: Run, val: dict[str, float], train_means: dict[str, float]) -> dict[str, float]:
    """The tracker scalars of one finished epoch, at its last optimizer step: ``val/top1``,
    ``val/top5`` (percent), ``epoch/<term>`` (the epoch's mean of each training term, the same
    numbers as the console's epoch line and ``run_summary.json``'s history), ``epoch/lr`` and
    ``val/teacher_top1`` (the teacher check's, a reference line), and ``epoch`` (1-based)."""
    logs = {f"val/{k}": float(v) for k, v in val.items() if k.startswith("top")}
    logs.update({f"epoch/{k}": float(v) for k, v in train_means.items()})
    logs["epoch/lr"] = float(run.optimizer.param_groups[0]["lr"])
    teacher = run.state.get("teacher_metrics") or {}
    if "top1" in teacher:
        logs["val/teacher_top1"] = float(teacher["top1"])
    logs["epoch"] = run.state["epoch"] + 1
    return logs


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------


def _announce(run: Run) -> None:
    config, acc = run.config, run.accelerator
    n_params = sum(p.numel() for p in acc.unwrap_model(run.student).parameters()) / 1e6
    how = "alone (cross-entropy)"
    if run.wrapper is not None:
        how = f"with {config.method}{' (compiled)' if config.compile_loss else ''} from {config.teacher}"
    run.log(
        f"training {config.student} ({n_params:.2f}M params) {how}: {acc.num_processes} "
        f"process(es) x batch {config.batch_size} x accumulation {config.grad_accum_steps}, "
        f"{run.updates_per_epoch} steps/epoch, {run.total_updates} steps, lr {run.lr:.4g}"
    )
    describe = getattr(run.wrapper.teacher, "describe_input", None) if run.wrapper is not None else None
    if describe is not None:  # a live teacher: what it sees of the student's batches, and the cost
        run.log(describe(run.data_config["input_size"][-2:]))


def fit(
    config: TrainConfig | argparse.Namespace,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    accelerator=None,
    card_meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train one student: distill it from a teacher, or with ``method="ce"`` train it alone.

    See ``timm_kd.engine`` for what happens, in order.

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
        OutputDirBusyError: another run holds ``config.output_dir`` (its lock, held until this returns).
        RunStoppedError: SIGTERM/SIGINT, or the launcher died; raised at an optimizer-step boundary,
            on every rank at the same step (``timm_kd.engine.processes``).
    """
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    t_start = time.time()
    if config.method == "ce" and config.teacher is not None:
        config = dataclasses.replace(config, teacher=None)  # trained alone: the teacher is not used
    check_config(config)
    check_processes(config)
    if config.progress and not _interactive():  # bars would write \r noise into a log file
        config = dataclasses.replace(config, progress=False)
    accelerator = accelerator or build_accelerator(config)
    lock = lock_output_dir(accelerator, config.output_dir)  # creates the folder; one run per folder
    try:
        with StopMonitor(accelerator.num_processes) as stop:
            return _fit(config, accelerator, stop, student, teacher, card_meta, t_start)
    finally:
        if lock is not None:
            lock.release()


def _fit(config: TrainConfig, accelerator, stop, student, teacher, card_meta, t_start: float) -> FitResult:
    """``fit`` in the folder it locked: set up, check the teacher, train and evaluate, finish."""
    write_run_config(accelerator, config)  # before anything loads: a failed run still says how it was made
    run = setup_run(config, accelerator, student, teacher)
    if run.state.get("weights_absmax_start") is None:  # what a checkpoint's divergence is measured by
        run.state["weights_absmax_start"] = weights_absmax(run.student)
    run.stop = stop
    run.teacher_info = teacher_record(run)
    write_run_config(accelerator, config, run)  # now with the resolved lr, steps, data config and teacher
    if config.report_to:
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()
        }
        accelerator.init_trackers(run.out_dir.name or "timm_kd", config=flat)
    check_teacher(run, teacher_given=teacher is not None)
    _announce(run)
    _warn_long_warmup(run)

    state = run.state
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
            _save_checkpoint(run)
    bar.close()
    return finish(run, last_eval, t_start, card_meta or {})
