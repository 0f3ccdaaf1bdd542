"""What every timm-kd loss shares: argument checks, input checks, float32 math, cross-entropy.

All losses follow one calling convention::

    loss_fn(student_logits, teacher_logits, target, *, epoch=None) -> dict[str, Tensor]

* ``student_logits``, ``teacher_logits``: ``[B, C]``, any floating dtype. The loss math runs in
  float32 with autocast disabled, whatever the caller's autocast or logit dtype.
* ``target``: class indices ``[B]`` (int) or soft targets ``[B, C]`` (float, rows summing to 1,
  as produced by timm's ``Mixup``/CutMix).
* ``epoch``: 1-based training epoch, fractions allowed, needed by losses with a warm-up, whose
  factor is ``min(epoch / warmup_epochs, 1)``. The first epoch is 1 (``1 + step / steps_per_epoch``
  during it, ``step`` 0-based, as ``timm_kd.engine`` passes it). A 0-based loop (timm's
  ``train.py`` counts epochs from 0) must pass ``epoch + 1``: ``epoch=0`` gives the factor 0, no
  distillation at all, so timm's epoch passed unchanged would train the whole first epoch without
  the teacher (a ``UserWarning`` says so).
* Returns ``{"loss": objective, <term>: value, ...}``; ``"loss"`` includes cross-entropy.

The data-dependent checks (finite logits, label range) cost one device-to-host transfer per call;
with ``check_inputs=False`` they are skipped (shape checks always run).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import soft_cross_entropy

__all__ = [
    "DistillLoss", "LossInputs", "check_epoch", "check_non_negative", "check_positive", "cross_entropy",
    "warmup_factor",
]


def _check_number(name: str, value: float, loss: str, positive: bool) -> float:
    """``value`` as a float if it is finite and > 0 (``positive``) or >= 0, else an error naming it."""
    where = f"{loss}: " if loss else ""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}{name} must be a number, got {value!r}") from None
    if math.isfinite(v) and (v > 0 if positive else v >= 0):
        return v
    if positive:
        hint = " Temperatures divide the logits, so use a positive value (the papers use 1 to 8)."
        hint = hint if "tau" in name or "temperature" in name else ""
        raise ValueError(f"{where}{name} must be a finite number > 0, got {value!r}.{hint}")
    raise ValueError(
        f"{where}{name} must be a finite number >= 0, got {value!r}. "
        f"A negative weight would maximize that term; use 0 to switch the term off."
    )


def check_positive(name: str, value: float, loss: str = "") -> float:
    """``value`` as a float if it is finite and > 0 (temperatures), else a ValueError with the fix."""
    return _check_number(name, value, loss, positive=True)


def check_non_negative(name: str, value: float, loss: str = "") -> float:
    """``value`` as a float if it is finite and >= 0 (loss weights), else a ValueError."""
    return _check_number(name, value, loss, positive=False)


def check_epoch(epoch: float, loss: str) -> float:
    """``epoch`` as a float if it is finite and >= 0, else a ValueError naming the loss."""
    epoch = float(epoch)
    if not math.isfinite(epoch) or epoch < 0:
        raise ValueError(f"{loss}: epoch must be a finite number >= 0 (1-based), got {epoch!r}")
    return epoch


def warmup_factor(
    epoch: float | torch.Tensor | None, warmup_epochs: float, loss: str
) -> float | torch.Tensor:
    """``min(epoch / warmup_epochs, 1)``; 1 without warm-up. ``epoch`` is 1-based.

    ``epoch == 0`` (a Python number) is allowed and gives 0, but it is what a 0-based loop passes in
    its first epoch, so it also warns (once per loss under Python's default filter) with the fix:
    pass ``epoch + 1``.

    A 0-d tensor ``epoch`` (what ``compile_loss`` passes, already checked) gives a 0-d tensor, so a
    compiled loss computes the factor in its graph instead of recompiling for each epoch's value.
    """
    if warmup_epochs <= 0:
        return 1.0
    if epoch is None:
        raise ValueError(
            f"{loss}: this loss has a warm-up of {warmup_epochs:g} epochs and needs the current epoch: "
            f"call it as loss_fn(student_logits, teacher_logits, target, epoch=epoch) with a 1-based "
            f"epoch (fractions allowed), or create it with warmup_epochs=0."
        )
    if torch.is_tensor(epoch):
        return (epoch / warmup_epochs).clamp(max=1.0)
    epoch = check_epoch(epoch, loss)
    if epoch == 0:
        warnings.warn(
            f"{loss}: epoch=0 gives a warm-up factor of 0 (no distillation in this call). Epochs are "
            f"1-based: a loop that counts epochs from 0, like timm's train.py, should pass epoch + 1 "
            f"(or epoch + 1 + step / steps_per_epoch for a per-step ramp, as timm_kd.engine does).",
            stacklevel=2,
        )
    return min(epoch / warmup_epochs, 1.0)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class indices ``[B]`` or soft targets ``[B, C]``."""
    if target.dim() == logits.dim():
        return soft_cross_entropy(target, F.log_softmax(logits, dim=-1))
    return F.cross_entropy(logits, target)


class LossInputs(NamedTuple):
    """Checked loss inputs, all float32 (``labels`` int64)."""

    student: torch.Tensor  # [B, C] float32, keeps its graph
    teacher: torch.Tensor  # [B, C] float32, detached
    target: torch.Tensor  # [B] int64 class indices, or [B, C] float32 soft targets
    labels: torch.Tensor  # [B] int64: the hard label, or the soft target's argmax
    soft: bool  # whether ``target`` is soft


class DistillLoss(nn.Module):
    """Base of the registered losses: input checks and float32 math, nothing else.

    Subclasses implement ``forward(student_logits, teacher_logits, target, *, epoch=None)`` and
    start it with ``x = self.prepare(student_logits, teacher_logits, target)``, then compute in
    ``x.student`` / ``x.teacher`` inside ``with self.float32(x.student):``.

    Every built-in loss takes ``check_inputs`` (validate labels and finiteness on every call: one
    host sync); those with ``logit_standardize`` z-score both logits (``standardize_logits``, Sun
    et al. 2024) before the distillation terms, while cross-entropy sees the raw student logits.
    """

    #: the registry name, set by subclasses (used in error messages)
    name: str = "loss"

    def __init__(self, check_inputs: bool = True):
        super().__init__()
        self.check_inputs = bool(check_inputs)

    def extra_repr(self) -> str:
        skip = {"training", "check_inputs"}
        items = [f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in skip]
        return ", ".join(items)

    @staticmethod
    def float32(x: torch.Tensor) -> contextlib.AbstractContextManager:
        """Context in which autocast is off, so the loss math stays in float32."""
        return torch.autocast(device_type=x.device.type, enabled=False)

    def _check_values(
        self, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None, classes: int
    ) -> None:
        """Label range and finite logits, from one host transfer. A float32 sum is finite only if
        every element is; ``torch.isfinite`` runs only when it is not, to tell an overflow from NaN/inf.
        """
        parts = [student.detach().sum(dtype=torch.float32)]
        if teacher is not None:
            parts.append(teacher.detach().sum(dtype=torch.float32))
        has_labels = labels is not None and labels.numel() > 0
        if has_labels:
            parts += [labels.min().float(), labels.max().float()]
        stats = torch.stack(parts).tolist()  # the one host sync
        if has_labels:
            lo, hi = int(stats[-2]), int(stats[-1])
            if lo < 0 or hi >= classes:
                raise ValueError(
                    f"{self.name}: label {lo if lo < 0 else hi} is outside [0, {classes}) for logits with "
                    f"{classes} classes. Check that the dataset's classes match the model's num_classes "
                    f"(ignore-index labels such as -100 are not supported by distillation losses; drop "
                    f"those samples first)."
                )
        if not math.isfinite(stats[0]) and not bool(torch.isfinite(student.detach()).all()):
            raise FloatingPointError(
                f"{self.name}: student_logits contain NaN or inf. The student has diverged or was fed bad "
                f"input: lower the learning rate, enable gradient clipping, or resume from the last "
                f"good checkpoint."
            )
        if teacher is not None and not math.isfinite(stats[1]) and not bool(torch.isfinite(teacher).all()):
            raise FloatingPointError(
                f"{self.name}: teacher_logits contain NaN or inf. Check the teacher's weights and input "
                f"normalization, or run the teacher in float32 instead of fp16."
            )

    def prepare(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor
    ) -> LossInputs:
        """Check shapes, labels and finiteness; cast to float32; detach the teacher."""
        name = self.name
        if not torch.is_tensor(student_logits) or student_logits.dim() != 2:
            raise ValueError(
                f"{name}: student_logits must be a [batch, classes] tensor, got "
                f"{getattr(student_logits, 'shape', type(student_logits))}. Pass the classifier output, "
                f"not pooled features."
            )
        B, C = student_logits.shape
        if teacher_logits is not None and tuple(teacher_logits.shape) != (B, C):
            raise ValueError(
                f"{name}: teacher_logits shape {tuple(teacher_logits.shape)} does not match student_logits "
                f"shape {(B, C)}. Teacher and student must predict the same classes for the same batch; "
                f"if the teacher has more classes, map them with DistillWrapper(class_map=...)."
            )
        if not torch.is_tensor(target):
            raise TypeError(f"{name}: target must be a tensor, got {type(target).__name__}")
        if target.dim() == 1:
            if target.shape[0] != B:
                raise ValueError(f"{name}: target has {target.shape[0]} labels for a batch of {B} logits.")
            if target.is_floating_point():
                raise ValueError(
                    f"{name}: 1-d target must hold integer class indices, got dtype {target.dtype}. "
                    f"Use target.long(), or pass soft targets as a [batch, classes] tensor."
                )
            soft = False
            labels = target.long()
        elif target.dim() == 2:
            if tuple(target.shape) != (B, C):
                raise ValueError(
                    f"{name}: soft target shape {tuple(target.shape)} does not match the logits {(B, C)}. "
                    f"Mixup/CutMix must be created with num_classes={C}."
                )
            soft = True
            target = target.float()
            labels = target.argmax(dim=1)  # the first maximum
        else:
            raise ValueError(
                f"{name}: target must be class indices [batch] or soft targets [batch, classes], "
                f"got shape {tuple(target.shape)}"
            )
        if self.check_inputs:
            self._check_values(student_logits, teacher_logits, labels if not soft else None, C)
        teacher = teacher_logits.detach().float() if teacher_logits is not None else None
        return LossInputs(student_logits.float(), teacher, target, labels, soft)
