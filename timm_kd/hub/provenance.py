"""What taught a student: the teacher record a model card and a run folder carry.

``describe_teacher`` returns a plain, JSON-serializable dict (the ``teacher_info`` run metadata)::

    architecture   the timm architecture (``resnet10t``), or None when unknown
    num_params     the teacher network's parameter count, or None
    source         where its weights came from, one of SOURCES:
                     "pretrained"  a timm registry tag (``resnet50.a1_in1k``): hub_id is its Hub repo
                     "hf-hub"      a Hub repository (``hf-hub:org/name[@revision]``)
                     "checkpoint"  a weights file: name is the file's name, sha256 its SHA-256
                     "local-dir"   a timm folder (``local-dir:``): name is the folder's name
                     "random"      no weights loaded (tests, benchmarks)
                     "module"      a module handed to the trainer whose origin was not recorded
    name           the public name of those weights: tag, hub id, file name or folder name
    hub_id         the Hub repository of the weights, only when they are public there
    revision       the Hub revision, when known
    sha256         a checkpoint file's SHA-256 (hex), when known
    cache          the folder name of the teacher cache the logits were read from, or None
    cache_top1     the teacher's top-1 (%) on the views it cached, when read from a cache

A card is public: paths are reduced to a file or folder name (a timm-kd run's ``student/`` folder
keeps its run folder's name, ``teacher-run/student``). The teacher's measured accuracy is not part
of the record: it is the run's ``teacher_metrics``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.models import get_pretrained_cfg, parse_model_name

from ..files import file_sha256
from ..models import unwrap_model, weights_source
from ..teacher import Teacher

__all__ = ["SOURCES", "describe_teacher", "teacher_label", "teacher_metadata", "teacher_text"]

SOURCES = ("pretrained", "hf-hub", "checkpoint", "local-dir", "random", "module")
_HUB_PREFIXES = ("hf-hub:", "hf_hub:")


def _local_name(path: str | os.PathLike) -> str:
    """A folder's public name: its own name, with its parent's for a run's ``student/`` folder."""
    p = Path(os.fspath(path).rstrip("/\\"))
    return f"{p.parent.name}/{p.name}" if p.name == "student" and p.parent.name else p.name


def _network(model: nn.Module | None) -> nn.Module | None:
    if isinstance(model, Teacher):
        model = model.model
    return unwrap_model(model) if model is not None else None


def _folder_architecture(folder: str) -> str | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return config.get("architecture") if isinstance(config, dict) else None
    except (OSError, ValueError):
        return None


def _named_source(
    name: str, pretrained: bool, revision: str | None
) -> tuple[str, str, str | None, str | None, str | None]:
    """(source, public name, hub id, revision, architecture guess) of a teacher named ``name``."""
    bare = name
    for prefix in _HUB_PREFIXES:
        bare = bare.removeprefix(prefix)
    if bare.startswith("local-dir:") or bare.startswith((".", "/", "~")):
        folder = bare.removeprefix("local-dir:")
        return "local-dir", _local_name(folder), None, revision, _folder_architecture(folder)
    if bare != name or "/" in bare:  # a Hub repository
        if "@" in bare:
            bare, rev_in_name = bare.split("@", 1)
            revision = revision or rev_in_name
        return "hf-hub", bare, bare, revision, None
    arch = name.split(".", 1)[0]
    if not pretrained:
        return "random", name, None, revision, arch
    try:  # the weights a tag (or an untagged name's default tag) loads, and their Hub repository
        cfg = get_pretrained_cfg(parse_model_name(name)[1])
    except Exception:  # an unusual name: recorded as given
        cfg = None
    tag = getattr(cfg, "tag", None)
    full = name if "." in name or not tag else f"{name}.{tag}"
    return "pretrained", full, getattr(cfg, "hf_hub_id", None) or None, revision, arch


def describe_teacher(
    teacher: str | nn.Module | None,
    *,
    model: nn.Module | None = None,
    pretrained: bool = True,
    checkpoint: str | os.PathLike | None = None,
    revision: str | None = None,
    checkpoint_sha256: str | None = None,
) -> dict[str, Any] | None:
    """The record of the teacher that taught a student (see the module docstring); None for none.

    ``teacher`` is the name the run gave (a timm name or tag, ``hf-hub:``, ``local-dir:``) or the
    module itself; ``model`` the built network (a ``timm_kd.teacher.Teacher`` is unwrapped), which
    gives the architecture and the parameter count. ``checkpoint`` is the weights file loaded into
    the named architecture (its SHA-256 is read from the file unless ``checkpoint_sha256`` is given).
    A module without a name gets the source ``timm_kd.models.resolve_model`` recorded on it, else
    ``"module"``.
    """
    if isinstance(teacher, nn.Module):
        model, teacher = teacher, None
    net = _network(model)
    if teacher is None and net is None:
        return None
    known = weights_source(net) if (teacher is None and net is not None) else None
    hub_id = sha256 = None
    arch = None
    if checkpoint is not None or (known is not None and known.kind == "checkpoint"):
        path = checkpoint if checkpoint is not None else known.name
        source, name = "checkpoint", Path(os.fspath(path)).name
        sha256 = checkpoint_sha256 or (file_sha256(path) if os.path.isfile(path) else None)
        arch = teacher.split(".", 1)[0] if isinstance(teacher, str) and ":" not in teacher else None
    elif isinstance(teacher, str):
        source, name, hub_id, revision, arch = _named_source(teacher, pretrained, revision)
    elif known is not None:
        prefix = "hf-hub:" if known.kind == "hf-hub" else "local-dir:" if known.kind == "local-dir" else ""
        source, name, hub_id, revision, arch = _named_source(
            prefix + known.name, known.kind != "random", revision
        )
    else:
        source, name = "module", None
    if net is not None:
        arch = (getattr(net, "pretrained_cfg", None) or {}).get("architecture") or arch
        arch = arch or type(net).__name__
    return {
        "architecture": arch,
        "num_params": sum(p.numel() for p in net.parameters()) if net is not None else None,
        "source": source,
        "name": name,
        "hub_id": hub_id,
        "revision": revision,
        "sha256": sha256,
        "cache": None,
        "cache_top1": None,
    }


def _hub_link(repo_id: str) -> str:
    return f"[{repo_id}](https://huggingface.co/{repo_id})"


def teacher_text(info: Mapping[str, Any] | None, metrics: Mapping[str, float] | None, split: str) -> str:
    """How the card body names the teacher: architecture, size, weights, cache, measured accuracy."""
    if not info:
        return "not recorded"
    arch, n = info.get("architecture"), info.get("num_params")
    src, name = info.get("source"), info.get("name")
    hub_id, revision, sha = info.get("hub_id"), info.get("revision"), info.get("sha256")
    text = f"`{arch}`" if arch else "architecture not recorded"
    if n:
        text += f" ({n / 1e6:.2f} M parameters)"
    if src == "pretrained":
        text += f" with the pretrained weights `{name}`" + (f" ({_hub_link(hub_id)})" if hub_id else "")
    elif src == "hf-hub":
        text += f" with the weights of {_hub_link(hub_id or name)}"
    elif src == "checkpoint":
        text += f", weights from the checkpoint file `{name}`" + (f" (SHA-256 `{sha}`)" if sha else "")
    elif src == "local-dir":
        text += f", weights from a local model folder (`{name}`)"
    elif src == "random":
        text += " with random weights (no pretrained weights, no checkpoint)"
    else:
        text += ", a module given to the trainer (where its weights came from was not recorded)"
    if src in ("pretrained", "hf-hub"):
        text += f" at revision `{revision}`" if revision else " (revision not recorded)"
    if info.get("cache"):
        text += f"; its logits were read from a teacher cache (`{info['cache']}`)"
        if info.get("cache_top1") is not None:
            text += f", top-1 {info['cache_top1']:.2f} % on the training views it cached"
    if metrics and metrics.get("top1") is not None:
        text += f"; measured top-1 {metrics['top1']:.2f} % on the `{split}` split by the training run"
    return text


def teacher_label(info: Mapping[str, Any] | None) -> str:
    """The teacher's row label in the card's accuracy table."""
    if not info:
        return "`teacher`"
    arch, src, name = info.get("architecture"), info.get("source"), info.get("name")
    if src == "pretrained":
        return f"`{name}`"
    if src == "hf-hub":
        return f"`{info.get('hub_id') or name}`"
    if src in ("checkpoint", "local-dir"):
        return f"`{arch or 'teacher'}` ({'checkpoint' if src == 'checkpoint' else 'local folder'} `{name}`)"
    return f"`{arch or 'teacher'}`"


def teacher_metadata(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The teacher's entries of the card's ``distillation`` metadata (None values left out, except
    ``teacher`` and ``teacher_revision``, always present)."""
    if not info:
        return {"teacher": None, "teacher_revision": None}
    src, name = info.get("source"), info.get("name")
    ident = {
        "pretrained": info.get("hub_id") or name,
        "hf-hub": info.get("hub_id") or name,
        "local-dir": f"local:{name}",
        "checkpoint": info.get("architecture"),
    }.get(src, info.get("architecture") or name)
    out = {"teacher": ident, "teacher_revision": info.get("revision")}
    extra = {
        "teacher_architecture": info.get("architecture"),
        "teacher_params": info.get("num_params"),
        "teacher_weights": f"{src} {name}" if name and src in ("checkpoint", "local-dir") else src,
        "teacher_sha256": info.get("sha256"),
        "teacher_cache": info.get("cache"),
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
