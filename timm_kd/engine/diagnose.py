"""A teacher's logits on a sample of its data, and the diagnostics and rankings computed from them.

``timm-kd diagnose`` calls ``diagnose_teacher``: what ``timm_kd.diagnostics.suggest_ats_temperatures``
needs (teacher logits and labels), collected the way ``fit`` would run the teacher, then the
statistics, the suggestion, the sweep plot and a JSON record. ``timm-kd rank-teachers`` calls
``rank_teacher_candidates``: the logits of several candidate teachers on a sample of the training
split and on held-out images, ranked by ``timm_kd.ranking.teacher_score``.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate.utils import set_seed

from .. import data as D
from ..diagnostics import (
    ATS_AUTHORS_TAUS,
    FIG7_TAUS,
    TeacherAtChanceError,
    format_sweep_table,
    plot_temperature_sweep,
    suggest_ats_temperatures,
    temperature_sweep,
    wrong_class_stats,
)
from ..ranking import SCORE_DEFINITION, TEACHER_STATS_TAU, plot_ranking, rank_teachers
from .cache_teacher import _build_teacher, _student_data_config
from .checks import check_config, check_model_name
from .config import TrainConfig
from .setup import _load_data, build_accelerator
from .summary import STUDENT_DIR

__all__ = [
    "collect_teacher_logits",
    "diagnose_teacher",
    "rank_teacher_candidates",
    "DIAGNOSE_JSON",
    "DIAGNOSE_PLOT",
    "RANK_JSON",
    "RANK_PLOT",
]

DIAGNOSE_JSON = "diagnose.json"
DIAGNOSE_PLOT = "temperature_sweep.png"
RANK_JSON = "rank_teachers.json"
RANK_PLOT = "rank_teachers.png"
#: the splits ``collect_teacher_logits`` reads: the training split, the held-out (evaluation) one
SPLITS = ("train", "val")
#: the sweep temperatures of the printed table (the JSON record and the plot hold the whole sweep)
PRINTED_TAUS = (0.5, 1.0, 2.0, 4.0, 8.0)


def collect_teacher_logits(
    config: TrainConfig, num_samples: int = 2000, *, batch_size: int = 64, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, C] float32, labels [N])`` of ``config.teacher`` on the first ``num_samples``
    of a seeded shuffle of one split (all of it when smaller), on CPU.

    ``split="train"``: the training split (``--train-split``; a streamed one is read in its order,
    not shuffled). ``split="val"``: the held-out images ``fit`` evaluates on (``--val-split``, or
    the ``--val-fraction`` held out of the training split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_count("--num-samples", num_samples)
    config = _teacher_config(config)
    check_config(config)
    acc = build_accelerator(config)
    set_seed(config.seed)
    data = _load_data(config, acc)
    return _collect(config, acc, data, {split: num_samples}, batch_size)[split]


def _teacher_config(config: TrainConfig) -> TrainConfig:
    """The config whose images are prepared for the teacher: its data config stands in for the
    student's, and no loss is built."""
    if config.teacher is None:
        raise ValueError("diagnose needs a teacher: pass --teacher MODEL (a timm name, hf-hub:, local-dir:).")
    check_model_name(config.teacher, "teacher")  # named as the teacher, not as the student it stands in for
    return dataclasses.replace(config, student=config.teacher, method="kd", loss_kwargs={})


def _check_count(flag: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{flag} must be an integer >= 1, got {n!r}")


def _collect(
    config: TrainConfig, acc, data, samples: Mapping[str, int], batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Build ``config.teacher`` once (``config`` from ``_teacher_config``) and run it over
    ``samples[split]`` images of each split of the loaded ``data``: ``{split: (logits, labels)}``."""
    data_config = _student_data_config(config, data.num_classes)
    frozen = _build_teacher(config, None, data_config, data.num_classes, verbose=True).to(acc.device).eval()
    transform = D.create_timm_transform(data_config, is_training=False, dataset_name=config.dataset)
    out = {}
    for split, num in samples.items():
        images = data.train if split == "train" else data.val
        if split == "val" or not config.streaming:  # the held-out split is never streamed
            if len(images) > num:
                images = images.shuffle(seed=config.seed).select(range(num))
        loader = D.create_loader(
            D.apply_transform(images, transform, seed=config.seed, on_corrupt=config.on_corrupt),
            batch_size,
            num_workers=config.num_workers,
        )
        logits, labels, seen = [], [], 0
        for batch in loader:
            logits.append(frozen(batch["pixel_values"].to(acc.device)).float().cpu())
            labels.append(batch["label"])
            seen += len(batch["label"])
            if seen >= num:
                break
        out[split] = torch.cat(logits)[:num], torch.cat(labels)[:num]
    return out


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
    marks = tuple(suggestion) if suggestion is not None else ATS_AUTHORS_TAUS
    record["suggestion"] = None if suggestion is None else dataclasses.asdict(suggestion)
    if suggestion is not None:
        record["stats_suggested"] = _floats(wrong_class_stats(logits, labels, *marks))
    record["stats_authors"] = _floats(wrong_class_stats(logits, labels, *ATS_AUTHORS_TAUS))
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


def rank_teacher_candidates(
    config: TrainConfig,
    teachers: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    num_samples: int = 2000,
    num_heldout: int = 2000,
    batch_size: int = 64,
    tau: float = TEACHER_STATS_TAU,
) -> list[dict[str, Any]]:
    """Rank candidate teachers of one task by ``timm_kd.ranking.teacher_score``, best first.

    Each of ``teachers`` is what ``--teacher`` takes (a timm name with its pretrained tag,
    ``hf-hub:org/name``, ``local-dir:FOLDER``), a folder (a timm-format model folder, or a run
    folder: its ``student/``), or ``ARCH=FILE`` (the architecture's name and a weights file, as
    ``--teacher ARCH --teacher-checkpoint FILE``); ``config.teacher`` and
    ``config.teacher_checkpoint`` are not used (the latter is refused: it would apply to every
    candidate). Every candidate is checked before any data is read. The data is loaded once; each
    teacher then runs once over ``num_samples`` images of a seeded shuffle of the training split
    and once over ``num_heldout`` held-out images (``collect_teacher_logits``' two splits), its
    images prepared with its own data config. ``timm_kd.ranking.rank_teachers`` turns the logits
    into rows (statistics, score, rank, suggested method), also written, with the dataset, splits,
    sample sizes, ``tau`` and the score's definition, to ``output_dir/rank_teachers.json``; the
    plot of score against held-out top-1 goes to ``output_dir/rank_teachers.png``. Returns the rows.
    """
    if isinstance(teachers, str) or not teachers:
        raise ValueError("rank-teachers needs a list of candidate teachers: --teachers A B ...")
    if config.teacher_checkpoint is not None:
        raise ValueError(
            "--teacher-checkpoint would apply to every candidate: give each candidate its weights file "
            "as ARCH=FILE (e.g. --teachers resnet18=r18.safetensors resnet50=r50.safetensors)"
        )
    _check_count("--num-samples", num_samples)
    _check_count("--num-heldout", num_heldout)
    candidates: dict[str, TrainConfig] = {}
    for spec in teachers:
        if spec in candidates:
            raise ValueError(f"teacher {spec!r} is given twice")
        candidates[spec] = _teacher_config(_candidate_config(config, spec))
        check_config(candidates[spec])  # a bad name or file stops here, naming the candidate
    first = next(iter(candidates.values()))
    acc = build_accelerator(first)
    set_seed(config.seed)
    data = _load_data(first, acc)  # the splits and the labels are the same for every candidate
    logits = {}
    for spec, cfg in candidates.items():
        got = _collect(cfg, acc, data, {"train": num_samples, "val": num_heldout}, batch_size)
        (z, y), (zh, yh) = got["train"], got["val"]
        logits[spec] = {"train_logits": z, "train_target": y, "heldout_logits": zh, "heldout_target": yh}
    rows = rank_teachers(logits, tau=tau)
    for r in rows:  # what `timm-kd train` takes to train from this candidate
        cfg = candidates[r["name"]]
        r["teacher"], r["teacher_checkpoint"] = cfg.teacher, cfg.teacher_checkpoint
    sizes = {"num_samples": num_samples, "num_heldout": num_heldout, "num_classes": data.num_classes}
    _save_ranking(config, rows, Path(output_dir), list(candidates), tau, sizes)
    return rows


def _save_ranking(
    config: TrainConfig, rows: list[dict[str, Any]], out: Path, teachers: list[str], tau: float, sizes: dict
) -> None:
    """``rank_teachers.png`` and ``rank_teachers.json`` (``rank_teacher_candidates``) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plot_ranking(rows, out / RANK_PLOT, title=f"Candidate teachers on {config.dataset}")
    record = {
        "dataset": config.dataset,
        "split": config.train_split,
        "heldout_split": _heldout_name(config),
        **sizes,
        "tau": float(tau),
        "score": SCORE_DEFINITION,
        "teachers": teachers,
        "rows": rows,
        "plot": str(out / RANK_PLOT),
    }
    (out / RANK_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _candidate_config(config: TrainConfig, spec: str) -> TrainConfig:
    """``config`` with one candidate as its teacher (``rank_teacher_candidates``' forms)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a candidate teacher must be a non-empty string, got {spec!r}")
    arch, sep, weights = spec.partition("=")
    if sep and arch and not any(c in arch for c in ":/\\"):  # ARCH=FILE
        return dataclasses.replace(config, teacher=arch, teacher_checkpoint=weights)
    folder = Path(spec)
    if ":" not in spec and folder.is_dir() and not timm.is_model(spec):  # a model or run folder
        run_student = folder / STUDENT_DIR
        folder = run_student if (run_student / "config.json").is_file() else folder
        return dataclasses.replace(config, teacher=f"local-dir:{folder}", teacher_checkpoint=None)
    return dataclasses.replace(config, teacher=spec, teacher_checkpoint=None)


def _heldout_name(config: TrainConfig) -> str:
    return f"{config.val_fraction} of {config.train_split}" if config.val_fraction else config.val_split
