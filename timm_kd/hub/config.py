"""timm's ``config.json`` for a distilled student, and the checks that plain timm rebuilds it.

``student_config`` keeps the fields of the student's ``pretrained_cfg`` that describe its network
and preprocessing (not those of its architecture's default pretrained weights), with the sizes,
mean/std, crop and class count it really uses, plus ``model_args``: the keyword arguments that
``timm.create_model(architecture, **model_args)`` needs to rebuild the same network.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch

from ..models import unwrap_model

try:  # timm >= 1.0.30 records the input traits and arguments a model was built with
    from timm.models._input import _get_global_pool, get_model_args, get_model_input_config
except ImportError:  # older timm: the pretrained_cfg is all there is
    _get_global_pool = get_model_args = get_model_input_config = None

__all__ = ["CONFIG_NAME", "student_config"]

CONFIG_NAME = "config.json"
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

# pretrained_cfg fields that describe the network and its preprocessing. Everything else in a
# timm pretrained_cfg (url, hf_hub_id, tag, origin_url, paper_ids, notes, test sizes...) belongs to
# the architecture's default pretrained weights, not to this student.
_CFG_KEEP = (
    "input_size",
    "min_input_size",
    "fixed_input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "first_conv",
    "classifier",
)


def _architecture(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise ValueError(
            f"cannot tell which timm architecture this {type(model).__name__} is "
            f"(pretrained_cfg['architecture'] = {arch!r}); create the student with "
            "timm.create_model('<architecture>', ...), so that plain timm can rebuild it from config.json"
        )
    return arch


def _input_config(model: torch.nn.Module) -> dict[str, Any]:
    """Current input channels/size (after any resize), fixed-size flag and first conv."""
    if get_model_input_config is not None:
        return get_model_input_config(model)
    cfg = getattr(model, "pretrained_cfg", {})
    return dict(
        input_size=tuple(cfg.get("input_size", (3, 224, 224))),
        fixed_input_size=cfg.get("fixed_input_size", False),
        first_conv=cfg.get("first_conv"),
    )


def _global_pool(model: torch.nn.Module) -> str | None:
    if _get_global_pool is not None:
        return _get_global_pool(model)
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    return pool if isinstance(pool, str) else None


def _model_args(model: torch.nn.Module, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(architecture, **model_args)``."""
    if get_model_args is not None:
        args = get_model_args(model, dict(overrides or {}))
    else:
        args = {"num_classes": model.num_classes, **(overrides or {})}
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"the student was created with {key}={value!r}, which cannot be written to config.json; "
                f"pass model_args={{'{key}': <a JSON value timm.create_model accepts>}}"
            ) from None
    return args


def _check_data_config(data_config: Mapping[str, Any], in_chans: int, fixed: bool, size: tuple) -> dict:
    unknown = set(data_config) - set(_DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"data_config has unknown keys {sorted(unknown)}; accepted: {', '.join(_DATA_CONFIG_KEYS)} "
            "(pass timm.data.resolve_data_config(...) of the evaluation transform)"
        )
    out = {k: data_config[k] for k in _DATA_CONFIG_KEYS if data_config.get(k) is not None}
    if "input_size" in out:
        s = tuple(int(v) for v in out["input_size"])
        if len(s) != 3 or min(s) < 1:
            raise ValueError(
                f"data_config['input_size'] must be (channels, height, width), got {out['input_size']}"
            )
        if s[0] != in_chans:
            raise ValueError(
                f"data_config['input_size'] has {s[0]} channels but the student takes {in_chans}"
            )
        if fixed and s[1:] != tuple(size):
            raise ValueError(
                f"data_config['input_size'] is {s} but the student only accepts {tuple(size)} images; "
                "pass the size it was built for, or create it with img_size=... matching the data"
            )
        out["input_size"] = s
    for key in ("mean", "std"):
        if key in out:
            v = tuple(float(x) for x in out[key])
            if len(v) not in (1, in_chans):
                raise ValueError(f"data_config[{key!r}] needs 1 or {in_chans} values, got {len(v)}")
            out[key] = v
    if "crop_pct" in out and not 0 < float(out["crop_pct"]) <= 2:
        raise ValueError(f"data_config['crop_pct'] must be in (0, 2], got {out['crop_pct']}")
    return out


def student_config(
    student: torch.nn.Module,
    *,
    label_names: Sequence[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
    license: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` dict of a timm student, in timm's Hub format.

    ``data_config`` (input_size, mean, std, crop_pct, crop_mode, interpolation) is the preprocessing
    the student was trained and evaluated with. Without it, a ``DistillWrapper`` given as ``student``
    supplies its ``student_data_config`` (its images' normalization, the size of the batches it
    trained on); a bare model its current input size and its architecture's default normalization.
    ``model_args`` adds or replaces arguments that ``timm.create_model`` needs to rebuild the
    network (those given to ``create_model`` are recorded by timm itself).
    """
    if data_config is None:
        data_config = getattr(student, "student_data_config", None)  # a DistillWrapper's
    model = unwrap_model(student, student=True)
    arch = _architecture(model)
    src = dict(getattr(model, "pretrained_cfg", None) or {})
    current = _input_config(model)
    in_chans, *size = current["input_size"]
    num_classes = int(model.num_classes)

    cfg: dict[str, Any] = {k: src[k] for k in _CFG_KEEP if k in src}
    cfg.update(
        custom_load=False,  # native timm state dict
        input_size=tuple(current["input_size"]),
        fixed_input_size=bool(current["fixed_input_size"]),
        first_conv=current["first_conv"],
        num_classes=num_classes,
    )
    cfg.update(_check_data_config(data_config or {}, in_chans, cfg["fixed_input_size"], tuple(size)))
    if tuple(cfg["input_size"][1:]) != tuple(src.get("input_size", cfg["input_size"])[1:]):
        cfg["pool_size"] = None  # the default tag's pool size was for its own input size
    if license:
        cfg["license"] = license

    names = label_names
    if names is None and src.get("label_names") and len(src["label_names"]) == num_classes:
        names = src["label_names"]  # e.g. a student loaded from a Hub repo that had them
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != num_classes:
            raise ValueError(
                f"label_names has {len(names)} names but the student has {num_classes} classes; "
                "pass one name per output, in class-index order (e.g. the dataset's ClassLabel names)"
            )

    config: dict[str, Any] = {"architecture": arch, "num_classes": num_classes}
    config["num_features"] = int(getattr(model, "num_features", 0)) or None
    pool = _global_pool(model)
    if pool:
        config["global_pool"] = pool
    if names is not None:
        config["label_names"] = names
    args = _model_args(model, model_args)
    if args:
        config["model_args"] = args
    config["pretrained_cfg"] = cfg
    return {k: v for k, v in config.items() if v is not None}


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors can store: tied or shared storages are cloned apart."""
    out, seen = {}, set()
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _reference_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """The network plain timm builds from ``config`` (on the meta device when the model allows it)."""
    args = dict(config.get("model_args", {}))
    args.setdefault("num_classes", config["num_classes"])
    try:
        with torch.device("meta"):
            return timm.create_model(config["architecture"], pretrained=False, **args)
    except Exception:
        pass
    try:
        return timm.create_model(config["architecture"], pretrained=False, **args)
    except Exception as e:
        raise ValueError(
            f"timm cannot rebuild {config['architecture']!r} from model_args={args}: {e}. Pass "
            "model_args={...} with the keyword arguments the student was created with"
        ) from e


def _check_rebuild(config: Mapping[str, Any], shapes: Mapping[str, tuple]) -> torch.nn.Module:
    """Fail before anything is written if timm would build a different network from config.json."""
    ref = _reference_model(config)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = sorted(set(ref_shapes) - set(shapes))
    unexpected = sorted(set(shapes) - set(ref_shapes))
    wrong = sorted(k for k in set(shapes) & set(ref_shapes) if tuple(shapes[k]) != ref_shapes[k])
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong))
            if keys
        )
        raise ValueError(
            f"timm.create_model({config['architecture']!r}, **{config.get('model_args', {})}) builds a "
            f"different network than the student ({detail}); pass model_args={{...}} with the keyword "
            "arguments the student was created with"
        )
    return ref


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

