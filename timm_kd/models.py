"""Timm models: creation from any source, their class and channel counts, and unwrapping.

``resolve_model`` turns what a user passes as a teacher or student (a timm name, ``name.tag``,
``hf-hub:org/repo``, ``local-dir:/path``, an ``nn.Module``, plus an optional weights file) into a
ready ``nn.Module``; ``unwrap_model`` is the one place that strips the wrappers training puts
around a model (DDP, ``torch.compile``, a ``DistillWrapper``'s student). The two mismatch errors
say what to pass when a teacher and student disagree on classes or channels.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import load_state_dict, parse_model_name
from timm.utils.model_ema import ModelEmaV2, ModelEmaV3
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .offline import HubUnreachableError, hub_cache_dir, hub_offline_mode, hub_unreachable_reason

__all__ = [
    "resolve_model",
    "unwrap_model",
    "model_num_classes",
    "model_in_chans",
    "class_mismatch_error",
    "channel_mismatch_error",
    "read_class_map",
    "WeightsSource",
    "weights_source",
    "check_local_dir",
    "check_checkpoint_file",
]

_logger = logging.getLogger(__name__)


def unwrap_model(model: Any, *, compiled: bool = True, student: bool = False) -> nn.Module:
    """The bare model under the wrappers training puts around it.

    Strips ``DistributedDataParallel`` / ``DataParallel`` and timm's ``ModelEmaV2``/``V3`` (``.module``),
    and, unless ``compiled=False``, ``torch.compile``'s ``OptimizedModule`` (``._orig_mod``), in any
    nesting. With ``student=True`` a distillation wrapper (an object with a ``student`` module and a
    ``teacher``) is replaced by its student first.
    """
    for _ in range(8):
        if student and isinstance(getattr(model, "student", None), nn.Module) and hasattr(model, "teacher"):
            model = model.student
        elif isinstance(model, (DistributedDataParallel, DataParallel, ModelEmaV2, ModelEmaV3)):
            model = model.module
        elif compiled and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module made by timm.create_model, got {type(model).__name__}")
    return model



def model_num_classes(model: nn.Module) -> int | None:
    """Number of classes a classifier predicts: timm's ``num_classes``, else its classifier's width."""
    model = unwrap_model(model)
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Linear):
            return head.out_features
    return None


def model_in_chans(model: nn.Module) -> int | None:
    """Input channels: timm's ``in_chans``, else the ``in_channels`` of the first convolution."""
    model = unwrap_model(model)
    n = getattr(model, "in_chans", None)
    if isinstance(n, int):
        return n
    for m in model.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int):
            return c
    return None


def _classifier_keys(model: nn.Module) -> list[str]:
    """State-dict prefixes of the classifier(s): from ``pretrained_cfg['classifier']`` or the head module."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if names:
        return list(names) if isinstance(names, (list, tuple)) else [names]
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in model.named_modules():
            if m is head and name:
                return [name]
    return []


def check_checkpoint_file(path: str | os.PathLike, role: str = "model") -> None:
    """Refuse a ``{role}_checkpoint`` that is not a file: a folder is named as one, with what to pass."""
    path = os.fspath(path)
    folder = Path(path)
    if folder.is_dir():
        if (folder / "config.json").is_file():
            fix = f"pass --{role} local-dir:{path} (its config.json gives the architecture and input)"
        elif (folder / "student" / "config.json").is_file():
            fix = f"it is a timm-kd run folder: pass --{role} local-dir:{folder / 'student'}"
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(
                p.name for p in folder.glob("*.pth")
            )
            fix = f"pass the weights file inside it ({', '.join(files[:3])})" if files else (
                "pass the weights file (.safetensors)"
            )
        raise IsADirectoryError(
            f"{role} checkpoint {path!r} is a folder, not a weights file: {fix}. A weights file goes "
            f"with the architecture's name (--{role} NAME --{role}-checkpoint FILE); a folder written by "
            f"timm_kd.save_pretrained or timm's save_for_hf goes as --{role} local-dir:FOLDER."
        )
    if not folder.is_file():
        raise FileNotFoundError(f"{role} checkpoint {path!r} (--{role}-checkpoint): no such file.")


def _load_checkpoint_file(path: str | os.PathLike, role: str) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    check_checkpoint_file(path, role)
    # safetensors files are read as such; anything else goes through torch.load(weights_only=True).
    return load_state_dict(path, use_ema=True, weights_only=True)


#: The input keys of a timm data config that describe what a set of weights was trained on.
INPUT_KEYS = ("input_size", "interpolation", "mean", "std")
_SOURCE_ATTR = "timm_kd_weights_source"
_WEIGHT_KEYS = ("hf_hub_id", "url", "file", "state_dict")


@dataclass(frozen=True, eq=False)
class WeightsSource:
    """Where a model's weights came from and, when known, the input they were trained on.

    ``kind`` is ``"pretrained"`` (a registry name whose pretrained config names real weights),
    ``"hf-hub"``, ``"local-dir"``, ``"checkpoint"`` or ``"random"``; ``name`` the tag, hub id,
    folder or file. ``data_config`` holds the known ``input_size``/``mean``/``std``/``interpolation``
    of those weights (empty when nothing is known: the weights get the batch as it is), and
    ``origin`` says, for messages, which file or config said so.
    """

    kind: str
    name: str
    data_config: dict[str, Any]
    origin: str


def weights_source(model: Any) -> WeightsSource | None:
    """The ``WeightsSource`` ``resolve_model`` recorded on ``model``, or None for a module it did not
    create (``timm.create_model`` sets ``pretrained_cfg`` on every model, weights loaded or not, so
    a module's provenance is not otherwise known)."""
    return getattr(unwrap_model(model), _SOURCE_ATTR, None)


def _input_keys(cfg: Any) -> dict[str, Any]:
    cfg = cfg if isinstance(cfg, dict) else {}
    return {k: cfg[k] for k in INPUT_KEYS if cfg.get(k) is not None}


def _config_beside(checkpoint: str | os.PathLike, arch: str | None) -> dict[str, Any]:
    """The input keys of a timm ``config.json`` beside a weights file (its ``pretrained_cfg``)."""
    path = Path(checkpoint).parent / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} beside the checkpoint is not JSON ({e}); fix or remove it.") from None
    have = cfg.get("architecture") if isinstance(cfg, dict) else None
    if have and arch and have != arch:
        _logger.warning("%s describes a %r, not a %r: its input config is not used", path, have, arch)
        return {}
    return _input_keys(cfg.get("pretrained_cfg", cfg) if isinstance(cfg, dict) else {})


def _weights_source(
    name: str, net: nn.Module, pretrained: bool, checkpoint: Any, overlay: Any
) -> WeightsSource:
    """What is known of the input ``net``'s weights expect, in the order: an explicit
    ``pretrained_cfg_overlay``, a ``config.json`` beside the checkpoint, the loaded weights' config."""
    explicit = _input_keys(overlay)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if checkpoint is not None:
        beside = _config_beside(checkpoint, cfg.get("architecture"))
        origin = f"config.json beside {os.fspath(checkpoint)}" if beside else "nothing (no config.json)"
        return WeightsSource("checkpoint", os.fspath(checkpoint), {**beside, **explicit}, origin)
    prefix, rest = parse_model_name(name)
    if pretrained and (prefix is not None or any(cfg.get(k) for k in _WEIGHT_KEYS)):
        kind = prefix or "pretrained"
        tag = cfg.get("tag")
        where = rest if prefix else (f"{cfg.get('architecture', name)}.{tag}" if tag else name)
        known = {**_input_keys(cfg), **explicit}
        return WeightsSource(kind, where, known, f"the pretrained config of {where}")
    origin = "pretrained_cfg_overlay" if explicit else "nothing (random weights)"
    return WeightsSource("random", name, explicit, origin)


def check_local_dir(name: str, role: str = "model") -> None:
    """Refuse a ``local-dir:`` folder timm cannot read, saying what the folder is and what to pass."""
    prefix, path = parse_model_name(name)
    if prefix != "local-dir":
        return
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{role} {name!r}: folder {path!r} does not exist. A local-dir: model is a folder with "
            f"config.json and model.safetensors (what timm_kd.save_pretrained writes)."
        )
    if (folder / "config.json").is_file():
        return
    if (folder / "student" / "config.json").is_file():
        raise FileNotFoundError(
            f"{role} {name!r} is a timm-kd run folder; its trained model is in its student/ folder: "
            f"pass {role}='local-dir:{folder / 'student'}'."
        )
    raise FileNotFoundError(
        f"{role} {name!r}: {path!r} has no config.json. A local-dir: model is a folder with config.json "
        f"and model.safetensors (timm_kd.save_pretrained or timm's save_for_hf write one); for a bare "
        f"weights file pass it as the {role}'s checkpoint (--{role}-checkpoint FILE) with the "
        f"architecture's name."
    )


def _create_named(name: str, role: str, *, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, failing in seconds, with the fixes, when it needs an unreachable Hub.

    A pretrained name and any ``hf-hub:`` name read files from the Hub. When the Hub cannot be
    reached (``timm_kd.offline.hub_unreachable_reason``), the model is created in offline mode:
    weights already in the local Hugging Face cache load, missing ones raise ``HubUnreachableError``
    at once instead of after huggingface_hub's retries.
    """
    if not (pretrained or name.startswith(("hf-hub:", "hf_hub:"))):
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    reason = hub_unreachable_reason()
    if reason is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    try:
        with hub_offline_mode():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled (huggingface_hub), URLError
        flag = f"--{role.replace('_', '-')}"
        arch = "the architecture's name" if ":" in name else name.split(".")[0]
        raise HubUnreachableError(
            f"{role} {name!r} needs files from the Hugging Face Hub, but {reason} and they are not in the "
            f"local cache ({hub_cache_dir()}). Fixes: pass the weights as a file ({flag}-checkpoint "
            f"model.safetensors with {flag} {arch}) or a saved folder ({flag} local-dir:PATH); or fill the "
            f"cache once online (python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), "
            f"then run with HF_HUB_OFFLINE=1 to skip the network. ({type(e).__name__}: {e})"
        ) from None


def resolve_model(
    model: str | nn.Module,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    replace_head: bool = False,
    role: str = "model",
    **kwargs: Any,
) -> nn.Module:
    """A ready model from an ``nn.Module`` or a timm name.

    Names go to ``timm.create_model`` unchanged, so registry names, ``name.tag``, ``hf-hub:org/repo``
    and ``local-dir:/path`` all work, with ``pretrained`` and ``kwargs`` (``in_chans``, ``img_size``...).

    ``checkpoint`` (a ``.safetensors`` file, or a torch file read with ``weights_only=True``; EMA
    weights are preferred where the file has them) replaces the pretrained weights: nothing is
    downloaded. Its class count comes from the checkpoint's classifier, so a fine-tuned 100-class
    checkpoint loads as a 100-class model. If ``num_classes`` asks for another count, the head is
    re-initialized when ``replace_head`` (a student starting from other weights), else it is an
    error (a teacher's classifier is what it teaches). Loading is strict otherwise.
    """
    if isinstance(model, nn.Module):
        if checkpoint is not None or kwargs:
            raise ValueError(
                f"{role}: a checkpoint and model kwargs ({sorted(kwargs)}) apply only when the {role} is a "
                f"model name; load the weights into your module before passing it."
            )
        have = model_num_classes(model)
        if num_classes is not None and have is not None and num_classes != have:
            raise ValueError(
                f"{role}: num_classes={num_classes} was given but the {role} module predicts {have} classes. "
                f"Call {role}.reset_classifier({num_classes}) before passing it, or pass the model name "
                f"instead of the module."
            )
        return model
    if not isinstance(model, str):
        raise TypeError(f"{role} must be a timm model name or an nn.Module, got {type(model).__name__}")

    check_local_dir(model, role)
    net = _create_named(
        model, role, pretrained=bool(pretrained) and checkpoint is None, num_classes=num_classes, **kwargs
    )
    source = _weights_source(model, net, bool(pretrained), checkpoint, kwargs.get("pretrained_cfg_overlay"))
    setattr(net, _SOURCE_ATTR, source)
    if checkpoint is None:
        return net
    state = _load_checkpoint_file(checkpoint, role)
    ckpt_classes = None
    heads = _classifier_keys(net)
    for h in heads:
        w = state.get(f"{h}.weight")
        if w is not None and w.ndim >= 1:
            ckpt_classes = int(w.shape[0])
            break
    have = model_num_classes(net)
    if ckpt_classes is not None and have is not None and ckpt_classes != have:
        if num_classes is None:
            net.reset_classifier(ckpt_classes)  # the checkpoint says how many classes it predicts
        elif replace_head:
            state = {k: v for k, v in state.items() if not any(k.startswith(f"{h}.") for h in heads)}
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not any(k.startswith(f"{h}.") for h in heads)]
            if bad or unexpected:
                raise RuntimeError(
                    f"{role}_checkpoint {os.fspath(checkpoint)!r} does not fit {model!r}: missing {bad[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
            _logger.info(
                "%s: checkpoint head has %d classes; a new %d-class head was initialized",
                role,
                ckpt_classes,
                num_classes,
            )
            return net
        else:
            raise ValueError(
                f"{role}_checkpoint {os.fspath(checkpoint)!r} predicts {ckpt_classes} classes but "
                f"num_classes={num_classes} was asked. A {role}'s classifier cannot be replaced: drop "
                f"num_classes to keep the checkpoint's {ckpt_classes} classes, and map them with "
                f"class_map=... if they are a superset of the student's."
            )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"{role}_checkpoint {os.fspath(checkpoint)!r} does not fit {model!r} "
            f"(create kwargs {kwargs}): {e}"
        ) from None
    return net


def class_mismatch_error(teacher: str, teacher_classes: int, student_classes: int) -> ValueError:
    """The error for a teacher and student predicting different numbers of classes, with the fixes."""
    if teacher_classes > student_classes:
        fix = (
            f"If the student's classes are a subset of the teacher's, pass class_map=[teacher index of each "
            f"student class] ({student_classes} entries). Otherwise give the student "
            f"num_classes={teacher_classes}, or use a teacher fine-tuned on your {student_classes} classes "
            f"(teacher_checkpoint=...)."
        )
    else:
        fix = (
            f"The teacher knows fewer classes than the student: fine-tune the teacher on the student's "
            f"{student_classes} classes first (then pass teacher_checkpoint=...), or give the student "
            f"num_classes={teacher_classes}."
        )
    return ValueError(
        f"teacher {teacher!r} predicts {teacher_classes} classes but the student predicts {student_classes}. "
        f"{fix}"
    )


def channel_mismatch_error(teacher: str, teacher_chans: int, student_chans: int) -> ValueError:
    """The error for a teacher and student taking different numbers of input channels, with the fixes."""
    return ValueError(
        f"teacher {teacher!r} takes {teacher_chans}-channel images but the student takes {student_chans}. "
        f"Create the teacher for {student_chans} channels (timm adapts pretrained stems: "
        f"DistillWrapper(..., teacher_kwargs={{'in_chans': {student_chans}}}) or "
        f"timm.create_model(name, pretrained=True, in_chans={student_chans})), or give the student "
        f"{teacher_chans}-channel inputs."
    )


def read_class_map(class_map: Any) -> Any:
    """``--class-map FILE``: one teacher class index per line (or a JSON list), in student class order.

    Anything that is not a path (a list, a tensor, None) is returned as it is.
    """
    if class_map is None or not isinstance(class_map, (str, os.PathLike)):
        return class_map
    text = Path(class_map).read_text()
    try:
        return [int(x) for x in json.loads(text)]
    except json.JSONDecodeError:
        return [int(line.split()[0]) for line in text.splitlines() if line.strip()]
