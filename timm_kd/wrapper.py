"""DistillWrapper: a timm teacher and a timm student as one distillation step.

::

    wrapper = DistillWrapper("resnet18", "resnet50", loss="ats", tau_correct=4.0, tau_wrong=2.0)
    out = wrapper(images, target, epoch=epoch)      # {"loss", "output", "teacher_output", <terms>}
    out["loss"].backward()

One step computes::

    z_t = teacher(images)      frozen, eval, inference mode; inputs adapted (see timm_kd/teacher.py)
    z_s = student(images)
    loss_fn(z_s, z_t, target, epoch=epoch)

The teacher is a live network (a ``timm_kd.teacher.Teacher``, built from a name or module) or a
cache's ``timm_kd.cache.CachedTeacher``, whose logits are rebuilt from stored columns that ride in
the batch; those columns are passed by name and go to the teacher::

    wrapper = DistillWrapper(student, CachedTeacher(cache_dir), loss="ats")
    out = wrapper(images, target, epoch=epoch, **{k: batch[k] for k in wrapper.teacher_input_keys})

The teacher runs first, so its activations are freed before the student's are stored for the
backward pass: peak memory is the larger of the two, not their sum.

Where the teacher lives: ``wrapper.teacher`` is a plain attribute, *not* a registered submodule.
So ``wrapper.parameters()`` and ``wrapper.state_dict()`` hold only the student (and the loss's own
state, if any): an optimizer built from ``wrapper.parameters()`` can never touch the teacher,
``DistributedDataParallel(wrapper)`` would only see the student, ``wrapper.apply(init_fn)`` leaves
the teacher alone, and ``wrapper.train()`` cannot reach it (it stays in eval anyway). Device and
dtype moves (``wrapper.to(device)``, ``.cuda()``, ``.half()``) still reach it: ``_apply`` forwards
them. ``wrapper.state_dict()`` keys are prefixed ``student.``; ``wrapper.student_state_dict()``
returns the bare timm keys, with DDP and ``torch.compile`` wrappers removed.

It is a ``timm.task.TrainingTask``: ``trainable_module`` is the student, ``prepare_distributed``
wraps only the student in DDP, ``compile`` compiles student and teacher, ``get_eval_model`` is the
student without its DDP wrapper. With Accelerate, prepare the student only::

    wrapper.student = accelerator.prepare(wrapper.student)
    wrapper.to(accelerator.device)
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.task import TrainingTask
from torch.nn.parallel import DistributedDataParallel

from .cache import CachedTeacher
from .losses import create_loss
from .models import (
    class_mismatch_error,
    model_in_chans,
    model_num_classes,
    resolve_model,
    unwrap_model,
)
from .teacher import Teacher, create_teacher_model

__all__ = ["DistillWrapper"]

_logger = logging.getLogger(__name__)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(d, torch.dtype):
        raise ValueError(
            f"teacher_dtype={dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16', 'float32'"
        )
    return d


def _loss(loss: str | Any, loss_kwargs: dict[str, Any]) -> tuple[Any, str]:
    """``(loss_fn, name)`` from a registry name and its kwargs, or from a loss object (no kwargs)."""
    if isinstance(loss, str):
        try:
            return create_loss(loss, **loss_kwargs), loss
        except TypeError as e:
            raise TypeError(
                f"DistillWrapper passes its unknown keyword arguments {sorted(loss_kwargs)} to the "
                f"{loss!r} loss, which refused them: {e}. Check the spelling against the loss's "
                f"docstring (help(timm_kd.create_loss({loss!r})))."
            ) from None
    if loss_kwargs:
        raise TypeError(
            f"loss is already a loss object; keyword arguments {sorted(loss_kwargs)} would be "
            f"ignored. Configure the object itself, or pass the loss by name: loss='kd', tau=4.0."
        )
    if not callable(loss):
        raise TypeError(f"loss must be a registered loss name or a callable, got {type(loss).__name__}")
    return loss, getattr(loss, "name", type(loss).__name__)


def _size_of(data_config: dict[str, Any]) -> tuple[int, int] | None:
    size = data_config.get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None


def _cached_teacher(teacher: CachedTeacher, n_student: int, class_map: Any) -> CachedTeacher:
    """A cache's teacher, used as it is: its logits are already in the student's classes."""
    if class_map is not None:
        raise ValueError(
            "class_map does not apply to a CachedTeacher: the cache stores the teacher's logits already "
            "mapped to the student's classes (build the cache with --class-map instead)."
        )
    if teacher.num_classes != n_student:
        raise class_mismatch_error(teacher.name, teacher.num_classes, n_student)
    return teacher


class DistillWrapper(TrainingTask):
    """A frozen teacher, a trainable student and a distillation loss as one ``nn.Module``.

    Args:
        student: an ``nn.Module`` or a timm model name (``"resnet18"``, ``"hf-hub:org/repo"``,
            ``"local-dir:/path"``), created with ``student_pretrained``, ``num_classes``,
            ``student_checkpoint`` and ``student_kwargs``.
        teacher: an ``nn.Module``, a timm model name (created with ``teacher_pretrained``,
            ``teacher_checkpoint``, ``teacher_kwargs``; its classifier is never replaced), a
            ready ``timm_kd.teacher.Teacher``, or a ``timm_kd.cache.CachedTeacher`` (used as it is:
            the teacher options below do not apply, and it must predict the student's classes).
        loss: a registry name (``timm_kd.list_losses()``), created with ``**loss_kwargs``, or a loss
            object following the calling convention ``loss_fn(z_s, z_t, target, *, epoch=None) -> dict``.
        class_map: the teacher's class index for each student class, when the teacher's classes are
            a superset of the student's (an ImageNet-1k teacher on a 100-class subset).
        teacher_pretrained: load the teacher's pretrained weights (ignored with ``teacher_checkpoint``).
            A teacher without weights is created with the student's class count and warns.
        student_pretrained: start the student from pretrained weights (a new head for ``num_classes``).
        num_classes: the student's classes, when ``student`` is a name.
        teacher_checkpoint, student_checkpoint: a ``.safetensors`` weights file (or a torch file, read
            with ``weights_only=True``) loaded strictly into the named model; the class count comes
            from the checkpoint.
        adapt_normalization, adapt_resolution: re-normalize / resize the student's images for the
            teacher where its known input config differs from the batch (on by default; see
            ``timm_kd/teacher.py``).
        teacher_channels_last, compile_teacher, teacher_dtype: how the teacher runs (``compile_teacher``
            may be a dict of ``torch.compile`` kwargs; ``teacher_dtype`` a dtype or its name).
        data_config: how the images given to the wrapper are normalized (``mean``, ``std``...);
            defaults to the student's ``timm.data.resolve_data_config``. Build the input pipeline from
            ``wrapper.data_config``.
        teacher_data_config: the teacher's own ``mean``, ``std``, ``input_size``, ``interpolation``.
            Without it (or for keys it lacks) the teacher gets what its weights' config says where
            that is known (a pretrained tag, ``hf-hub:``, ``local-dir:``, a ``config.json`` beside
            ``teacher_checkpoint``), else the batch as it is: no resize, no re-normalization. A
            module not created by ``timm_kd.models.resolve_model`` has no known config. An active
            adapter warns once, saying what the teacher sees and what it costs.
        student_kwargs, teacher_kwargs: extra ``timm.create_model`` kwargs for named models.
        device: where to put the wrapper; defaults to the student's device.
        verbose: log what the adapters do (once each).
        **loss_kwargs: passed to ``create_loss(loss, ...)``.
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | Teacher | CachedTeacher,
        loss: str | Any = "ats",
        *,
        class_map: Any = None,
        teacher_pretrained: bool = True,
        student_pretrained: bool = False,
        num_classes: int | None = None,
        teacher_checkpoint: str | os.PathLike | None = None,
        student_checkpoint: str | os.PathLike | None = None,
        adapt_normalization: bool = True,
        adapt_resolution: bool = True,
        teacher_channels_last: bool = False,
        compile_teacher: bool | dict[str, Any] = False,
        teacher_dtype: torch.dtype | str | None = None,
        data_config: dict[str, Any] | None = None,
        teacher_data_config: dict[str, Any] | None = None,
        student_kwargs: dict[str, Any] | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        verbose: bool = True,
        **loss_kwargs: Any,
    ):
        loss_fn, loss_name = _loss(loss, loss_kwargs)  # first: a typo must fail before any download
        # -- the student
        student_kwargs = dict(student_kwargs or {})
        if "num_classes" in student_kwargs:
            if num_classes is not None and num_classes != student_kwargs["num_classes"]:
                raise ValueError("num_classes and student_kwargs['num_classes'] disagree: give it once.")
            num_classes = student_kwargs.pop("num_classes")
        student_model = resolve_model(
            student,
            pretrained=student_pretrained,
            checkpoint=student_checkpoint,
            num_classes=num_classes,
            replace_head=True,
            role="student",
            **student_kwargs,
        )
        if device is None:
            p = next(student_model.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        super().__init__(device=torch.device(device), verbose=verbose)
        n_student = model_num_classes(student_model)
        if n_student == 0:
            raise ValueError(
                "the student has no classifier (num_classes=0); create it with the number of classes."
            )
        if data_config is None:
            data_config = resolve_data_config(model=unwrap_model(student_model))
        self.data_config: dict[str, Any] = dict(data_config)

        # -- the teacher
        if isinstance(teacher, CachedTeacher):
            frozen = _cached_teacher(teacher, n_student, class_map)
        elif isinstance(teacher, Teacher):
            frozen = teacher
        else:
            teacher_model = create_teacher_model(
                teacher,
                student_classes=n_student,
                student_chans=model_in_chans(student_model),
                class_map=class_map,
                pretrained=teacher_pretrained,
                checkpoint=teacher_checkpoint,
                **(teacher_kwargs or {}),
            )
            if teacher_model is student_model:
                raise ValueError("teacher and student are the same module: pass two different models.")
            frozen = Teacher(
                teacher_model,
                input_mean=self.data_config.get("mean"),
                input_std=self.data_config.get("std"),
                num_classes=n_student,
                in_chans=model_in_chans(student_model),
                class_map=class_map,
                data_config=teacher_data_config,
                adapt_normalization=adapt_normalization,
                adapt_resolution=adapt_resolution,
                channels_last=teacher_channels_last,
                compile=compile_teacher,
                dtype=_as_dtype(teacher_dtype),
                name=teacher if isinstance(teacher, str) else None,
                verbose=verbose,
            )
        self.student = student_model
        self.teacher = frozen  # a plain attribute: see the module docstring
        self.teacher.to(self.device)
        self.loss_fn = loss_fn
        self.loss_name = loss_name
        if isinstance(loss_fn, nn.Module):
            loss_fn.to(self.device)

        self.loss_kwargs = dict(loss_kwargs)
        self.trained_input_size: tuple[int, int] | None = None  # (H, W) of the last training batch
        self.student_name = student if isinstance(student, str) else None
        self.teacher_name = teacher if isinstance(teacher, str) else None

    # ---------------------------------------------------------------------------------------------
    # module plumbing

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":
            if not isinstance(value, (Teacher, CachedTeacher)):
                raise TypeError(
                    f"wrapper.teacher must be a timm_kd.teacher.Teacher or a timm_kd.cache.CachedTeacher, "
                    f"got {type(value).__name__}; build a new DistillWrapper to change the teacher network."
                )
            # kept out of _modules: not in parameters(), state_dict(), modules()
            object.__setattr__(self, "teacher", value)
            return
        if name == "trainable_module":  # timm's TrainingTask name for the student
            name = "student"
        super().__setattr__(name, value)

    @property
    def trainable_module(self) -> nn.Module:
        """The student (timm's ``TrainingTask`` name for it); possibly DDP- or compile-wrapped."""
        return self.student

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        teacher = self.__dict__.get("teacher")
        if teacher is not None:
            teacher._apply(fn, *args, **kwargs)
        return out

    def train(self, mode: bool = True) -> DistillWrapper:
        super().train(mode)
        self.teacher.eval()
        return self

    def extra_repr(self) -> str:
        teacher = f"{type(self.teacher).__name__}({self.teacher.extra_repr()})"
        head = f"teacher={teacher} (frozen, not a submodule), loss={self.loss_name!r}"
        describe = getattr(self.teacher, "describe_input", None)
        if describe is None:  # a cache's teacher: its logits were computed when the cache was built
            return head
        size = self.trained_input_size or _size_of(self.data_config)
        return f"{describe(size)}\n{head}"

    # ---------------------------------------------------------------------------------------------
    # timm TrainingTask interface

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> DistillWrapper:
        """Wrap the student (only) in ``DistributedDataParallel``; the frozen teacher stays as it is."""
        if isinstance(self.student, DistributedDataParallel):
            return self
        p = next(self.student.parameters(), None)
        if p is not None and p.device.type == "cpu":
            device_ids = None  # DDP requires device_ids=None for CPU modules
        self.student = DistributedDataParallel(self.student, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
        """``torch.compile`` the student and the teacher network (a cached teacher has none); returns the
        eval model (the student)."""
        self.student = torch.compile(self.student, backend=backend, mode=mode, **compile_kwargs)
        if isinstance(self.teacher, Teacher):
            self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.get_eval_model()

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The student for validation and checkpoints: without DDP, compiled if it was compiled."""
        if module is None and not ema:
            return unwrap_model(self.student, compiled=False)
        return super().get_eval_model(module=module, ema=ema)

    # ---------------------------------------------------------------------------------------------
    # the step

    @property
    def teacher_input_keys(self) -> tuple[str, ...]:
        """The batch columns the teacher reads besides the images: ``()`` for a live teacher,
        ``CachedTeacher.input_keys`` (the cache's ``teacher_*`` columns) for a cached one."""
        return tuple(getattr(self.teacher, "input_keys", ()))

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        epoch: float | None = None,
        **teacher_inputs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "output" (student logits), "teacher_output" (student classes), <loss terms>}``.

        ``teacher_inputs`` (a cached teacher's batch columns, ``teacher_input_keys``) go to the teacher;
        a live teacher takes none.
        """
        if teacher_inputs and not self.teacher_input_keys:
            raise TypeError(
                f"a live teacher takes only the images; got teacher inputs {sorted(teacher_inputs)} (they "
                f"belong to a cached run: DistillWrapper(student, CachedTeacher(cache), ...))."
            )
        if self.training and tuple(images.shape[-2:]) != self.trained_input_size:
            self.trained_input_size = tuple(images.shape[-2:])  # what save_pretrained publishes
        # the teacher first: its activations are gone before the student's pile up
        teacher_output = self.teacher(images, **teacher_inputs)
        output = self.student(images)
        terms = self.loss_fn(output, teacher_output, target, epoch=epoch)
        if not isinstance(terms, dict) or "loss" not in terms:
            raise TypeError(
                f"loss {self.loss_name!r} must return a dict with a 'loss' entry (timm-kd calling "
                f"convention), "
                f"got {type(terms).__name__}"
            )
        if "output" in terms or "teacher_output" in terms:
            raise KeyError(
                f"loss {self.loss_name!r} returns a term named 'output' or 'teacher_output'; rename it."
            )
        result = dict(terms)
        result["output"] = output
        result["teacher_output"] = teacher_output
        return result

    def teacher_logits(self, images: torch.Tensor, **teacher_inputs: torch.Tensor) -> torch.Tensor:
        """The teacher alone on the student's ``images``: adapters applied, student's classes (a cached
        teacher: rebuilt from ``teacher_inputs``)."""
        return self.teacher(images, **teacher_inputs)

    @property
    def student_data_config(self) -> dict[str, Any]:
        """The preprocessing the student was trained with, for its published ``config.json``.

        ``data_config`` (how the wrapper's images are normalized), with ``input_size`` the spatial
        size of the training batches this wrapper has seen (the last one), where it saw any.
        ``timm_kd.save_pretrained(wrapper, ...)`` publishes it unless given ``data_config=``.
        """
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        cfg = {k: self.data_config[k] for k in keys if self.data_config.get(k) is not None}
        if self.trained_input_size is not None:
            chans = model_in_chans(self.student) or int(cfg.get("input_size", (3,))[0])
            cfg["input_size"] = (chans, *self.trained_input_size)
        return cfg

    def student_state_dict(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """The student's weights with plain timm keys (no ``student.``, ``module.`` or ``_orig_mod.``).

        Loads into ``timm.create_model(student_name, num_classes=...)`` without timm-kd. With
        ``ema=True``, the EMA copy made by ``setup_ema()``.
        """
        if ema:
            module = self.get_trainable_module(ema=True)
            if module is None:
                raise RuntimeError(
                    "student_state_dict(ema=True) needs an EMA: call wrapper.setup_ema() first."
                )
        else:
            module = self.student
        return unwrap_model(module).state_dict()
