"""DistillWrapper: a timm teacher and a timm student as one distillation step.

::

    wrapper = DistillWrapper("resnet18", "resnet50", loss="ats", tau_correct=4.0, tau_wrong=2.0)
    out = wrapper(images, target, epoch=epoch)      # {"loss", "output", "teacher_output", <terms>}
    out["loss"].backward()

One step computes::

    z_t = teacher(images)      frozen, eval, inference mode; inputs adapted (see timm_kd/teacher.py)
    z_s = student(images)
    loss_fn(z_s, z_t, target, epoch=epoch)

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
from timm.task import TrainingTask

from .losses import create_loss
from .models import (
    channel_mismatch_error,
    class_mismatch_error,
    model_in_chans,
    model_num_classes,
    resolve_model,
    unwrap_model,
)
from .teacher import Teacher

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


def _precheck_named_teacher(
    name: str, pretrained: bool, kwargs: dict[str, Any], n_student: int | None, student: nn.Module
) -> None:
    """Refuse a class or channel mismatch from the registry's metadata, before any download."""
    from timm.models import get_pretrained_cfg, parse_model_name

    source, _ = parse_model_name(name)
    if source is not None:
        return  # hf-hub:/local-dir: configs are read by timm.create_model itself
    s_chans = model_in_chans(student)
    t_chans = kwargs.get("in_chans", 3)
    if s_chans is not None and s_chans != t_chans:
        raise channel_mismatch_error(name, t_chans, s_chans)
    if not pretrained or n_student is None:
        return
    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # unknown names are reported by timm.create_model, with its suggestions
        return
    t_classes = kwargs.get("num_classes", getattr(cfg, "num_classes", None))
    if t_classes and t_classes != n_student:
        raise class_mismatch_error(name, t_classes, n_student)


class DistillWrapper(TrainingTask):
    """A frozen teacher, a trainable student and a distillation loss as one ``nn.Module``.

    Args:
        student: an ``nn.Module`` or a timm model name (``"resnet18"``, ``"hf-hub:org/repo"``,
            ``"local-dir:/path"``), created with ``student_pretrained``, ``num_classes``,
            ``student_checkpoint`` and ``student_kwargs``.
        teacher: an ``nn.Module``, a timm model name (created with ``teacher_pretrained``,
            ``teacher_checkpoint``, ``teacher_kwargs``; its classifier is never replaced), or a
            ready ``timm_kd.teacher.Teacher``.
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
            teacher when their configs differ (on by default; see ``timm_kd/teacher.py``).
        teacher_channels_last, compile_teacher, teacher_dtype: how the teacher runs (``compile_teacher``
            may be a dict of ``torch.compile`` kwargs; ``teacher_dtype`` a dtype or its name).
        data_config: how the images given to the wrapper are normalized (``mean``, ``std``...);
            defaults to the student's ``timm.data.resolve_data_config``. Build the input pipeline from
            ``wrapper.data_config``.
        teacher_data_config: the teacher's own ``mean``, ``std``, ``input_size``, ``interpolation``,
            when its ``pretrained_cfg`` is missing or wrong.
        student_kwargs, teacher_kwargs: extra ``timm.create_model`` kwargs for named models.
        device: where to put the wrapper; defaults to the student's device.
        verbose: log what the adapters do (once each).
        **loss_kwargs: passed to ``create_loss(loss, ...)``.
    """

    def __init__(
        self,
        student: str | nn.Module,
        teacher: str | nn.Module | Teacher,
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
        # -- the loss first: a typo in its arguments must fail before any model is downloaded
        if isinstance(loss, str):
            try:
                loss_fn = create_loss(loss, **loss_kwargs)
            except TypeError as e:
                raise TypeError(
                    f"DistillWrapper passes its unknown keyword arguments {sorted(loss_kwargs)} to the "
                    f"{loss!r} loss, which refused them: {e}. Check the spelling against the loss's "
                    f"docstring (help(timm_kd.create_loss({loss!r})))."
                ) from None
            loss_name = loss
        else:
            if loss_kwargs:
                raise TypeError(
                    f"loss is already a loss object; keyword arguments {sorted(loss_kwargs)} would be "
                    f"ignored. Configure the object itself, or pass the loss by name: loss='kd', tau=4.0."
                )
            if not callable(loss):
                raise TypeError(
                    f"loss must be a registered loss name or a callable, got {type(loss).__name__}"
                )
            loss_fn = loss
            loss_name = getattr(loss, "name", type(loss).__name__)

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
            from timm.data import resolve_data_config

            data_config = resolve_data_config(model=unwrap_model(student_model))
        self.data_config: dict[str, Any] = dict(data_config)

        # -- the teacher
        if isinstance(teacher, Teacher):
            frozen = teacher
        else:
            t_kwargs = dict(teacher_kwargs or {})
            t_classes = t_kwargs.pop("num_classes", None)
            if t_classes is not None and teacher_pretrained and teacher_checkpoint is None:
                raise ValueError(
                    f"teacher_kwargs num_classes={t_classes} would replace the pretrained teacher's "
                    f"classifier with a random one. Drop it, and map a superset of classes with "
                    f"class_map=..., or load a teacher fine-tuned on your classes with teacher_checkpoint=..."
                )
            random_teacher = (
                isinstance(teacher, str) and not teacher_pretrained and teacher_checkpoint is None
            )
            if random_teacher:
                _logger.warning(
                    "teacher %r has random weights (teacher_pretrained=False and no teacher_checkpoint): "
                    "fine for tests and benchmarks, useless for distillation",
                    teacher,
                )
                if class_map is None and t_classes is None:
                    t_classes = n_student  # no trained classifier to keep: match the student
            if isinstance(teacher, str) and teacher_checkpoint is None and class_map is None:
                _precheck_named_teacher(teacher, teacher_pretrained, t_kwargs, n_student, student_model)
            teacher_model = resolve_model(
                teacher,
                pretrained=teacher_pretrained,
                checkpoint=teacher_checkpoint,
                num_classes=t_classes,
                role="teacher",
                **t_kwargs,
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
        self.student_name = student if isinstance(student, str) else None
        self.teacher_name = teacher if isinstance(teacher, str) else None

    # ---------------------------------------------------------------------------------------------
    # module plumbing

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "teacher":
            if not isinstance(value, Teacher):
                raise TypeError(
                    f"wrapper.teacher must be a timm_kd.teacher.Teacher, got {type(value).__name__}; build a "
                    f"new DistillWrapper to change the teacher network."
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
        return (
            f"teacher=Teacher({self.teacher.extra_repr()}) (frozen, not a submodule), loss={self.loss_name!r}"
        )

    # ---------------------------------------------------------------------------------------------
    # timm TrainingTask interface

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> DistillWrapper:
        """Wrap the student (only) in ``DistributedDataParallel``; the frozen teacher stays as it is."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(self.student, DistributedDataParallel):
            return self
        p = next(self.student.parameters(), None)
        if p is not None and p.device.type == "cpu":
            device_ids = None  # DDP requires device_ids=None for CPU modules
        self.student = DistributedDataParallel(self.student, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
        """``torch.compile`` the student and the teacher network; returns the eval model (the student)."""
        self.student = torch.compile(self.student, backend=backend, mode=mode, **compile_kwargs)
        self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)
        return self.get_eval_model()

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        """The student for validation and checkpoints: without DDP, compiled if it was compiled."""
        if module is None and not ema:
            return unwrap_model(self.student, compiled=False)
        return super().get_eval_model(module=module, ema=ema)

    # ---------------------------------------------------------------------------------------------
    # the step

    def forward(
        self, images: torch.Tensor, target: torch.Tensor, epoch: float | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "output" (student logits), "teacher_output" (student classes), <loss terms>}``."""
        teacher_output = self.teacher(images)  # first: its activations are gone before the student's pile up
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

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher alone on the student's ``images``: adapters applied, student's classes."""
        return self.teacher(images)

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
