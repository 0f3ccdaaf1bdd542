"""Building a teacher cache: the teacher run once over every view a training run will replay.

A sibling of ``fit``: the same configuration, data and transform, but no student network and no
distillation step. It builds a ``timm_kd.teacher.Teacher`` (adapted to the student's data config,
read from timm's registry) and writes through ``timm_kd.cache``'s store primitives; training from
the result is ``fit`` with ``--teacher-cache``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, set_seed
from timm.models import get_pretrained_cfg, parse_model_name

from .. import data as D
from ..cache import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TAIL_PRIOR_FILE,
    TAIL_PRIOR_MAX_CLASSES,
    ReplayedViews,
    ReplayTransform,
    ShardWriter,
    check_resume,
    check_top_k,
    collate_views,
    dataset_fingerprint,
    file_sha256,
    finalize_build,
    index_dtype,
    pending_shards,
    read_manifest,
    remove_cache,
    reopen_build,
    start_build,
    state_dict_sha256,
    teacher_files_sha256,
    verify_cache,
)
from ..models import read_class_map, resolve_model
from ..teacher import Teacher, create_teacher_model
from ..version import __version__
from .args import config_from_args
from .cache_args import cache_build_kwargs
from .checks import check_config
from .config import TrainConfig
from .setup import (
    _data_config_overrides,
    _load_data,
    _train_aug_kwargs,
    build_accelerator,
    teacher_data_config,
)

__all__ = ["build_teacher_cache", "build_cache_from_args"]


def build_cache_from_args(config: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Build the cache of parsed ``add_cache_args`` flags (``--cache-dir`` or ``--build-teacher-cache``)
    for the run ``config`` describes, and print (main process) what it holds and how to train from it."""
    cache_dir = getattr(args, "cache_dir", None) or args.build_teacher_cache
    manifest = build_teacher_cache(config, cache_dir, **cache_build_kwargs(args))
    if manifest.get("complete") and PartialState().is_main_process:
        print(
            f"teacher cache {cache_dir}: {manifest['num_rows']} views ({manifest['num_images']} images x "
            f"{manifest['num_views']}), top-{manifest['top_k']} logits, {manifest['bytes_per_view']:.1f} "
            f"bytes per view, teacher top-1 on the views {manifest['teacher_view_top1']:.2f}%"
        )
        print(f"train from it with: --teacher-cache {cache_dir} and the same data/transform flags")
    return manifest


def build_teacher_cache(
    config: TrainConfig | argparse.Namespace,
    cache_dir: str | os.PathLike,
    *,
    num_views: int = 10,
    top_k: int = 10,
    shard_size: int = 10_000,
    teacher: nn.Module | None = None,
    accelerator=None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the teacher once over ``num_views`` augmented views of every training image; store them.

    ``config`` is the ``TrainConfig`` (or ``add_train_args`` namespace) of the training run that will
    use the cache: data, transform, teacher and seed flags are read from it, so the cache holds
    exactly the views that run would draw. View ``v`` of image ``i`` is the transform under the seed
    ``timm_kd.data.sample_seed(seed, v, i)``, the seed online training uses in epoch ``v``: a cached
    run of ``epochs <= num_views`` epochs sees the online run's pixels and differs only by the top-k.
    ``teacher`` replaces ``config.teacher``'s network (its name still goes to the manifest).

    The layout is ``timm_kd.cache.store``'s. Process ``r`` of ``W`` (``accelerate launch``) builds
    the shards ``s % W == r``. Before the teacher runs, an existing cache in ``cache_dir`` is
    checked: one built with other settings (teacher weights included) is refused, or deleted with
    ``overwrite``; every written shard is verified against its record (size, SHA-256), and the
    damaged ones are named and rebuilt; finished intact shards are skipped (resume); a complete,
    intact cache is left as it is. Returns the manifest.
    """
    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    config = _checked_config(config, num_views, shard_size, teacher)
    acc = accelerator or build_accelerator(config)
    set_seed(config.seed)  # as fit does: a random (test) teacher gets the same weights in every process
    data = _load_data(config, acc)
    num_classes = data.num_classes
    check_top_k(top_k, num_classes)
    data_config = _student_data_config(config, num_classes)
    transform = D.create_timm_transform(
        data_config, is_training=True, dataset_name=config.dataset, **_train_aug_kwargs(config)
    )
    replay = ReplayTransform(transform)
    with acc.main_process_first():  # teacher weights fetched once, then read from the Hub cache
        frozen = _build_teacher(config, teacher, data_config, num_classes, verbose=acc.is_main_process)
    manifest = _manifest(config, data, data_config, replay, num_views, top_k, shard_size)
    manifest.update(_weights_fingerprint(config, teacher, frozen))
    root = Path(cache_dir)
    if _prepare_folder(acc, root, manifest, overwrite):  # before the teacher runs
        saved = read_manifest(root)
        _log(acc, f"teacher cache {root}: complete and intact ({saved['num_shards']} shards), nothing to do")
        return saved

    frozen.to(acc.device).eval()
    base = D.TransformedImageDataset(data.train, None, seed=config.seed, on_corrupt="error")
    _write_shards(config, acc, root, manifest, frozen, base, replay)
    acc.wait_for_everyone()
    if acc.is_main_process:
        finalize_build(root, manifest)
    acc.wait_for_everyone()
    return read_manifest(root)


def _weights_fingerprint(config: TrainConfig, teacher: nn.Module | None, frozen: Teacher) -> dict[str, Any]:
    """The manifest's fingerprint of the teacher's weights: the SHA-256 of their files (a checkpoint,
    a ``local-dir:`` folder), which a training run recomputes; else of the built network's state
    dict, which only a rebuild recomputes."""
    files = None if teacher is not None else teacher_files_sha256(config.teacher, config.teacher_checkpoint)
    if files is not None:
        return {"teacher_weights_sha256": files, "teacher_weights_source": "files"}
    network = getattr(frozen, "model", frozen)
    return {"teacher_weights_sha256": state_dict_sha256(network), "teacher_weights_source": "state_dict"}


def _prepare_folder(acc, root: Path, manifest: dict[str, Any], overwrite: bool) -> bool:
    """Make ``root`` ready for the build; True when it already holds this cache, complete and intact.

    Every process compares the settings (so all raise together on another cache); the main process
    verifies the written files, names and deletes the damaged ones, writes the manifest, and tells
    the others whether anything is left to build."""
    if overwrite and (root / MANIFEST_FILE).is_file():
        if acc.is_main_process:
            remove_cache(root)
            _log(acc, f"--overwrite: deleted the teacher cache in {root}")
        acc.wait_for_everyone()
    check_resume(root, manifest)  # another cache in root: every rank raises
    done = [False]
    if acc.is_main_process:
        done[0] = _verify_or_start(root, manifest)
    if acc.num_processes > 1:
        broadcast_object_list(done, from_process=0)
    return bool(done[0])


def _verify_or_start(root: Path, manifest: dict[str, Any]) -> bool:
    """Main process: True for a complete, intact cache; else start (or reopen) the build, after
    deleting the damaged shards named in a message."""
    if not (root / MANIFEST_FILE).is_file():
        start_build(root, manifest)
        return False
    saved = read_manifest(root)
    damaged = verify_cache(root, saved)
    if saved.get("complete") and not damaged:
        return True
    if damaged:
        shards = sorted(s for s in damaged if s is not None)
        what = f"rebuilding {len(shards)} shard(s)" if shards else "re-merging the tail prior"
        print(f"teacher cache {root} is damaged, {what}: {'; '.join(damaged.values())}", flush=True)
    reopen_build(root, manifest, sorted(s for s in damaged if s is not None))
    return False


def _checked_config(
    config: TrainConfig, num_views: int, shard_size: int, teacher: nn.Module | None
) -> TrainConfig:
    """Refuse what a build cannot do, before any data is read; the loss plays no part in a build."""
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be an int >= 1, got {num_views!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}.")
    if config.teacher is None and teacher is None:
        raise ValueError("cache-teacher needs a teacher: pass --teacher MODEL.")
    if config.streaming:
        raise ValueError(
            "the teacher cache indexes the rows of a map-style split; streaming datasets are not supported. "
            "Drop --streaming (download the split) to build a cache."
        )
    config = dataclasses.replace(config, method="kd", loss_kwargs={})
    check_config(config)
    return config


def _student_data_config(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The student's data config as ``fit`` resolves it, without building the student: a registry name
    is described by its pretrained config; any other source (``hf-hub:``, ``local-dir:``) is created
    once, without weights, to read its own."""
    source, _ = parse_model_name(config.student)
    cfg = None
    if source is None:
        try:
            cfg = get_pretrained_cfg(config.student)
        except RuntimeError:  # an unknown tag: timm.create_model below names the valid ones
            cfg = None
    if cfg is not None:
        model = nn.Module()
        model.pretrained_cfg = cfg.to_dict()  # what timm.create_model would give the student
    else:
        model = resolve_model(config.student, num_classes=num_classes, role="student")
    return D.resolve_model_data_config(model, dataset_name=config.dataset, **_data_config_overrides(config))


def _manifest(
    config: TrainConfig,
    data,
    data_config: dict[str, Any],
    replay: ReplayTransform,
    num_views: int,
    top_k: int,
    shard_size: int,
) -> dict[str, Any]:
    """The build settings ``manifest.json`` records (``complete: False`` until the build finishes)."""
    num_classes = data.num_classes
    with_prior = top_k < num_classes <= TAIL_PRIOR_MAX_CLASSES
    n = len(data.train)
    return {
        "format_version": FORMAT_VERSION,
        "teacher": config.teacher,
        "teacher_checkpoint": config.teacher_checkpoint,
        "teacher_checkpoint_sha256": file_sha256(config.teacher_checkpoint),
        "pretrained_teacher": bool(config.pretrained_teacher),
        "class_map": config.class_map,
        "dataset": config.dataset,
        "train_split": config.train_split,
        "embedded_kwargs": dict(config.embedded_kwargs),
        "dataset_fingerprint": dataset_fingerprint(data.train),
        "num_images": n,
        "num_classes": num_classes,
        "top_k": top_k,
        "num_views": num_views,
        "seed": config.seed,
        "transform": replay.describe(),
        "data_config": {
            k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
        },
        "shard_size": shard_size,
        "num_shards": max(1, math.ceil(n / shard_size)),
        "index_dtype": str(index_dtype(num_classes)).replace("torch.", ""),
        "tail_prior": TAIL_PRIOR_FILE if with_prior else None,
        "complete": False,
        "timm_kd_version": __version__,
    }


def _build_teacher(
    config: TrainConfig,
    teacher: nn.Module | None,
    data_config: dict[str, Any],
    num_classes: int,
    verbose: bool,
) -> Teacher:
    """The frozen teacher as ``fit`` runs it: called on the student's images (its data config),
    returning the student's classes (``--class-map``)."""
    class_map = read_class_map(config.class_map)
    in_chans = int(data_config["input_size"][0])
    model = create_teacher_model(
        teacher if teacher is not None else config.teacher,
        student_classes=num_classes,
        student_chans=in_chans,
        class_map=class_map,
        pretrained=config.pretrained_teacher,
        checkpoint=config.teacher_checkpoint if teacher is None else None,
    )
    return Teacher(
        model,
        input_mean=data_config.get("mean"),
        input_std=data_config.get("std"),
        num_classes=num_classes,
        in_chans=in_chans,
        class_map=class_map,
        data_config=teacher_data_config(config),  # the flags; else the weights' known config
        name=config.teacher if teacher is None else None,
        verbose=verbose,
    )


def _write_shards(
    config: TrainConfig,
    acc,
    root: Path,
    manifest: dict[str, Any],
    frozen: Teacher,
    base: D.TransformedImageDataset,
    replay: ReplayTransform,
) -> None:
    """This process' missing shards: their views (``ReplayedViews``) through the teacher, one
    ``ShardWriter`` per shard."""
    n, num_views, shard_size = manifest["num_images"], manifest["num_views"], manifest["shard_size"]
    num_shards = manifest["num_shards"]
    mine, todo = pending_shards(root, num_shards, acc.process_index, acc.num_processes)
    _log(
        acc,
        f"caching teacher {config.teacher}: {n} images x {num_views} views, top-{manifest['top_k']} of "
        f"{manifest['num_classes']} logits, {num_shards} shards ({len(mine) - len(todo)} of this process' "
        f"{len(mine)} already done)",
    )
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        items = [(i, v) for i in range(lo, hi) for v in range(num_views)]
        loader = torch.utils.data.DataLoader(
            ReplayedViews(base, replay, config.seed, items),
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            collate_fn=collate_views,
            pin_memory=acc.device.type == "cuda",
        )
        writer = ShardWriter(root, s, manifest)
        for batch in loader:
            images = batch.pop("pixel_values").to(acc.device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), acc.autocast():
                logits = frozen(images)
            writer.add(logits, batch)
        writer.write()
        _log(acc, f"shard {s + 1}/{num_shards} written ({hi - lo} images x {num_views} views)")


def _log(acc, msg: str) -> None:
    if acc.is_main_process:
        print(msg, flush=True)
