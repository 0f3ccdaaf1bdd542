"""The model card of a distilled student, rendered from its config.json and the run metadata.

Run metadata (every keyword optional; a run that did not evaluate gets a card that says so)::

    model_name, teacher, teacher_revision, teacher_info, method, loss_kwargs, epochs,
    global_batch_size, seed, hardware, dataset, eval_split, metrics, teacher_metrics,
    student_alone_metrics, label_names, license, data_config, config_changes (flags a resumed
    run changed, each with the step it applied from)

``metrics`` and the other ``*_metrics`` are ``{"top1": float, "top5": float}`` in percent, as
``timm.utils.accuracy`` reports them; they go unchanged into the card's ``model-index``.

The teacher is ``teacher_info``, the record ``timm_kd.hub.describe_teacher`` makes of what really
taught (architecture, parameter count, where its weights came from: a pretrained tag, a Hub
repository, a checkpoint file and its SHA-256, a local folder); given only ``teacher``, a name, the
card takes it for the pretrained weights that name loads. Its measured accuracy is
``teacher_metrics``. It is recorded in the card's metadata as ``distillation: {teacher,
teacher_revision, teacher_architecture, teacher_params, teacher_weights, teacher_sha256, method}``
and in the card body, not as ``base_model``: the Hub's ``base_model`` relations are
adapter, merge, quantized and finetune, and a bare ``base_model`` reads as "fine-tuned from the
teacher", which a distilled student is not. ``method="ce"`` (``PLAIN_TRAINING``) is a student trained on
its labels alone: no teacher, no ``distillation`` record, no knowledge-distillation tag.

What the card says about the method (title, paper, summary, arXiv id, citations) is the loss's
card facts, read with ``timm_kd.losses.get_loss_card``: a plug-in loss registered with a card,
its own BibTeX included, gets the same entry as a built-in; a loss without one is named only.
BibTeX entries of the built-in losses live in ``model_cards/citations.bib``.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import math
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

from ..losses import LossCard, get_loss_card, get_loss_entrypoint
from ..version import __version__
from .provenance import describe_teacher, teacher_label, teacher_metadata, teacher_text

__all__ = ["META_KEYS", "PLAIN_TRAINING", "create_model_card"]

_logger = logging.getLogger(__name__)

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
    "teacher_info",
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
    "config_changes",
)
_PUSH_ONLY_KEYS = ("token", "private", "commit_message")
#: the ``method`` of a student trained on its labels alone (cross-entropy, no teacher)
PLAIN_TRAINING = "ce"
_LSKD_CITE = "sun2024lskd"  # cited as well when another loss ran on standardized logits
_TIMM_CITE = "wightman2019timm"


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


def _card_resource(name: str) -> str:
    return resources.files("timm_kd.model_cards").joinpath(name).read_text(encoding="utf-8")


def _parse_bibtex(text: str) -> dict[str, str]:
    """BibTeX entries of ``text`` by key."""
    entries = {}
    for chunk in re.split(r"\n(?=@)", text.strip()):
        m = re.match(r"@\w+\{([^,]+),", chunk.strip())
        if m:
            entries[m.group(1).strip()] = chunk.strip()
    return entries


def _loss_card(method: str | None) -> LossCard | None:
    """The card facts of ``method``; None when it has none or is not installed here."""
    if not method:
        return None
    try:
        return get_loss_card(method)
    except ValueError:  # a loss that is not registered in this install: the card names it only
        return None


def _citations(card: LossCard | None, loss_kwargs: Mapping[str, Any]) -> list[str]:
    """BibTeX entries the card cites: the method's keys, its own extra entries, LSKD, timm."""
    bib = _parse_bibtex(_card_resource(CITATIONS_FILE))
    cites = list(card.cites) if card else []
    if card is not None and card.bibtex:
        own = _parse_bibtex(card.bibtex)
        cites += [key for key in own if key not in cites]
        bib = {**own, **bib}
    if loss_kwargs.get("logit_standardize"):
        cites.append(_LSKD_CITE)
    cites.append(_TIMM_CITE)
    return [bib[k] for k in dict.fromkeys(cites) if k in bib]


def _hub_link(repo_id: str, kind: str = "") -> str:
    return f"[{repo_id}](https://huggingface.co/{kind}{repo_id})"


def _teacher_record(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's ``teacher_info``, else a record made from the ``teacher`` name alone (taken as
    the pretrained weights that name loads; a run from a checkpoint must pass ``teacher_info``)."""
    info = meta.get("teacher_info")
    if info is not None and not isinstance(info, Mapping):
        raise ValueError(
            f"teacher_info must be the dict timm_kd.hub.describe_teacher returns, got {type(info).__name__}"
        )
    if info is None and meta.get("teacher"):
        info = describe_teacher(str(meta["teacher"]), pretrained=True)
    if info is None:
        return None
    info = dict(info)
    if meta.get("teacher_revision"):
        info["revision"] = meta["teacher_revision"]
    return info


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


def _card_data(
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None,
    model_name: str,
    teacher: Mapping[str, Any] | None,
    dataset: tuple[str | None, str],
    license: str,
) -> ModelCardData:
    """The card's YAML metadata: tags, license, the ``model-index`` and the ``distillation`` record
    (none, and no knowledge-distillation tag, for a student trained without a teacher)."""
    method = meta.get("method")
    plain = method == PLAIN_TRAINING
    dataset_id, dataset_name = dataset
    tags = ["image-classification", "timm", "timm-kd"]
    if not plain:
        tags.insert(2, "knowledge-distillation")
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
    return ModelCardData(
        tags=tags,
        library_name="timm",
        pipeline_tag="image-classification",
        license=license,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if metrics else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        distillation=None
        if plain
        else {**teacher_metadata(teacher), "method": method, "library": f"timm-kd {__version__}"},
    )


def _comparison(
    checked: Mapping[str, Mapping[str, float] | None],
    method: str | None,
    model_name: str,
    arch: str,
    teacher: Mapping[str, Any] | None,
) -> list[dict[str, str]]:
    """Rows of the accuracy table: this model, the student trained alone, the teacher (when known)."""
    plain = method == PLAIN_TRAINING
    alone = None if plain else checked["student_alone_metrics"]
    how = "cross-entropy on the labels (no teacher)" if plain else f"distilled ({method or 'KD'})"
    rows = (
        (f"**{model_name}** (this model)", how, checked["metrics"]),
        (f"`{arch}`", "same student trained without a teacher", alone),
        (teacher_label(teacher), "teacher", None if plain else checked["teacher_metrics"]),
    )
    return [
        dict(model=model, how=how, top1=_fmt_acc(m, "top1"), top5=_fmt_acc(m, "top5"))
        for model, how, m in rows
        if m
    ]


def _details(
    config: Mapping[str, Any],
    num_params: int | None,
    meta: Mapping[str, Any],
    texts: Mapping[str, str],
    card: LossCard | None,
) -> list[tuple[str, Any]]:
    """The "Model Details" rows; ``texts`` holds the dataset, teacher and method as the body names them."""
    size = config.get("pretrained_cfg", {}).get("input_size", (3, 224, 224))
    license = meta.get("license")
    details = [
        ("Model Type", "Image classification / feature backbone"),
        ("Architecture", f"`{config['architecture']}` (timm)"),
        ("Params (M)", f"{num_params / 1e6:.2f}" if num_params else "not recorded"),
        ("Image size", f"{size[-2]} x {size[-1]}"),
        ("Classes", config["num_classes"]),
        ("Dataset", texts["dataset"]),
        *(
            [("Training", texts["method"])]
            if meta.get("method") == PLAIN_TRAINING
            else [("Teacher", texts["teacher"]), ("Distillation method", texts["method"])]
        ),
        (
            "License",
            license
            or "not specified by the run (`other`); check the licenses of "
            + ("the dataset" if meta.get("method") == PLAIN_TRAINING else "the teacher and the dataset")
            + " before use",
        ),
    ]
    if card is not None and card.arxiv:
        details.append(("Papers", f"[arXiv:{card.arxiv}](https://arxiv.org/abs/{card.arxiv})"))
    return details


def _summary(
    arch: str,
    plain: bool,
    teacher: Mapping[str, Any] | None,
    card: LossCard | None,
    method: str | None,
    metrics: Mapping[str, float] | None,
    eval_split: str,
) -> str:
    """The card's opening sentence: what the model is, how it was trained, its accuracy."""
    if plain:
        text = f"A `{arch}` image classifier trained on its labels with cross-entropy, without a teacher"
        text += " (timm-kd)."
    else:
        by = f" with {card.title.split(' (')[0]}" if card else (f" with `{method}`" if method else "")
        who = teacher_label(teacher) if teacher else "a teacher"
        text = f"A `{arch}` image classifier distilled from {who}{by} (timm-kd)."
    if metrics:
        return text + f" Top-1 accuracy {_fmt_acc(metrics, 'top1')} % on the `{eval_split}` split."
    return text + " It was not evaluated by the run that produced it."


def _training_rows(meta: Mapping[str, Any], texts: Mapping[str, str], plain: bool) -> list[tuple[str, str]]:
    """The "Distillation" (or, without a teacher, "Training") section's rows."""
    rows = [("Method", texts["method"])] + ([] if plain else [("Teacher", texts["teacher"])])
    changes = [
        f"`{c.get('flag')}` {_fmt(c.get('old'))} -> {_fmt(c.get('new'))} from step {_fmt(c.get('step'))}"
        for c in meta.get("config_changes") or []
        if isinstance(c, Mapping)
    ]
    if changes:  # a resumed run whose flags changed: the values below are the last ones
        rows.append(("Changed on resume", "; ".join(changes)))
    return rows + [
        ("Epochs", _fmt(meta.get("epochs"))),
        ("Global batch size", _fmt(meta.get("global_batch_size"))),
        ("Seed", _fmt(meta.get("seed"))),
        ("Hardware", _fmt(meta.get("hardware"))),
        ("Training data", texts["dataset"]),
        ("Software", f"timm-kd {__version__}"),
    ]


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
    without ``metrics`` gets a card saying it was not evaluated and no ``model-index``. The method's
    title, paper, summary and citations come from its ``LossCard`` (``get_loss_card``). The teacher
    is ``teacher_info`` (``timm_kd.hub.describe_teacher``: architecture, parameter count, where its
    weights came from), else what the ``teacher`` name alone says. ``method="ce"`` is a student
    trained on its labels alone: the card names no teacher, no distillation method and no
    knowledge-distillation tag.
    """
    _check_meta(meta)
    checked = {
        key: _check_metrics(key, meta.get(key))
        for key in ("metrics", "teacher_metrics", "student_alone_metrics")
    }
    metrics = checked["metrics"]
    arch = config["architecture"]
    method = meta.get("method")
    plain = method == PLAIN_TRAINING
    card = None if plain else _loss_card(method)
    loss_kwargs = {} if plain else dict(meta.get("loss_kwargs") or {})
    model_name = (
        meta.get("model_name")
        or (repo_id.split("/")[-1] if repo_id else None)
        or (f"{arch}.{method}_distilled" if method and not plain else arch)
    )
    license = meta.get("license") or "other"
    teacher = None if plain else _teacher_record(meta)
    dataset_id, dataset_name, dataset_text = _dataset_info(meta.get("dataset"))
    eval_split = meta.get("eval_split") or "evaluation"
    n_eval = (meta.get("metrics") or {}).get("num_samples")
    if plain:
        method_text = "cross-entropy on the labels (no teacher, no distillation)"
    elif card is None:
        method_text = _fmt(method)
    else:
        method_text = f"{card.title} ({card.paper}" + (f", arXiv:{card.arxiv})" if card.arxiv else ")")
    texts = {
        "dataset": dataset_text,
        "teacher": teacher_text(teacher, checked["teacher_metrics"], eval_split),
        "method": method_text,
    }
    if plain:
        method_summary = "Trained with cross-entropy on the dataset's labels alone; no teacher took part."
    else:
        method_summary = card.summary if card else (f"Loss: `{method}`." if method else "Loss: not recorded.")
    return ModelCard.from_template(
        _card_data(meta, metrics, model_name, teacher, (dataset_id, dataset_name), license),
        template_str=_card_resource(CARD_TEMPLATE),
        model_name=model_name,
        summary=_summary(arch, plain, teacher, card, method, metrics, eval_split),
        hub_id=repo_id or f"<namespace>/{model_name}",
        example_image_url=EXAMPLE_IMAGE_URL,
        top_k=min(5, int(config["num_classes"])),
        num_features=config.get("num_features", "num_features"),
        details=_details(config, num_params, meta, texts, card),
        evaluated=bool(metrics),
        eval_split=eval_split,
        eval_dataset=dataset_text + (f", {int(n_eval)} images" if n_eval else ""),
        comparison=_comparison(checked, method, model_name, arch, teacher),
        distilled=not plain,
        method=method or "",
        method_summary=method_summary,
        distillation=_training_rows(meta, texts, plain),
        loss_params=[] if plain else _loss_params(method, loss_kwargs),
        citations=_citations(card, loss_kwargs),
    )
