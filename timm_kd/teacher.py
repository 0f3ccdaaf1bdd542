"""The frozen teacher: freezing, input adapters and the label map.

``Teacher`` wraps any timm model (or any ``nn.Module`` returning logits) so that it can be called
on the *student's* batch and return logits for the *student's* classes::

    images (normalized for the student, any size)
        -> [resize]       to the teacher's input size, in pixel space, as PIL does
        -> [normalize]    from the student's mean/std to the teacher's
        -> teacher model  (eval, frozen, torch.inference_mode, optional dtype / channels_last / compile)
        -> [class map]    teacher logits[:, class_map]  (one teacher class per student class)

The teacher sees the batch as it is unless something *known* says otherwise. What it expects
comes, in order, from: an explicit ``data_config`` (``DistillWrapper(teacher_data_config=...)``,
``--teacher-input-size/--teacher-mean/--teacher-std/--teacher-interpolation``); the weights' own
config, recorded by ``timm_kd.models.resolve_model`` (a pretrained tag, ``hf-hub:``, ``local-dir:``,
a ``config.json`` beside a checkpoint file); a strict fixed input size of the architecture. An
architecture's default ``pretrained_cfg`` says nothing about the weights a module holds, so a
module ``resolve_model`` did not create, or random or checkpoint weights without a config, get no
adapter. An active adapter says what the teacher sees and what it costs in one ``UserWarning`` per
batch size (``describe_input`` gives the same sentence for run headers).

Resize (``adapt_resolution``). With ``x`` the student's input, ``m_s, s_s`` its mean/std and
``m_t, s_t`` the teacher's::

    p  = x * s_s + m_s                                  back to pixel values in [0, 1]
    p' = clamp(resize_h(clamp(resize_w(p), 0, 1)), 0, 1) separable, width first, antialiased
    x' = (p' - m_t) / s_t

``PIL.Image.resize`` (which timm's eval transform calls) resamples width then height, with
antialiasing when shrinking, and stores each pass in uint8, so it clamps to the pixel range after
each pass; ``torch.nn.functional.interpolate(antialias=True)`` uses PIL's kernels (bicubic with
a = -0.5). The same two clamped passes give, on an image already at the student's resolution, the
tensor timm's own transform gives the teacher up to PIL's uint8 rounding (at most ~1.1/255 per
pixel; tested). What no adapter can remove, and is deliberate:

* the adapter resamples the student's already resampled view, not the original image;
* detail lost at a lower student resolution cannot come back for a higher-resolution teacher;
* the teacher is shown the student's *view* (the same crop), not the center crop its own eval
  transform would cut: in distillation the teacher must judge the very crop the student sees.

Values outside [0, 1] (bicubic overshoot, random-erasing noise) are clamped on the resize path,
as a PIL image would; the normalization-only path is a pure affine map and clamps nothing.

Normalize (``adapt_normalization``): ``x' = x * (s_s / s_t) + (m_s - m_t) / s_t``, exact.

Label map (``class_map``): for a teacher whose classes are a superset of the student's (an
ImageNet-1k teacher on a 100-class subset), ``class_map[i]`` is the teacher's index of student
class ``i``. The teacher's logits are restricted to those columns, so its softmax is renormalized
over the student's classes.

The teacher is frozen (``requires_grad=False``), stays in eval mode whatever ``train()`` is called
with, and runs under ``torch.inference_mode()``; its logits are cloned out of inference mode, so
losses can save them for the student's backward pass.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import timm.data
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import get_pretrained_cfg, parse_model_name

from .models import (
    INPUT_KEYS,
    channel_mismatch_error,
    class_mismatch_error,
    model_in_chans,
    model_num_classes,
    resolve_model,
    unwrap_model,
    weights_source,
)

__all__ = [
    "Teacher",
    "create_teacher_model",
    "resolve_model",
    "model_num_classes",
    "model_in_chans",
    "resize_like_pil",
    "class_mismatch_error",
    "channel_mismatch_error",
]

_logger = logging.getLogger(__name__)

# timm interpolation names -> F.interpolate modes. PIL's 'nearest' samples like 'nearest-exact'.
_INTERP_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


# --------------------------------------------------------------------------------------------------
# the teacher network


def create_teacher_model(
    teacher: str | nn.Module,
    *,
    student_classes: int | None,
    student_chans: int | None = None,
    class_map: Any = None,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The teacher network for a student of ``student_classes`` classes and ``student_chans`` channels.

    ``teacher`` is an ``nn.Module`` (returned as it is) or a timm name, created by ``resolve_model``
    with ``pretrained``, ``checkpoint`` and ``kwargs``. A teacher's classifier is what it teaches, so
    it is never replaced: ``num_classes`` in ``kwargs`` is refused for a pretrained teacher. A named
    teacher without weights (no ``pretrained``, no ``checkpoint``) warns, and gets the student's class
    count unless ``class_map`` or ``kwargs`` say otherwise. For a registry name without a checkpoint
    or class map, a class or channel mismatch is refused from timm's metadata, before any download.
    """
    kwargs = dict(kwargs)
    t_classes = kwargs.pop("num_classes", None)
    if t_classes is not None and pretrained and checkpoint is None:
        raise ValueError(
            f"teacher_kwargs num_classes={t_classes} would replace the pretrained teacher's "
            f"classifier with a random one. Drop it, and map a superset of classes with "
            f"class_map=..., or load a teacher fine-tuned on your classes with teacher_checkpoint=..."
        )
    if isinstance(teacher, str) and not pretrained and checkpoint is None:
        _logger.warning(
            "teacher %r has random weights (teacher_pretrained=False and no teacher_checkpoint): "
            "fine for tests and benchmarks, useless for distillation",
            teacher,
        )
        if class_map is None and t_classes is None:
            t_classes = student_classes  # no trained classifier to keep: match the student
    if isinstance(teacher, str) and checkpoint is None and class_map is None:
        _precheck_named_teacher(teacher, pretrained, kwargs, student_classes, student_chans)
    return resolve_model(
        teacher, pretrained=pretrained, checkpoint=checkpoint, num_classes=t_classes, role="teacher", **kwargs
    )


def _precheck_named_teacher(
    name: str, pretrained: bool, kwargs: dict[str, Any], n_student: int | None, s_chans: int | None
) -> None:
    """Refuse a class or channel mismatch from the registry's metadata, before any download."""
    source, _ = parse_model_name(name)
    if source is not None:
        return  # hf-hub:/local-dir: configs are read by timm.create_model itself
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


# --------------------------------------------------------------------------------------------------
# adapters


def resize_like_pil(
    pixels: torch.Tensor, size: Sequence[int], interpolation: str = "bicubic"
) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` pixel-space images (values in [0, 1]) as ``PIL.Image.resize`` does.

    Separable: width first, then height; antialiased when shrinking (PIL's filter support scales
    with the reduction); clamped to [0, 1] after each pass, as PIL's uint8 storage does. Only the
    uint8 rounding is not reproduced. Runs in float32.
    """
    mode = _INTERP_MODES.get(interpolation, "bicubic")
    kw: dict[str, Any] = {"mode": mode}
    if mode in ("bilinear", "bicubic"):
        kw.update(antialias=True, align_corners=False)
    x = pixels.float()
    h, w = x.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if out_w != w:
        x = F.interpolate(x, size=(h, out_w), **kw).clamp_(0.0, 1.0)
    if out_h != h:
        x = F.interpolate(x, size=(out_h, out_w), **kw).clamp_(0.0, 1.0)
    return x


def _fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model insists on (a ViT with strict patch embedding), else None."""
    model = unwrap_model(model)
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", False):
        return None
    size = getattr(pe, "img_size", None)
    return (int(size[0]), int(size[1])) if size is not None else None


def _channels(values: Sequence[float], n: int | None, what: str) -> tuple[float, ...]:
    v = tuple(float(x) for x in (values if isinstance(values, (list, tuple)) else [values]))
    if n is not None and len(v) == 1 and n != 1:
        v = v * n
    if n is not None and len(v) != n:
        where = "teacher_data_config" if what.startswith("teacher") else "data_config"
        raise ValueError(
            f"{what} has {len(v)} values for {n} input channels: pass DistillWrapper({where}={{'mean': ..., "
            f"'std': ...}}) with one value per channel (timm's pretrained_cfg keeps 3 for in_chans != 3)."
        )
    return v


def _as_class_map(class_map: Any, num_student: int | None, num_teacher: int | None) -> torch.Tensor:
    try:
        idx = torch.as_tensor(class_map)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"class_map must be a list/tuple/array/tensor of teacher class indices, one per student class; "
            f"got {type(class_map).__name__}"
        ) from None
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(
            f"class_map must be a non-empty 1-d sequence of integer teacher class indices (one per student "
            f"class), got shape {tuple(idx.shape)} dtype {idx.dtype}"
        )
    idx = idx.long().cpu()
    if num_student is not None and idx.numel() != num_student:
        raise ValueError(
            f"class_map has {idx.numel()} entries but the student predicts {num_student} classes: give the "
            f"teacher's class index for each student class, in the student's class order."
        )
    if num_teacher is not None and (int(idx.min()) < 0 or int(idx.max()) >= num_teacher):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ValueError(f"class_map holds teacher class {bad}, outside [0, {num_teacher}) for this teacher.")
    uniq, counts = torch.unique(idx, return_counts=True)
    if (counts > 1).any():
        k = int(uniq[counts > 1][0])
        dup = (idx == k).nonzero().flatten().tolist()
        raise ValueError(
            f"class_map maps student classes {dup} to the same teacher class {k}; each student class needs "
            f"its own teacher class."
        )
    return idx


class Teacher(nn.Module):
    """A frozen, always-eval teacher called on the student's batch, returning student-class logits.

    Args:
        model: the teacher network (a timm model, or any module returning ``[B, C]`` logits).
        input_mean, input_std: normalization of the images it will be called on (the student's data
            config); None means the teacher's own (no re-normalization).
        num_classes: classes the returned logits must have (the student's); checked at construction.
        in_chans: channels of the images it will be called on (the student's); checked at construction.
        class_map: teacher class index for each student class, when the teacher's classes are a superset.
        data_config: the teacher's own ``mean``, ``std``, ``input_size``, ``interpolation``, where known
            better than its weights' recorded config (its keys win); keys known nowhere are taken
            to be the batch's (see the module docstring).
        adapt_normalization, adapt_resolution: switch the adapters off (they act only where needed).
        channels_last: run the teacher in channels-last memory format.
        compile: ``torch.compile`` the teacher (True, or a dict of ``torch.compile`` kwargs).
        dtype: keep the teacher's weights in this dtype and run it in it, autocast off (e.g.
            ``torch.bfloat16`` halves its memory; ``torch.float32`` keeps it exact under a bf16
            autocast). None follows the caller's autocast. Logits come back as float32.
        name: for messages.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        class_map: Any = None,
        data_config: dict[str, Any] | None = None,
        adapt_normalization: bool = True,
        adapt_resolution: bool = True,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        verbose: bool = True,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(model).__name__}")
        self.name = name or type(unwrap_model(model)).__name__
        self.verbose = verbose
        self._logged: set[Any] = set()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.training = False

        # -- input channels
        t_chans = model_in_chans(model)
        self.in_chans = t_chans
        if in_chans is not None and t_chans is not None and in_chans != t_chans:
            raise channel_mismatch_error(self.name, t_chans, in_chans)

        self._set_classes(num_classes, class_map)
        self._set_input_format(
            data_config, input_mean, input_std, t_chans or in_chans, adapt_normalization, adapt_resolution
        )
        self._consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

        # -- execution
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        if dtype is not None:
            self.model.to(dtype=dtype)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._compiled: nn.Module | None = None
        if compile:
            self.compile(**(compile if isinstance(compile, dict) else {}))

    # ---------------------------------------------------------------------------------------------
    def _set_classes(self, num_classes: int | None, class_map: Any) -> None:
        """``class_map`` checked against both class counts, or the counts checked against each other."""
        t_classes = model_num_classes(self.model)
        self.teacher_num_classes = t_classes
        self.class_map: torch.Tensor | None = None
        if class_map is not None:
            self.class_map = _as_class_map(class_map, num_classes, t_classes)
            self._info(
                "class_map",
                "teacher %r: its %s classes mapped to the student's %d with class_map",
                self.name,
                t_classes if t_classes is not None else "?",
                self.class_map.numel(),
            )
        elif num_classes is not None and t_classes is not None and num_classes != t_classes:
            raise class_mismatch_error(self.name, t_classes, num_classes)
        self.num_classes = (
            self.class_map.numel() if self.class_map is not None else (t_classes or num_classes)
        )

    def _set_input_format(
        self,
        data_config: dict[str, Any] | None,
        input_mean: Sequence[float] | None,
        input_std: Sequence[float] | None,
        n: int | None,
        adapt_normalization: bool,
        adapt_resolution: bool,
    ) -> None:
        """The teacher's expected input, from what is known only, and which adapters it switches on.

        Known, in order: ``data_config`` (explicit; its keys win), then the weights' own config
        recorded by ``resolve_model`` (a pretrained tag, ``hf-hub:``, ``local-dir:``, a
        ``config.json`` beside a checkpoint), then a strict fixed input size of the architecture.
        Anything not known is taken to be the batch's: no resize, no re-normalization.
        """
        source = weights_source(self.model)
        known = dict(source.data_config) if source is not None else {}
        origins = {k: source.origin for k in known} if source is not None else {}
        for k in INPUT_KEYS:
            if data_config and data_config.get(k) is not None:
                known[k], origins[k] = data_config[k], "teacher_data_config"
        self.data_config = known
        default_mean, default_std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
        self.input_mean = _channels(
            input_mean if input_mean is not None else known.get("mean", default_mean), n, "the inputs' mean"
        )
        self.input_std = _channels(
            input_std if input_std is not None else known.get("std", default_std), n, "the inputs' std"
        )
        self.mean = _channels(known["mean"], n, "teacher's mean") if "mean" in known else self.input_mean
        self.std = _channels(known["std"], n, "teacher's std") if "std" in known else self.input_std
        if any(s <= 0 for s in self.std + self.input_std):
            raise ValueError(f"normalization std must be > 0, got teacher {self.std}, input {self.input_std}")
        fixed = _fixed_input_size(self.model)
        cfg_size = known.get("input_size")
        if fixed is not None and origins.get("input_size") != "teacher_data_config":
            origins["input_size"] = "the architecture's fixed input size"
        self.input_size: tuple[int, int] | None = (
            fixed if fixed is not None else (_size2(cfg_size) if cfg_size else None)
        )
        interp = str(known.get("interpolation", "bicubic"))
        self.interpolation = interp if interp in _INTERP_MODES else "bicubic"
        if adapt_resolution and interp not in _INTERP_MODES:
            self._info("interp", "teacher %r: interpolation %r resized as 'bicubic'", self.name, interp)
        self.input_origins = origins

        self.adapt_resolution = bool(adapt_resolution) and self.input_size is not None
        same = all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(self.mean, self.input_mean)
        ) and all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(self.std, self.input_std))
        self.adapt_normalization = bool(adapt_normalization)
        self.renormalize = self.adapt_normalization and not same
        if not same and not self.renormalize:
            msg = "teacher %r expects mean=%s std=%s, inputs use mean=%s std=%s, adapt_normalization=False"
            args = (self.name, _fmt(self.mean), _fmt(self.std), _fmt(self.input_mean), _fmt(self.input_std))
            _logger.warning(msg, *args)
        if source is None and not data_config and fixed is None:
            self._info(
                "provenance",
                "teacher %r: a module of unknown provenance (not created by timm_kd.models.resolve_model): "
                "it sees the batch as it is. If its weights expect another size or normalization, pass "
                "teacher_data_config={'input_size': ..., 'mean': ..., 'std': ...}.",
                self.name,
            )

    def adapters_active(self, size: Sequence[int] | None) -> bool:
        """Whether an adapter changes a batch of spatial ``size`` (None: the size is not known)."""
        resize = self.adapt_resolution and size is not None and _size2(size) != self.input_size
        return bool(resize or self.renormalize)

    def describe_input(self, size: Sequence[int] | None = None) -> str:
        """What the teacher sees of a batch of spatial ``size`` (``(H, W)``), where that comes from,
        and what it costs: the run header's and the adapter warning's sentence."""
        size = _size2(size) if size is not None else None
        parts, why = [], set()
        resize = self.adapt_resolution and self.input_size is not None and size != self.input_size
        if resize:
            h, w = self.input_size
            frm = f", resized from {size[0]} x {size[1]} ({self.interpolation})" if size else " (resized)"
            parts.append(f"{h} x {w}{frm}")
            why.add(self.input_origins.get("input_size", "?"))
        elif size is not None:
            parts.append(f"{size[0]} x {size[1]} as given")
        else:
            parts.append("the batch's size as given")
        if self.renormalize:
            parts.append(
                f"re-normalized to mean {_fmt(self.mean)} std {_fmt(self.std)} "
                f"from mean {_fmt(self.input_mean)} std {_fmt(self.input_std)}"
            )
            why.update(self.input_origins.get(k, "?") for k in ("mean", "std") if k in self.input_origins)
        else:
            parts.append("not re-normalized")
        text = f"teacher {self.name!r} sees " + ", ".join(parts)
        if not (resize or self.renormalize):
            return text
        text += f" (as {' and '.join(sorted(why))} says)"
        if resize and size is not None:
            ratio = self.input_size[0] * self.input_size[1] / (size[0] * size[1])
            text += f"; its forward pass gets {ratio:.3g}x the student's pixels per image"
        return text

    def _warn_adapters(self, size: tuple[int, int]) -> None:
        """One WARNING per batch size, while an adapter is active (visible without logging set up)."""
        key = ("adapters", size)
        if key in self._logged:
            return
        self._logged.add(key)
        if not self.verbose:
            return
        if self.input_origins.get("input_size") == "the architecture's fixed input size":
            fix = (
                f"The network accepts only {self.input_size[0]} x {self.input_size[1]} images (create it "
                f"with dynamic_img_size=True to feed it the batch's size)."
            )
        else:
            fix = (
                "If the teacher was trained on images like these, show it the batch as it is: "
                f"teacher_data_config={{'input_size': (3, {size[0]}, {size[1]}), 'mean': "
                f"{self.input_mean}, 'std': {self.input_std}}} (flags --teacher-input-size {size[0]} "
                "--teacher-mean ... --teacher-std ...), or adapt_resolution=False / "
                "adapt_normalization=False."
            )
        warnings.warn(f"{self.describe_input(size)}. {fix}", UserWarning, stacklevel=4)

    def _info(self, key: Any, msg: str, *args: Any) -> None:
        """Log ``msg`` once per teacher and ``key``."""
        if key in self._logged:
            return
        self._logged.add(key)
        if self.verbose:
            _logger.info(msg, *args)

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever is asked (BatchNorm statistics never move)."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.dtype is not None:  # a wrapper-wide .half()/.float() keeps the teacher's chosen dtype
            self.model.to(dtype=self.dtype)
        return out

    def compile(self, **compile_kwargs: Any) -> Teacher:  # type: ignore[override]
        """``torch.compile`` the teacher network (the adapters, a few element-wise ops, stay eager).

        Where ``torch.compile`` does not work (no C++ compiler for inductor on CPU, a Python version
        or platform dynamo does not support, a backend error on the first batch), the teacher warns
        once, naming the error, and runs eager: compiling is an optimization, never a requirement.
        """
        try:
            compiled = torch.compile(self.model, **compile_kwargs)
        except Exception as e:  # e.g. "Dynamo is not supported on Python 3.x", an unknown backend
            self._compile_failed(e)
            return self
        object.__setattr__(self, "_compiled", compiled)  # shares self.model's weights; not a submodule
        return self

    def _compile_failed(self, error: BaseException) -> None:
        object.__setattr__(self, "_compiled", None)
        first = (str(error).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"torch.compile of teacher {self.name!r} failed ({type(error).__name__}: {first}); the teacher "
            f"runs eager. To compile it, install a C++ compiler (inductor needs one on CPU) and a torch "
            f"build that supports this platform, or pass compile_teacher={{'backend': 'aot_eager'}}; or "
            f"drop compile_teacher to silence this.",
            stacklevel=3,
        )
        _logger.warning("teacher %r: torch.compile failed (%s); running eager", self.name, first)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        c = self._consts.get(device)
        if c is None:

            def t(v):
                return torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)

            m_in, s_in, m_t, s_t = t(self.input_mean), t(self.input_std), t(self.mean), t(self.std)
            cmap = self.class_map.to(device) if self.class_map is not None else None
            # pixels -> teacher input, student input -> teacher input, pixels -> student input
            c = (
                m_in,
                s_in,
                1 / s_t,
                -m_t / s_t,
                s_in / s_t,
                (m_in - m_t) / s_t,
                1 / s_in,
                -m_in / s_in,
                cmap,
            )
            self._consts[device] = c
        return c

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """The tensor the teacher network sees for ``images`` (normalized for the student)."""
        if images.dim() != 4:
            raise ValueError(
                f"teacher expects images [batch, channels, height, width], got {tuple(images.shape)}"
            )
        if self.in_chans is not None and images.shape[1] != self.in_chans:
            raise ValueError(
                f"teacher {self.name!r} takes {self.in_chans}-channel images, got a batch with "
                f"{images.shape[1]}"
            )
        size = tuple(images.shape[-2:])
        resize = self.adapt_resolution and size != self.input_size
        if not resize and not self.renormalize:
            return images
        self._warn_adapters(size)
        m_in, s_in, inv_s_t, shift_t, scale, shift, inv_s_in, shift_in, _ = self._constants(images.device)
        with torch.autocast(images.device.type, enabled=False):
            if resize:
                pixels = torch.addcmul(m_in, images.float(), s_in)
                pixels = resize_like_pil(pixels, self.input_size, self.interpolation)
                if self.adapt_normalization:
                    x = torch.addcmul(shift_t, pixels, inv_s_t)
                else:
                    x = torch.addcmul(shift_in, pixels, inv_s_in)
            else:
                x = torch.addcmul(shift, images.float(), scale)
        return x.to(images.dtype) if images.is_floating_point() else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, num_classes]`` for the student's ``images``; no autograd graph."""
        model = self.model
        if model.training:  # someone called teacher.model.train(): undo it before it touches BN statistics
            model.eval()
        with torch.inference_mode():
            x = self.adapt(images)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.dtype is not None:
                with torch.autocast(x.device.type, enabled=False):
                    logits = self._run(x.to(self.dtype))
            else:
                p = next(model.parameters(), None)
                if p is not None and x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
                    x = x.to(p.dtype)  # e.g. bf16 images for a student kept in bf16, teacher in fp32
                logits = self._run(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            if self.class_map is not None:
                logits = logits.index_select(-1, self._constants(logits.device)[-1])
        # A normal tensor (not an inference tensor): losses may save it for the student's backward.
        return logits.to(dtype=torch.float32, copy=True) if self.dtype is not None else logits.clone()

    def _run(self, x: torch.Tensor) -> Any:
        """The network on ``x``: compiled if it compiled, else eager (after one warning)."""
        compiled = self._compiled
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as e:  # compile errors surface on the first call (or a recompile)
                self._compile_failed(e)  # a genuine error in the model is raised again by the eager call
        return self.model(x)

    def extra_repr(self) -> str:
        size = self.input_size if self.adapt_resolution else None
        parts = [f"name={self.name!r}", f"num_classes={self.num_classes}", f"input_size={size or 'as given'}"]
        if self.renormalize:
            parts.append(
                f"renormalize={_fmt(self.input_mean)}/{_fmt(self.input_std)}->{_fmt(self.mean)}/{_fmt(self.std)}"
            )
        if self.class_map is not None:
            parts.append(f"class_map=[{self.class_map.numel()} of {self.teacher_num_classes}]")
        if self.dtype is not None:
            parts.append(f"dtype={self.dtype}")
        return ", ".join(parts)


def _size2(size: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an ``(H, W)`` or a ``(C, H, W)`` size."""
    return (int(size[-2]), int(size[-1]))


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
