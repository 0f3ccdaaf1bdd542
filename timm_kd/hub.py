"""Publish distilled students to the Hugging Face Hub in timm's own format.

A saved folder, and the Hub repository a push creates, hold exactly what plain ``timm`` reads::

    config.json        architecture, num_classes, num_features, global_pool, label_names (when
                       known), model_args (the keyword arguments that rebuild the network) and
                       pretrained_cfg (the preprocessing the student was trained and evaluated with)
    model.safetensors  the student's state dict
    README.md          the model card, rendered from ``model_cards/student_card.md``

so that, with only timm installed::

    timm.create_model("hf-hub:org/name", pretrained=True)       # from the Hub
    timm.create_model("local-dir:/path/to/folder", pretrained=True)  # timm >= 1.0.16

rebuild the student. A student made with ``timm.create_model("resnet18", num_classes=10)`` still
carries the ``pretrained_cfg`` of resnet18's default pretrained tag (its Hub id, tag, paper, origin
URL, test size...); ``config.json`` keeps only the fields that describe this student's network and
preprocessing, with the sizes, mean/std, crop and class count it really uses.

Run metadata (every keyword optional; a run that did not evaluate gets a card that says so)::

    model_name, teacher, teacher_revision, method, loss_kwargs, epochs, global_batch_size, seed,
    hardware, dataset, eval_split, metrics, teacher_metrics, student_alone_metrics, label_names,
    license, data_config

``metrics`` and the other ``*_metrics`` are ``{"top1": float, "top5": float}`` in percent, as
``timm.utils.accuracy`` reports them; they go unchanged into the card's ``model-index``.

The teacher is recorded in the card's metadata as ``distillation: {teacher, teacher_revision,
method}`` and in the card body, not as ``base_model``: the Hub's ``base_model`` relations are
adapter, merge, quantized and finetune, and a bare ``base_model`` reads as "fine-tuned from the
teacher", which a distilled student is not.

A push uploads the whole folder in one commit (``HfApi.create_repo(exist_ok=True)`` then
``HfApi.upload_folder``) and always writes a fresh card, so later pushes of the same repository
update it (timm's ``push_to_hf_hub`` keeps an existing README). The token comes from the ``token``
argument or the usual Hugging Face sources (``HF_TOKEN``, ``hf auth login``); it is passed to
``HfApi`` only, never written, logged or put in an error message.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "META_KEYS",
    "HubPushError",
    "validate_repo_id",
    "check_push_ready",
    "student_config",
    "create_model_card",
    "save_pretrained",
    "push_to_hub",
]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

CARD_TEMPLATE = "student_card.md"
CITATIONS_FILE = "citations.bib"
EXAMPLE_IMAGE_URL = (
    "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png"
)

#: Run metadata accepted by :func:`save_pretrained` and :func:`push_to_hub` (all optional).
META_KEYS = (
    "model_name",
    "teacher",
    "teacher_revision",
    "method",
    "loss_kwargs",
    "epochs",
    "global_batch_size",
    "seed",
    "hardware",
    "dataset",
    "eval_split",
    "metrics",
    "teacher_metrics",
    "student_alone_metrics",
    "label_names",
    "license",
    "data_config",
)
_PUSH_ONLY_KEYS = ("token", "private", "commit_message")
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


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do. The local files are intact."""


# --------------------------------------------------------------------------------------------------
# Methods: what the card says about each registered loss and which papers it cites.
# BibTeX entries live in model_cards/citations.bib, keyed by the names below.
# --------------------------------------------------------------------------------------------------

_METHODS: dict[str, dict[str, Any]] = {
    "kd": dict(
        title="Hinton knowledge distillation (KD)",
        paper="Hinton, Vinyals & Dean, 2015",
        arxiv="1503.02531",
        cites=["hinton2015distilling"],
        summary="The student was trained on cross-entropy with the labels plus the KL divergence between "
        "the teacher's and its own temperature-softened class probabilities.",
    ),
    "ats": dict(
        title="Asymmetric Temperature Scaling (ATS)",
        paper="Li et al., NeurIPS 2022",
        arxiv="2210.04427",
        cites=["li2022ats"],
        summary="The teacher's targets were softened with two temperatures, one for the labelled class and "
        "a lower one for every other class, which keeps the teacher's wrong-class probabilities distinct "
        "(the knowledge a large teacher otherwise flattens away).",
    ),
    "isats": dict(
        title="Instance-specific Asymmetric Temperature Scaling (ISATS)",
        paper="Fan, Li & Zhan, arXiv 2024",
        arxiv="2405.13078",
        cites=["fan2024isats", "li2022ats"],
        summary="As in ATS, the labelled class and the wrong classes got different temperatures; the "
        "wrong-class temperature was chosen per image to maximise the spread of the teacher's "
        "wrong-class probabilities.",
    ),
    "dtkd": dict(
        title="Dynamic Temperature Knowledge Distillation (DTKD)",
        paper="Wei & Bai, arXiv 2024",
        arxiv="2404.12711",
        cites=["wei2024dtkd", "hinton2015distilling"],
        summary="Teacher and student temperatures were set per image from their largest logits so that "
        "both softened distributions have the same sharpness, combined with a plain KD term.",
    ),
    "dkd": dict(
        title="Decoupled Knowledge Distillation (DKD)",
        paper="Zhao et al., CVPR 2022",
        arxiv="2203.08679",
        cites=["zhao2022dkd"],
        summary="The KD loss was split into a target-class term and a non-target-class term with "
        "separate weights.",
    ),
    "dist": dict(
        title="DIST: distillation from a stronger teacher",
        paper="Huang et al., NeurIPS 2022",
        arxiv="2205.10536",
        cites=["huang2022dist"],
        summary="The student matched the teacher through Pearson correlations of their predictions: "
        "across classes for each image (inter-class) and across images for each class (intra-class).",
    ),
    "lskd": dict(
        title="Knowledge distillation with logit standardization",
        paper="Sun et al., CVPR 2024",
        arxiv="2403.01427",
        cites=["sun2024lskd", "hinton2015distilling"],
        summary="Both models' logits were z-score standardized before the temperature softmax of KD.",
    ),
}
_LSKD_CITE = "sun2024lskd"
_TIMM_CITE = "wightman2019timm"


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

_ID_PREFIXES = (
    "hf-hub:",
    "hf_hub:",
    "https://huggingface.co/",
    "http://huggingface.co/",
    "https://hf.co/",
    "huggingface.co/",
    "hf.co/",
)


def validate_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is a Hub model repository id of the form ``"namespace/name"``.

    Uses huggingface_hub's own validator, and also requires the namespace (a user or an
    organization): ``timm.create_model("hf-hub:<namespace>/<name>")`` needs it to find the model.
    No network access. Returns ``repo_id``; raises ``ValueError`` naming the problem and the fix.
    """
    example = "'your-username/resnet18-ats' or 'your-org/resnet18-ats'"
    if not isinstance(repo_id, str):
        raise ValueError(f"Hub repo id must be a string such as {example}, got {type(repo_id).__name__}")
    if repo_id != repo_id.strip() or not repo_id:
        raise ValueError(f"Hub repo id {repo_id!r} is empty or has surrounding spaces; use e.g. {example}")
    for prefix in _ID_PREFIXES:
        if repo_id.lower().startswith(prefix):
            bare = repo_id[len(prefix) :].strip("/")
            raise ValueError(
                f"Hub repo id {repo_id!r} starts with {prefix!r}; pass the bare id {bare!r} instead"
            )
    if "@" in repo_id:
        raise ValueError(
            f"Hub repo id {repo_id!r} contains '@': a revision is not part of the id; "
            f"push to {repo_id.split('@')[0]!r}"
        )
    if "/" not in repo_id:
        raise ValueError(
            f"Hub repo id {repo_id!r} has no namespace; use 'your-username/{repo_id}' or "
            f"'your-org/{repo_id}' so that timm.create_model('hf-hub:<namespace>/{repo_id}') can find it"
        )
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r} ({e}) Use 'namespace/name' made of letters, digits, '-', '_' "
            f"and '.', at most 96 characters, without '--' or '..' and not ending in '.git'; e.g. {example}"
        ) from None
    return repo_id


def check_push_ready(repo_id: str, token: str | None = None, *, require_token: bool = True) -> str:
    """Everything that can be checked about a future push without network access, at once.

    Call it before training, so that a long run does not end in a push that cannot work: the repo
    id is valid, the Hub is not switched off with ``HF_HUB_OFFLINE``, and a token is available
    (``token``, ``HF_TOKEN`` or a ``hf auth login`` token). Returns ``repo_id``.
    """
    validate_repo_id(repo_id)
    _check_online()
    if require_token and not (token or _default_token()):
        raise ValueError(
            f"no Hugging Face token found to push to {repo_id!r}: run `hf auth login`, set the HF_TOKEN "
            "environment variable, or pass token=... (it needs write access)"
        )
    return repo_id


def _default_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _check_online() -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubPushError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub; unset it (or set HF_HUB_OFFLINE=0) "
            "in the environment of the process that pushes"
        )


def _check_meta(meta: Mapping[str, Any], allowed: Sequence[str] = META_KEYS) -> None:
    for key in meta:
        if key in allowed:
            continue
        if key in _PUSH_ONLY_KEYS:
            raise ValueError(f"{key!r} is a push_to_hub argument; save_pretrained does not take it")
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown run metadata {key!r}.{hint} Accepted keywords: {', '.join(allowed)}")


def _check_metrics(name: str, value: Any) -> dict[str, float] | None:
    """``None`` or ``{"top1": x, "top5": y}`` (top5 optional) with finite values in [0, 100]."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or "top1" not in value:
        raise ValueError(
            f"{name} must be None (no evaluation) or a dict like {{'top1': 76.1, 'top5': 92.9}} "
            f"(accuracy in percent); got {value!r}"
        )
    out = {}
    for k in ("top1", "top5"):
        if value.get(k) is None:
            continue
        v = value[k]
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or not 0 <= v <= 100
        ):
            raise ValueError(f"{name}[{k!r}] must be an accuracy in percent between 0 and 100, got {v!r}")
        out[k] = v
    if all(v <= 1.0 for v in out.values()) and any(v > 0 for v in out.values()):
        _logger.warning(
            "%s %s look like fractions; timm-kd cards report accuracy in percent (timm.utils.accuracy)",
            name,
            out,
        )
    return out


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------


def _unwrap(model: Any) -> torch.nn.Module:
    """The bare student: unwraps a DistillWrapper, DDP/DataParallel and ``torch.compile``."""
    for _ in range(8):
        if isinstance(getattr(model, "student", None), torch.nn.Module) and hasattr(model, "teacher"):
            model = model.student  # a DistillWrapper: publish its student
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"expected the student as a torch.nn.Module made by timm.create_model, got {type(model).__name__}"
        )
    return model


def _architecture(model: torch.nn.Module) -> str:
    import timm

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
    try:
        from timm.models._input import get_model_input_config

        return get_model_input_config(model)
    except ImportError:  # timm < 1.0.30: no traits, the pretrained_cfg is all there is
        cfg = getattr(model, "pretrained_cfg", {})
        return dict(
            input_size=tuple(cfg.get("input_size", (3, 224, 224))),
            fixed_input_size=cfg.get("fixed_input_size", False),
            first_conv=cfg.get("first_conv"),
        )


def _global_pool(model: torch.nn.Module) -> str | None:
    try:
        from timm.models._input import _get_global_pool

        return _get_global_pool(model)
    except ImportError:
        pool = getattr(model, "global_pool", None)
        pool = getattr(pool, "pool_type", pool)
        return pool if isinstance(pool, str) else None


def _model_args(model: torch.nn.Module, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(architecture, **model_args)``."""
    try:
        from timm.models._input import get_model_args

        args = get_model_args(model, dict(overrides or {}))
    except ImportError:
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
    the student was trained and evaluated with; without it, the student's current input size and
    its architecture's default normalization are used. ``model_args`` adds or replaces arguments
    that ``timm.create_model`` needs to rebuild the network (those given to ``create_model`` are
    recorded by timm itself).
    """
    model = _unwrap(student)
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
    import timm

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


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _card_resource(name: str) -> str:
    return resources.files("timm_kd.model_cards").joinpath(name).read_text(encoding="utf-8")


def _bibtex() -> dict[str, str]:
    """Entries of model_cards/citations.bib by key."""
    entries = {}
    for chunk in re.split(r"\n(?=@)", _card_resource(CITATIONS_FILE)):
        m = re.match(r"@\w+\{([^,]+),", chunk.strip())
        if m:
            entries[m.group(1)] = chunk.strip()
    return entries


def _hub_link(repo_id: str, kind: str = "") -> str:
    return f"[{repo_id}](https://huggingface.co/{kind}{repo_id})"


def _teacher_info(teacher: str | None, revision: str | None) -> tuple[str | None, str | None, str]:
    """(id for the metadata, revision, Markdown for the body) of the teacher as the run named it.

    ``hf-hub:org/x@rev`` and ``org/x`` are Hub repos; a timm name such as ``resnet50.a1_in1k`` is
    linked to the Hub repo its pretrained weights come from; a local checkpoint is named by its
    folder or file name only (a card is public, the user's directory layout is not).
    """
    if not teacher:
        return None, revision, "not recorded"
    name = teacher
    for prefix in ("hf-hub:", "hf_hub:"):
        name = name.removeprefix(prefix)
    if "@" in name and not name.startswith("local-dir:"):
        name, rev_in_name = name.split("@", 1)
        revision = revision or rev_in_name
    hub_id = None
    if name.startswith("local-dir:") or name.startswith((".", "/", "~")) or Path(name).exists():
        local = Path(name.removeprefix("local-dir:")).name
        meta_id, text = f"local:{local}", f"a local checkpoint (`{local}`)"
    else:
        try:
            _hf_validate_repo_id(name)
            if "/" in name:
                hub_id = name
            else:  # a timm model name: its pretrained weights come from the Hub repo in its pretrained_cfg
                from timm.models import get_pretrained_cfg

                cfg = get_pretrained_cfg(name)
                hub_id = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None
        except Exception:  # an unusual name: recorded as given, without a link
            hub_id = None
        meta_id = hub_id or teacher
        text = _hub_link(hub_id) if hub_id else f"`{teacher}`"
        if hub_id and hub_id != name:
            text = f"`{teacher}` ({text})"
    text += f" at revision `{revision}`" if revision else " (revision not recorded)"
    return meta_id, revision, text


def _dataset_info(dataset: str | None) -> tuple[str | None, str, str]:
    """(Hub dataset id or None, a short name, how the card body names the dataset)."""
    if not dataset:
        return None, "custom", "not recorded"
    name = str(dataset)
    for prefix in ("hfds/", "hfids/", "hf-hub:"):
        name = name.removeprefix(prefix)
    if name == "embedded":
        text = "timm-kd's built-in `embedded` dataset (synthetic images made from scikit-learn's digits)"
        return None, "timm-kd embedded", text
    looks_local = name.startswith((".", "/", "~")) or "\\" in name or Path(name).exists()
    if not looks_local:
        try:
            _hf_validate_repo_id(name)
            return name, name, _hub_link(name, "datasets/")
        except HFValidationError:
            pass
    local = Path(name).name  # a card is public: no local directory layout in it
    return None, local, f"a local image folder (`{local}`)"


def _fmt(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fmt_acc(metrics: Mapping[str, float] | None, key: str) -> str:
    if not metrics or metrics.get(key) is None:
        return "–"
    return f"{metrics[key]:.2f}"


def _loss_params(method: str | None, loss_kwargs: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, value, is_default) for every hyperparameter of the loss, given or default."""
    rows = {k: (repr(v), False) for k, v in loss_kwargs.items()}
    if method:
        try:
            import inspect

            from .losses import get_loss_entrypoint

            sig = inspect.signature(get_loss_entrypoint(method))
            for p in sig.parameters.values():
                if p.name in rows or p.name == "check_inputs" or p.default is inspect.Parameter.empty:
                    continue
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                rows[p.name] = (repr(p.default), True)
        except (ValueError, TypeError):
            pass  # a loss that is not registered in this install: show what the run recorded
    return [(k, v, d) for k, (v, d) in rows.items()]


def create_model_card(
    config: Mapping[str, Any],
    *,
    num_params: int | None = None,
    repo_id: str | None = None,
    **meta: Any,
) -> ModelCard:
    """Render the model card of a student from its ``config.json`` dict and the run metadata.

    The template is ``model_cards/student_card.md`` (installed as ``timm_kd/model_cards``),
    rendered by ``huggingface_hub.ModelCard.from_template``. Numbers come only from ``meta``: a run
    without ``metrics`` gets a card saying it was not evaluated and no ``model-index``.
    """
    from . import __version__

    _check_meta(meta)
    metrics = _check_metrics("metrics", meta.get("metrics"))
    teacher_metrics = _check_metrics("teacher_metrics", meta.get("teacher_metrics"))
    alone_metrics = _check_metrics("student_alone_metrics", meta.get("student_alone_metrics"))
    arch = config["architecture"]
    cfg = config.get("pretrained_cfg", {})
    method = meta.get("method")
    info = _METHODS.get(method or "", {})
    loss_kwargs = dict(meta.get("loss_kwargs") or {})
    model_name = (
        meta.get("model_name")
        or (repo_id.split("/")[-1] if repo_id else None)
        or (f"{arch}.{method}_distilled" if method else arch)
    )
    hub_id = repo_id or f"<namespace>/{model_name}"
    license = meta.get("license") or "other"

    teacher = meta.get("teacher")
    teacher_id, teacher_revision, teacher_text = _teacher_info(teacher, meta.get("teacher_revision"))
    dataset_id, dataset_name, dataset_text = _dataset_info(meta.get("dataset"))
    eval_split = meta.get("eval_split") or "evaluation"
    n_eval = (meta.get("metrics") or {}).get("num_samples")

    method_text = f"{info['title']} ({info['paper']}, arXiv:{info['arxiv']})" if info else _fmt(method)

    # ---- metadata
    tags = ["image-classification", "timm", "knowledge-distillation", "timm-kd"]
    if method:
        tags.append(method)
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_id or "custom",
                dataset_name=dataset_name,
                dataset_split=meta.get("eval_split"),
                metric_type="accuracy",
                metric_name=f"Top {k[-1]} Accuracy",
                metric_value=metrics[k],
            )
            for k in ("top1", "top5")
            if k in metrics
        ]
    card_data = ModelCardData(
        tags=tags,
        library_name="timm",
        pipeline_tag="image-classification",
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if metrics else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        distillation={
            "teacher": teacher_id,
            "teacher_revision": teacher_revision,
            "method": method,
            "library": f"timm-kd {__version__}",
        },
    )

    # ---- body
    size = cfg.get("input_size", (3, 224, 224))
    details = [
        ("Model Type", "Image classification / feature backbone"),
        ("Architecture", f"`{arch}` (timm)"),
        ("Params (M)", f"{num_params / 1e6:.2f}" if num_params else "not recorded"),
        ("Image size", f"{size[-2]} x {size[-1]}"),
        ("Classes", config["num_classes"]),
        ("Dataset", dataset_text),
        ("Teacher", teacher_text),
        ("Distillation method", method_text),
        (
            "License",
            license
            if meta.get("license")
            else "not specified by the run (`other`); check the "
            "licenses of the teacher and the dataset before use",
        ),
    ]
    if info:
        details.append(("Papers", f"[arXiv:{info['arxiv']}](https://arxiv.org/abs/{info['arxiv']})"))
    comparison = [
        dict(model=model, how=how, top1=_fmt_acc(m, "top1"), top5=_fmt_acc(m, "top5"))
        for model, how, m in (
            (f"**{model_name}** (this model)", f"distilled ({method or 'KD'})", metrics),
            (f"`{arch}`", "same student trained without a teacher", alone_metrics),
            (f"`{teacher_id or 'teacher'}`", "teacher", teacher_metrics),
        )
        if m
    ]
    distillation = [
        ("Method", method_text),
        ("Teacher", teacher_text),
        ("Epochs", _fmt(meta.get("epochs"))),
        ("Global batch size", _fmt(meta.get("global_batch_size"))),
        ("Seed", _fmt(meta.get("seed"))),
        ("Hardware", _fmt(meta.get("hardware"))),
        ("Training data", dataset_text),
        ("Software", f"timm-kd {__version__}"),
    ]
    cites = list(info.get("cites", []))
    if loss_kwargs.get("logit_standardize") and _LSKD_CITE not in cites:
        cites.append(_LSKD_CITE)
    cites.append(_TIMM_CITE)
    bib = _bibtex()

    by = f" with {info['title'].split(' (')[0]}" if info else (f" with `{method}`" if method else "")
    summary = f"A `{arch}` image classifier distilled from `{teacher_id or 'a teacher'}`{by} (timm-kd)."
    if metrics:
        summary += f" Top-1 accuracy {_fmt_acc(metrics, 'top1')} % on the `{eval_split}` split."
    else:
        summary += " It was not evaluated by the run that produced it."
    return ModelCard.from_template(
        card_data,
        template_str=_card_resource(CARD_TEMPLATE),
        model_name=model_name,
        summary=summary,
        hub_id=hub_id,
        example_image_url=EXAMPLE_IMAGE_URL,
        top_k=min(5, int(config["num_classes"])),
        num_features=config.get("num_features", "num_features"),
        details=details,
        evaluated=bool(metrics),
        eval_split=eval_split,
        eval_dataset=dataset_text + (f", {int(n_eval)} images" if n_eval else ""),
        comparison=comparison,
        method=method or "",
        method_summary=info.get("summary", f"Loss: `{method}`." if method else "Loss: not recorded."),
        distillation=distillation,
        loss_params=_loss_params(method, loss_kwargs),
        citations=[bib[k] for k in cites if k in bib],
    )


# --------------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------------


def _write_folder_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Build the folder in a hidden sibling, then rename it into place.

    ``folder`` either holds the complete previous version or the complete new one, never a mix:
    a crash leaves at most a ``.<name>.tmp-*`` sibling behind. An existing folder is replaced only
    if it holds nothing but files this module writes.
    """
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; choose another path")
        extra = sorted(p.name for p in folder.iterdir() if p.name not in FOLDER_FILES)
        if extra:
            raise FileExistsError(
                f"{folder} already exists and holds files save_pretrained did not write "
                f"({', '.join(extra[:5])}); choose a new folder, or remove them to replace the saved model"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp
    try:
        write(tmp)
        for p in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    student: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    **meta: Any,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` of ``student`` to ``folder``.

    The folder is written atomically (built beside it, then renamed). ``repo_id``, when known,
    goes into the card's usage code. ``meta`` is the run metadata listed in :data:`META_KEYS`.
    ``timm.create_model(f"local-dir:{folder}", pretrained=True)`` loads the result.
    Returns the folder's path.
    """
    _check_meta(meta)
    if repo_id is not None:
        validate_repo_id(repo_id)
    model = _unwrap(student)
    config = student_config(
        model,
        label_names=meta.get("label_names"),
        data_config=meta.get("data_config"),
        license=meta.get("license"),
        model_args=model_args,
    )
    state_dict = _state_dict(model)
    _check_rebuild(config, {k: tuple(v.shape) for k, v in state_dict.items()})
    card = create_model_card(config, num_params=_num_params(model), repo_id=repo_id, **meta)

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        card.save(tmp / CARD_NAME)

    folder = Path(folder)
    _write_folder_atomically(folder, write)
    _logger.info("saved %s student (%s) to %s", config["architecture"], ", ".join(FOLDER_FILES), folder)
    return folder


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, tuple]]:
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if not folder.is_dir() or missing:
        what = "does not exist" if not folder.is_dir() else f"has no {' or '.join(missing)}"
        raise FileNotFoundError(
            f"{folder} {what}; expected a folder written by timm_kd.save_pretrained "
            f"({CONFIG_NAME}, {WEIGHTS_NAME}, {CARD_NAME})"
        )
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if "architecture" not in config or "num_classes" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} is not a timm config.json (no architecture/num_classes)")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------


def _scrub(text: str, tokens: Sequence[str | None]) -> str:
    for t in tokens:
        if t:
            text = text.replace(t, "hf_***")
    return text


def _push_error(
    err: BaseException, repo_id: str, endpoint: str, local: str, tokens: Sequence
) -> HubPushError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        why = (
            f"the Hub refused the request ({status}): the token is missing, invalid or cannot write to "
            f"'{repo_id.split('/')[0]}'. Log in with `hf auth login`, set HF_TOKEN, or pass a token with "
            "write access"
        )
    elif status is not None:
        why = (
            f"the Hub answered HTTP {status}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        )
    else:
        why = (
            f"could not reach the Hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        )
    msg = (
        f"pushing to {endpoint}/{repo_id} failed: {why}. Nothing is lost: {local}, and a push is a single "
        "commit, so the repository is unchanged; run the same push again to retry."
    )
    return HubPushError(_scrub(msg, tokens))


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push_to_hub(
    student: torch.nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    **meta: Any,
) -> Any:
    """Publish a student to the Hub repository ``repo_id`` in one commit; returns its ``CommitInfo``.

    ``student`` is a timm model or a folder written by :func:`save_pretrained` (its config and
    weights are pushed as they are, never modified). The card is rendered afresh from ``meta``
    with ``repo_id`` in its usage code, and replaces any card the repository had. The repository
    is created if needed (``private`` applies only then). ``token`` defaults to ``HF_TOKEN`` or the
    ``hf auth login`` token. An invalid ``repo_id`` or run metadata is refused before any work.
    On a network or Hub error raises :class:`HubPushError`; nothing local is changed and the same
    call can simply be repeated.
    """
    from . import __version__

    validate_repo_id(repo_id)
    _check_meta(meta)
    _check_online()
    is_folder = isinstance(student, (str, os.PathLike))
    local = f"{student} is intact" if is_folder else "the student in memory is unchanged"

    with tempfile.TemporaryDirectory(prefix="timm_kd_push_") as tmp:
        stage = Path(tmp) / "model"
        if is_folder:
            config, shapes = _read_folder(Path(student))
            ref = _check_rebuild(config, shapes)
            card = create_model_card(config, num_params=_num_params(ref), repo_id=repo_id, **meta)
            stage.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                _link_or_copy(Path(student) / name, stage / name)
            card.save(stage / CARD_NAME)
        else:
            save_pretrained(student, stage, repo_id=repo_id, model_args=model_args, **meta)

        api = HfApi(token=token, library_name="timm-kd", library_version=__version__)
        message = commit_message or (
            f"Upload {meta.get('model_name') or repo_id.split('/')[-1]}"
            + (f" (distilled with {meta['method']})" if meta.get("method") else "")
            + " with timm-kd"
        )
        _logger.info("pushing %s to %s/%s", ", ".join(FOLDER_FILES), api.endpoint, repo_id)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=url.repo_id, folder_path=stage, repo_type="model", commit_message=message
            )
        except _network_errors() as e:
            raise _push_error(e, repo_id, api.endpoint, local, [token, _default_token()]) from None
    _logger.info("pushed %s: %s", repo_id, getattr(info, "commit_url", info))
    return info
