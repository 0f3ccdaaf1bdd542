"""Reading a cache: its rows, the training set that replays its views, and ``CachedTeacher``.

``TeacherCache(folder)`` opens a complete cache; ``cache.check(...)`` refuses one that does not match
a training run; ``cache.dataset(...)`` replays its views (pixels and the stored ``teacher_*``
columns, ``TEACHER_KEYS``); ``CachedTeacher(cache)`` turns those columns back into ``[B, C]``
teacher logits, the teacher ``DistillWrapper`` runs for a cached run.
"""

from __future__ import annotations

import bisect
import itertools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn
from torch import Tensor

from .. import data as D
from .logits import TAIL_MODES, expand_logits, index_dtype
from .replay import ReplayTransform
from .store import (
    DATA_DIR,
    FORMAT_VERSION,
    MANIFEST_FILE,
    TEACHER_KEYS,
    TRAIN_KEYS,
    dataset_fingerprint,
    file_sha256,
    load_tail_prior,
    manifest_differences,
    read_manifest,
    shard_name,
    teacher_files_sha256,
    verify_cache,
)

__all__ = ["TeacherCache", "CachedViewDataset", "collate_cached", "CachedTeacher"]


class _ArrowRows:
    """Fast row reads from a ``datasets.Dataset``'s memory-mapped Arrow table.

    ``ds[i]`` formats a row through several layers of ``datasets``; here the table's record batches
    (zero-copy, every column chunked alike) are located once per row, and their numeric columns read
    from zero-copy numpy views (made on a batch's first use, so the memory stays the page cache's),
    bool/string columns as pyarrow scalars. Rows are the ``datasets`` rows. Pickles as the dataset
    (by path), so DataLoader workers rebuild their own views.
    """

    def __init__(self, dataset):
        if getattr(dataset, "_indices", None) is not None:
            raise ValueError("_ArrowRows reads table rows directly; flatten_indices() the dataset first")
        self.dataset = dataset
        self._batches: list | None = None
        self._starts: list[int] = []
        self._views: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "_batches": None, "_starts": [], "_views": {}}

    def __len__(self) -> int:
        return len(self.dataset)

    def _batch_views(self, b: int) -> dict[str, Any]:
        """Batch ``b``'s columns: numpy views (numbers, fixed-size lists of numbers) or Arrow arrays."""
        views = self._views.get(b)
        if views is None:
            views = {}
            batch = self._batches[b]
            for name, column in zip(batch.schema.names, batch.columns):
                kind = column.type
                if pa.types.is_fixed_size_list(kind) and (
                    pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
                ):
                    views[name] = column.flatten().to_numpy(zero_copy_only=True).reshape(-1, kind.list_size)
                elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
                    views[name] = column.to_numpy(zero_copy_only=True)
                else:
                    views[name] = column  # bool (bit-packed) and strings: per-row scalars
            self._views[b] = views
        return views

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.dataset):
            raise IndexError(f"row {i} out of range for {len(self.dataset)} rows")
        if self._batches is None:
            self._batches = self.dataset.data.table.to_batches()
            self._starts = list(itertools.accumulate((b.num_rows for b in self._batches), initial=0))
        b = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[b]
        return {
            name: np.array(view[j]) if isinstance(view, np.ndarray) else view[j].as_py()
            for name, view in self._batch_views(b).items()
        }


class TeacherCache:
    """An opened, complete teacher cache: its manifest and its rows as a memory-mapped ``datasets.Dataset``.

    ``TeacherCache(dir)`` refuses an incomplete build (rerun ``cache-teacher`` to resume it) and a
    damaged one (a shard or the tail prior that does not match the manifest's ``files``, each named).
    ``check(...)`` refuses a cache that does not match the training run; ``dataset(...)`` gives the
    training set that replays the stored views.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        rerun = (
            f"the command that built it (`timm-kd cache-teacher --cache-dir {self.root} ...` or a recipe's "
            f"`--build-teacher-cache {self.root}`, with the same flags)"
        )
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"teacher cache {self.root} has format version {m.get('format_version')}, this timm-kd reads "
                f"{FORMAT_VERSION}; rebuild it: rerun {rerun} with --overwrite."
            )
        if not m.get("complete"):
            missing = _missing_work(self.root, m)
            raise ValueError(f"teacher cache {self.root} is incomplete: {missing}. Rerun {rerun}.")
        damaged = verify_cache(self.root, m, prior_parts=False)
        if damaged:
            raise ValueError(
                f"teacher cache {self.root} is damaged: {'; '.join(damaged.values())}. Rerun {rerun}: it "
                f"checks every shard and rebuilds only the damaged ones."
            )
        files = [str(self.root / DATA_DIR / name) for name in m["shards"]]
        try:
            rows = datasets.load_dataset("parquet", data_files=files, split="train")
        except Exception as e:  # pyarrow/datasets errors on a file that passed the check (changed since)
            raise ValueError(
                f"teacher cache {self.root}: its shards in {self.root / DATA_DIR} cannot be read "
                f"({type(e).__name__}: {e}). Rerun {rerun}: it rebuilds the damaged shards."
            ) from None
        self.rows = rows.with_format("numpy")
        if len(self.rows) != m["num_images"] * m["num_views"]:
            raise ValueError(
                f"teacher cache {self.root}: {len(self.rows)} rows, expected "
                f"{m['num_images'] * m['num_views']}. Rerun {rerun} with --overwrite."
            )
        self.reader = _ArrowRows(self.rows)  # what training reads rows through (``self.rows[i]`` is slow)
        self.num_views = int(m["num_views"])
        self.num_classes = int(m["num_classes"])
        self.top_k = int(m["top_k"])
        #: ``[C, C]`` tail prior (``TailPrior.table()``), or None (flat tail): caches of C > 4096 or k = C
        self.tail_prior = load_tail_prior(self.root, m)

    def check(self, config, train_dataset, num_classes: int, transform: Callable) -> None:
        """Raise ``ValueError`` listing every difference between the cache and this training run."""
        weights = self.manifest.get("teacher_weights_sha256")
        if self.manifest.get("teacher_weights_source") == "files":  # else only a rebuild can recompute it
            weights = teacher_files_sha256(config.teacher, config.teacher_checkpoint)
        now = {
            "teacher": config.teacher,
            "teacher_checkpoint_sha256": file_sha256(config.teacher_checkpoint),
            "teacher_weights_sha256": weights,
            "pretrained_teacher": bool(config.pretrained_teacher),
            "class_map": config.class_map,
            "dataset_fingerprint": dataset_fingerprint(train_dataset),
            "num_classes": num_classes,
            "transform": ReplayTransform(transform).describe(),
        }
        diff = manifest_differences(self.manifest, now, TRAIN_KEYS)
        if any(d.startswith("teacher_weights_sha256:") for d in diff):
            diff.append(f"the teacher's weight files ({config.teacher_checkpoint or config.teacher}) changed")
        if diff:
            raise ValueError(
                f"teacher cache {self.root} does not match this run: {'; '.join(diff)}. Rebuild the cache "
                f"with `timm-kd cache-teacher` and this run's flags, or train with the flags the cache was "
                f"built with (see {self.root / MANIFEST_FILE})."
            )

        if config.epochs > self.num_views:
            warnings.warn(
                f"training for {config.epochs} epochs from a cache of {self.num_views} view(s) per image: "
                f"epoch e replays view e % {self.num_views}, so views repeat. Build more views "
                f"(--num-views {config.epochs}) for as many distinct views as online training."
            )
        if config.seed != self.manifest.get("seed"):
            warnings.warn(
                f"the cache's views were drawn with seed {self.manifest.get('seed')}, this run uses "
                f"--seed {config.seed}: the views are still valid augmentations, but not the ones an online "
                f"run with this seed would draw."
            )

    def dataset(self, train_dataset, transform: Callable, *, seed: int = 0) -> CachedViewDataset:
        """The training set replaying the stored views (collate with ``collate_cached``)."""
        return CachedViewDataset(train_dataset, self, transform, seed=seed)

    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_cached(batch)


def _missing_work(root: Path, manifest: dict[str, Any]) -> str:
    """What an interrupted build left undone: the shards not written, or its last step."""
    n = int(manifest.get("num_shards") or 0)
    missing = [shard_name(s, n) for s in range(n) if not (root / DATA_DIR / shard_name(s, n)).is_file()]
    if missing:
        listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return f"{n - len(missing)} of {n} shards written, {listed} not yet"
    last = "merging the tail prior, " if manifest.get("tail_prior") else ""
    return (
        f"all {n} shards are written, but the build stopped in its last step ({last}recording every "
        f"file's size and SHA-256 and marking {MANIFEST_FILE} complete)"
    )


class CachedViewDataset(torch.utils.data.Dataset):
    """Training samples replayed from a teacher cache.

    ``ds[(i, epoch)]`` (what ``SeededSampler`` yields) reads row ``i * num_views + epoch % num_views``
    of the cache, decodes image ``i``, applies the stored crop/flip/jitter with ``ReplayTransform``
    (the pixels the teacher saw) and returns ``{"pixel_values", "label", "index"}`` plus the view's
    stored ``TEACHER_KEYS`` (``teacher_values`` fp16, ``teacher_indices`` int16/int32, ``teacher_lse``
    and ``teacher_tail_lse`` fp32). Collate with ``collate_cached``.
    """

    def __init__(self, train_dataset, cache: TeacherCache, transform: Callable, *, seed: int = 0):
        self.base = D.TransformedImageDataset(train_dataset, None, seed=seed)
        self.cache = cache
        self.replay = ReplayTransform(transform)
        self.index_dtype = index_dtype(cache.num_classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        view = epoch % self.cache.num_views
        row = self.cache.reader[index * self.cache.num_views + view]
        if int(row["index"]) != index or int(row["view"]) != view:
            raise ValueError(
                f"teacher cache {self.cache.root}: row {index * self.cache.num_views + view} holds image "
                f"{int(row['index'])} view {int(row['view'])}, expected image {index} view {view}; the cache "
                f"is damaged: delete it and rebuild."
            )
        item = self.base.dataset[index]
        params = {
            "crop": row["crop"].tolist(),
            "hflip": bool(row["hflip"]),
            "vflip": bool(row["vflip"]),
            "interpolation": str(row["interpolation"]),
            "jitter": row["jitter"].tolist(),
            "jitter_order": row["jitter_order"].tolist(),
        }
        pixels, _ = self.replay.replay(D.decode_image(item["image"]), params)
        return {
            "pixel_values": pixels,
            "label": int(item["label"]),
            "index": index,
            # datasets' numpy format widens small ints: back to the stored dtypes (fp16, int16/int32)
            "teacher_values": torch.as_tensor(row["values"]).to(torch.float16),
            "teacher_indices": torch.as_tensor(row["indices"]).to(self.index_dtype),
            "teacher_lse": torch.tensor(float(row["lse"]), dtype=torch.float32),
            "teacher_tail_lse": torch.tensor(float(row["tail_lse"]), dtype=torch.float32),
        }


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``timm_kd.data.collate_images`` plus the stacked ``teacher_*`` tensors."""
    out = D.collate_images(batch)
    for key in TEACHER_KEYS:
        out[key] = torch.stack([item[key] for item in batch])
    return out


class CachedTeacher(nn.Module):
    """Teacher logits rebuilt from a teacher cache's stored columns, which ride in the batch.

    The teacher of a cached run, in place of a ``timm_kd.teacher.Teacher``::

        wrapper = DistillWrapper(student, CachedTeacher(cache_dir), loss="kd")
        out = wrapper(images, target, epoch=e, **{k: batch[k] for k in wrapper.teacher_input_keys})

    ``forward(images, *, teacher_values, teacher_indices, teacher_lse=None, teacher_tail_lse=None)``
    returns ``expand_logits(values, indices, C, lse, tail_lse, prior)``: ``[B, C]`` float32 logits of
    the teacher on the views the batch replays (``images`` is not read: the logits were computed on
    these pixels when the cache was built). ``tail="prior"`` shapes the dropped logits with the
    cache's tail prior when it has one, ``tail="flat"`` spreads their mass uniformly. No network and
    no parameters: the prior is a non-persistent float32 buffer (it follows ``.to(device)``, stays
    float32 under ``.half()``, and is not in any ``state_dict``). Always in eval mode.

    Attributes: ``cache`` (the ``TeacherCache``; None for ``from_prior``), ``num_classes``, ``name``
    (the teacher's name from the manifest), ``tail``, ``input_keys`` (the batch columns it reads).
    """

    input_keys: tuple[str, ...] = TEACHER_KEYS

    def __init__(self, cache: TeacherCache | str | os.PathLike, *, tail: str = "prior"):
        super().__init__()
        if not isinstance(cache, TeacherCache):
            cache = TeacherCache(cache)
        self._setup(cache, cache.num_classes, cache.tail_prior, str(cache.manifest.get("teacher")), tail)

    @classmethod
    def from_prior(
        cls, num_classes: int, tail_prior: Tensor | None = None, *, name: str = "cached", tail: str = "prior"
    ) -> CachedTeacher:
        """A cached teacher without a cache folder: ``num_classes`` classes and an optional ``[C, C]``
        tail prior (benchmarks and tests; the columns still come with each call)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(None, num_classes, tail_prior, name, tail)
        return self

    def _setup(self, cache, num_classes: int, prior: Tensor | None, name: str, tail: str) -> None:
        if tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}.")
        num_classes = int(num_classes)
        if prior is not None and tuple(prior.shape) != (num_classes, num_classes):
            raise ValueError(
                f"tail_prior must be [C, C] = [{num_classes}, {num_classes}], got {tuple(prior.shape)}."
            )
        self.cache = cache
        self.num_classes = num_classes
        self.name = name
        self.tail = tail
        prior = prior.float() if prior is not None and tail == "prior" else None
        self.register_buffer("tail_prior", prior, persistent=False)
        self.training = False

    def train(self, mode: bool = True) -> CachedTeacher:
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        prior = self.tail_prior
        out = super()._apply(fn, *args, **kwargs)
        if prior is not None and self.tail_prior.dtype != torch.float32:  # keep the log-probabilities exact
            self.tail_prior = prior.to(device=self.tail_prior.device)
        return out

    def forward(
        self,
        images: Tensor | None = None,
        *,
        teacher_values: Tensor,
        teacher_indices: Tensor,
        teacher_lse: Tensor | None = None,
        teacher_tail_lse: Tensor | None = None,
    ) -> Tensor:
        """``[B, C]`` float32 teacher logits rebuilt from the batch's cache columns."""
        return expand_logits(
            teacher_values, teacher_indices, self.num_classes, teacher_lse, teacher_tail_lse, self.tail_prior
        )

    def extra_repr(self) -> str:
        where = f"cache={str(self.cache.root)!r}, " if self.cache is not None else ""
        prior = "prior" if self.tail_prior is not None else "flat"
        return f"name={self.name!r}, {where}num_classes={self.num_classes}, tail={prior}"
