"""What every timm-kd loss shares: argument checks, input checks, float32 math, cross-entropy.

All losses follow one calling convention::

    loss_fn(student_logits, teacher_logits, target, *, epoch=None) -> dict[str, Tensor]

* ``student_logits``, ``teacher_logits``: ``[B, C]``, any floating dtype. The loss math runs in
  float32 with autocast disabled, whatever the caller's autocast or logit dtype.
* ``target``: class indices ``[B]`` (int) or soft targets ``[B, C]`` (float, rows summing to 1,
  as produced by timm's ``Mixup``/CutMix).
* ``epoch``: 1-based training epoch, fractions allowed (``epoch = 1 + step / steps_per_epoch``),
  needed by losses with a warm-up.
* Returns ``{"loss": objective, <term>: value, ...}``; ``"loss"`` includes cross-entropy.

``DistillLoss`` is the one base class: it holds the checks so that each loss file holds only its
math. With ``check_inputs=False`` the data-dependent checks (finite logits, label range), which need
a device-to-host sync, are skipped; shape checks always run.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._fused import first_argmax

__all__ = [
    "DistillLoss",
    "LossInputs",
    "check_positive",
    "check_epoch",
    "check_non_negative",
    "cross_entropy",
    "soft_cross_entropy",
    "kl_div",
    "warmup_factor",
]


def check_positive(name: str, value: float, loss: str = "") -> float:
    """``value`` as a float if it is finite and > 0, else a ValueError naming ``name`` and the fix."""
    where = f"{loss}: " if loss else ""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(
            f"{where}{name} must be a finite number > 0, got {value!r}. "
            f"Temperatures divide the logits, so use a positive value (the papers use 1 to 8)."
            if "tau" in name or "temperature" in name
            else f"{where}{name} must be a finite number > 0, got {value!r}."
        )
    return v


def check_non_negative(name: str, value: float, loss: str = "") -> float:
    """``value`` as a float if it is finite and >= 0 (loss weights), else a ValueError."""
    where = f"{loss}: " if loss else ""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"{where}{name} must be a finite number >= 0, got {value!r}. "
            f"A negative weight would maximize that term; use 0 to switch the term off."
        )
    return v


class LossInputs(NamedTuple):
    """Checked loss inputs, all float32 (``labels`` int64)."""

    student: torch.Tensor  # [B, C] float32, keeps its graph
    teacher: torch.Tensor  # [B, C] float32, detached
    target: torch.Tensor  # [B] int64 class indices, or [B, C] float32 soft targets
    labels: torch.Tensor  # [B] int64: the hard label, or the soft target's argmax
    soft: bool  # whether ``target`` is soft


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against class indices ``[B]`` or soft targets ``[B, C]``."""
    if target.dim() == logits.dim():
        return soft_cross_entropy(target, F.log_softmax(logits, dim=-1))
    return F.cross_entropy(logits, target)


def soft_cross_entropy(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_k -p_k log q_k``: soft cross-entropy, sum over classes, mean over the batch."""
    return -(p * log_q).sum(dim=-1).mean()


def kl_div(log_p: torch.Tensor, log_q: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` from log-probabilities; batch mean if ``reduce``.

    Same value as ``F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)``. Terms where
    ``p_k`` underflows to 0 contribute exactly 0 (no ``0 * inf`` NaN).
    """
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl.mean() if reduce else kl


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

    A 0-d tensor ``epoch`` (what ``compile_loss`` passes, already checked) gives a 0-d tensor, so a
    compiled loss computes the factor in its graph instead of specializing on each epoch's value.
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
    return min(check_epoch(epoch, loss) / warmup_epochs, 1.0)


def _value_stats(
    student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None
) -> list[float]:
    """``[sum(student), sum(teacher), min(labels), max(labels)]`` in one host transfer (one sync).

    A float32 sum is finite only if every element is (NaN and inf propagate, ``inf - inf`` is NaN),
    and one cheap reduction pass per tensor is all the check costs; a non-finite sum of finite
    values (an overflow past 3e38) is told apart by ``_all_finite``.
    """
    parts = [student.detach().sum(dtype=torch.float32)]
    if teacher is not None:
        parts.append(teacher.detach().sum(dtype=torch.float32))
    if labels is not None and labels.numel() > 0:
        parts += [labels.min().float(), labels.max().float()]
    return torch.stack(parts).tolist()


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no NaN/inf. min and max propagate NaN and expose inf, and are ~10x cheaper
    than ``isfinite(x).all()`` on a [256, 1000] tensor (one reduction pass, no bool tensor)."""
    if x.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all())


class DistillLoss(nn.Module):
    """Base of the registered losses: input checks and float32 math, nothing else.

    Subclasses implement ``forward(student_logits, teacher_logits, target, *, epoch=None)`` and
    start it with ``x = self.prepare(student_logits, teacher_logits, target)``, then compute in
    ``x.student`` / ``x.teacher`` inside ``with self.float32(x.student):``.
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
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        num_classes: int,
    ) -> None:
        """Label range and finite logits, from one host transfer (``_value_stats``)."""
        name = self.name
        stats = _value_stats(student_logits, teacher_logits, labels)
        if labels is not None and labels.numel() > 0:
            lo, hi = int(stats[-2]), int(stats[-1])
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name}: label {bad} is outside [0, {num_classes}) for logits with {num_classes} "
                    f"classes. Check that the dataset's classes match the model's num_classes (ignore-index "
                    f"labels such as -100 are not supported by distillation losses; drop those samples "
                    f"first)."
                )
        if not math.isfinite(stats[0]) and not _all_finite(student_logits):
            raise FloatingPointError(
                f"{name}: student_logits contain NaN or inf. The student has diverged or was fed bad "
                f"input: lower the learning rate, enable gradient clipping, or resume from the last "
                f"good checkpoint."
            )
        if teacher_logits is not None and not math.isfinite(stats[1]) and not _all_finite(teacher_logits):
            raise FloatingPointError(
                f"{name}: teacher_logits contain NaN or inf. Check the teacher's weights and input "
                f"normalization, or run the teacher in float32 instead of fp16."
            )

    def prepare(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
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
            labels = first_argmax(target)
        else:
            raise ValueError(
                f"{name}: target must be class indices [batch] or soft targets [batch, classes], "
                f"got shape {tuple(target.shape)}"
            )
        if self.check_inputs:
            self._check_values(student_logits, teacher_logits, labels if not soft else None, C)
        teacher = teacher_logits.detach().float() if teacher_logits is not None else None
        return LossInputs(student_logits.float(), teacher, target, labels, soft)
