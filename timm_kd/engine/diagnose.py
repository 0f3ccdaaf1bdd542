"""A teacher's logits on a sample of its training data, and the ATS diagnostics computed from them.

``timm-kd diagnose`` calls ``diagnose_teacher``: what ``timm_kd.diagnostics.suggest_ats_temperatures``
needs (teacher logits and labels), collected the way ``fit`` would run the teacher, then the
statistics, the suggestion, the sweep plot and a JSON record.

The teacher sees the training images through the *evaluation* transform (resize, center crop,
normalize: no random augmentation), so the statistics describe the teacher, not a draw of the
augmentation. The images are prepared with the teacher's own data config (``--input-size`` and the
other data flags override it) and the teacher gets the same input adapters as in ``fit``
(``--teacher-input-size`` ...; ``--class-map``). One process: a sample of a few thousand images is
enough for the statistics (the suggestion subsamples to ``max_samples`` itself).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from .. import data as D
from ..diagnostics import (
    FIG7_TAUS,
    TeacherAtChanceError,
    format_sweep_table,
    plot_temperature_sweep,
    suggest_ats_temperatures,
    temperature_sweep,
    wrong_class_stats,
)
from .cache_teacher import _build_teacher, _student_data_config
from .checks import check_config
from .config import TrainConfig
from .setup import _load_data, build_accelerator

__all__ = ["collect_teacher_logits", "diagnose_teacher", "DIAGNOSE_JSON", "DIAGNOSE_PLOT"]

DIAGNOSE_JSON = "diagnose.json"
DIAGNOSE_PLOT = "temperature_sweep.png"
#: the sweep temperatures of the printed table (the JSON record and the plot hold the whole sweep)
PRINTED_TAUS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: the ATS authors' temperatures, printed beside the suggestion for comparison
AUTHORS_TAUS = (4.0, 3.0)


def collect_teacher_logits(
    config: TrainConfig, num_samples: int = 2000, *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C] float32, labels [N])`` of ``config.teacher`` on the first ``num_samples``
    of a seeded shuffle of the training split (all of it when smaller), on CPU."""
    if config.teacher is None:
        raise ValueError("diagnose needs a teacher: pass --teacher MODEL (a timm name, hf-hub:, local-dir:).")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    # the images are prepared for the teacher: its data config stands in for the student's
    config = dataclasses.replace(config, student=config.teacher, method="kd", loss_kwargs={})
    check_config(config)
    acc = build_accelerator(config)
    set_seed(config.seed)
    data = _load_data(config, acc)
    data_config = _student_data_config(config, data.num_classes)
    frozen = _build_teacher(config, None, data_config, data.num_classes, verbose=True).to(acc.device).eval()
    train = data.train
    if not config.streaming and len(train) > num_samples:
        train = train.shuffle(seed=config.seed).select(range(num_samples))
    transform = D.create_timm_transform(data_config, is_training=False, dataset_name=config.dataset)
    loader = D.create_loader(
        D.apply_transform(train, transform, seed=config.seed, on_corrupt=config.on_corrupt),
        batch_size,
        num_workers=config.num_workers,
    )
    logits, labels, seen = [], [], 0
    for batch in loader:
        logits.append(frozen(batch["pixel_values"].to(acc.device)).float().cpu())
        labels.append(batch["label"])
        seen += len(batch["label"])
        if seen >= num_samples:
            break
    return torch.cat(logits)[:num_samples], torch.cat(labels)[:num_samples]


def diagnose_teacher(
    config: TrainConfig, output_dir: str | os.PathLike, *, num_samples: int = 2000, batch_size: int = 64
) -> dict[str, Any]:
    """Collect the teacher's logits, compute the diagnostics, save the plot and the JSON record.

    Returns the record (also written to ``output_dir/diagnose.json``): the teacher and sample,
    its top-1 on the sample, ``wrong_class_stats`` at the suggested and at the authors' (4, 3)
    temperatures, the Figure-7 sweep rows (``table`` prints those at ``PRINTED_TAUS``), and the
    suggestion (``None`` with ``"no_suggestion"`` saying why when the teacher is at chance). The
    plot, ``temperature_sweep.png``, marks the suggested τ1 and τ2 (the authors' when there is no
    suggestion)."""
    logits, labels = collect_teacher_logits(config, num_samples, batch_size=batch_size)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "teacher": config.teacher,
        "teacher_checkpoint": config.teacher_checkpoint,
        "dataset": config.dataset,
        "split": config.train_split,
        "num_samples": int(labels.numel()),
        "num_classes": int(logits.shape[1]),
        "teacher_top1": 100.0 * float((logits.argmax(-1) == labels).double().mean()),
    }
    try:
        suggestion = suggest_ats_temperatures(logits, labels)
    except TeacherAtChanceError as e:
        suggestion, record["no_suggestion"] = None, str(e)
    marks = tuple(suggestion) if suggestion is not None else AUTHORS_TAUS
    record["suggestion"] = None if suggestion is None else dataclasses.asdict(suggestion)
    if suggestion is not None:
        record["stats_suggested"] = _floats(wrong_class_stats(logits, labels, *marks))
    record["stats_authors"] = _floats(wrong_class_stats(logits, labels, *AUTHORS_TAUS))
    rows = temperature_sweep(logits, labels, FIG7_TAUS, name=_short(config.teacher))
    record["sweep"] = [_floats(r) for r in rows]
    record["table"] = format_sweep_table([r for r in rows if r["tau"] in PRINTED_TAUS])
    label = "suggested" if suggestion is not None else "authors'"
    plot = out / DIAGNOSE_PLOT
    plot_temperature_sweep(rows, plot, marks={f"{label} τ1": marks[0], f"{label} τ2": marks[1]})
    record["plot"] = str(plot)
    (out / DIAGNOSE_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    record["json"] = str(out / DIAGNOSE_JSON)
    return record


def _floats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in stats.items()}


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(":", 1)[-1]
