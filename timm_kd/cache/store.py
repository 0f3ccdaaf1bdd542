"""The cache on disk: its format, its manifest, and the primitives a build writes it with.

Layout of a cache folder (a ``datasets`` repository the Hub can host)::

    manifest.json                        build settings; ``complete`` once every shard is there
    README.md                            the ``datasets`` config (``load_dataset(folder)`` works)
    data/train-SSSSS-of-NNNNN.parquet    one row per (image, view), ordered by image then view
    prior/train-SSSSS-of-NNNNN.safetensors  each shard's ``TailPrior`` sums (merged at the end)
    tail_prior.safetensors               the ``[C, C]`` tail prior (``log_prior``), when the build has one

Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``, so row ``i * num_views + v`` of
the concatenated shards is view ``v`` of image ``i``. Every file is written to a temporary name and
renamed: a shard is either complete or absent, which is what lets a killed build resume. Building
is engine-side (``timm_kd.engine.build_teacher_cache``); it runs the teacher and writes through
``check_resume``, ``start_build``, ``pending_shards``, ``ShardWriter`` and ``finalize_build``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import data as D
from .logits import TailPrior, compress_logits, index_dtype

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "DATA_DIR",
    "PRIOR_DIR",
    "TAIL_PRIOR_FILE",
    "BUILD_KEYS",
    "TRAIN_KEYS",
    "TEACHER_KEYS",
    "shard_name",
    "cache_features",
    "dataset_fingerprint",
    "file_sha256",
    "read_manifest",
    "manifest_differences",
    "check_resume",
    "start_build",
    "pending_shards",
    "ShardWriter",
    "finalize_build",
    "load_tail_prior",
]

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
PRIOR_DIR = "prior"  # per-shard TailPrior sums, merged into TAIL_PRIOR_FILE when the build completes
TAIL_PRIOR_FILE = "tail_prior.safetensors"
#: manifest keys that must agree between a partial cache and the command resuming it
BUILD_KEYS = (
    "format_version",
    "teacher",
    "teacher_checkpoint_sha256",
    "pretrained_teacher",
    "class_map",
    "dataset",
    "train_split",
    "dataset_fingerprint",
    "num_images",
    "num_classes",
    "top_k",
    "num_views",
    "seed",
    "transform",
    "shard_size",
    "num_shards",
    "tail_prior",
)
#: manifest keys a training run must agree with (the rest describes how the cache was built)
TRAIN_KEYS = (
    "teacher",
    "teacher_checkpoint_sha256",
    "pretrained_teacher",
    "class_map",
    "dataset_fingerprint",
    "num_classes",
    "transform",
)
#: the batch columns a cached view carries for the teacher (``CachedTeacher.input_keys``)
TEACHER_KEYS = ("teacher_values", "teacher_indices", "teacher_lse", "teacher_tail_lse")


def shard_name(shard: int, num_shards: int) -> str:
    """``train-00003-of-00010.parquet``: the Hub's split-shard naming, found by ``load_dataset``."""
    return f"train-{shard:05d}-of-{num_shards:05d}.parquet"


def cache_features(top_k: int, num_classes: int):
    """The ``datasets.Features`` of a cache row (one augmented view of one image)."""
    idx = "int16" if index_dtype(num_classes) == torch.int16 else "int32"
    return datasets.Features(
        {
            "index": datasets.Value("int64"),  # row of the training split
            "view": datasets.Value("int32"),  # 0 .. num_views - 1; epoch e replays view e % num_views
            "label": datasets.Value("int64"),
            "values": datasets.Sequence(datasets.Value("float16"), length=top_k),
            "indices": datasets.Sequence(datasets.Value(idx), length=top_k),
            "lse": datasets.Value("float32"),
            "tail_lse": datasets.Value("float32"),
            "crop": datasets.Sequence(datasets.Value("int32"), length=4),
            "hflip": datasets.Value("bool"),
            "vflip": datasets.Value("bool"),
            "interpolation": datasets.Value("string"),
            "jitter": datasets.Sequence(datasets.Value("float32"), length=4),
            "jitter_order": datasets.Sequence(datasets.Value("int8"), length=4),
        }
    )


def dataset_fingerprint(dataset) -> str:
    """A content hash of a ``datasets.Dataset`` split: size, features, every label, and the encoded
    bytes (or path) of up to 64 evenly spaced images. Cheap on ImageNet, and it changes when the
    split's rows, order, labels or files change."""
    h = hashlib.sha256()
    n = len(dataset)
    h.update(f"{n}|{dataset.features}".encode())
    if "label" in dataset.column_names:
        labels = dataset.data.column("label").to_numpy(zero_copy_only=False)
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if "image" in dataset.column_names and n:
        raw = D.undecoded(dataset.select_columns(["image"]))
        for i in sorted({int(x) for x in np.linspace(0, n - 1, min(n, 64))}):
            value = raw[i]["image"]
            if isinstance(value, dict):
                h.update(value.get("bytes") or str(value.get("path")).encode())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:32]


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """The first 32 hex digits of a file's SHA-256 (None for no path): how a manifest names a checkpoint."""
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=list))
    os.replace(tmp, path)


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The cache's ``manifest.json``; ``FileNotFoundError`` naming the fix when there is none."""
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{cache_dir} is not a teacher cache (no {MANIFEST_FILE}). Build one with "
            f"`timm-kd cache-teacher --cache-dir {cache_dir} ...` (the same data and transform flags as "
            f"the training run)."
        )
    return json.loads(path.read_text())


def manifest_differences(saved: dict[str, Any], now: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """``"key: cache A, now B"`` for every key of ``keys`` on which two manifests disagree."""
    norm = lambda v: json.loads(json.dumps(v, default=list))  # noqa: E731 - tuples vs lists
    return [
        f"{k}: cache {saved.get(k)!r}, now {now.get(k)!r}"
        for k in keys
        if norm(saved.get(k)) != norm(now.get(k))
    ]


_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
---
# Teacher-output cache (timm-kd)

Top-{top_k} logits of teacher `{teacher}` for {num_views} augmented view(s) of each of the {num_images} images
of `{dataset}` [{train_split}], with each view's augmentation parameters. Built by `timm-kd cache-teacher`;
train from it with `--teacher-cache <this folder>`. Load it with
`datasets.load_dataset("<this folder>", split="train")`. `manifest.json` holds the build settings;
`tail_prior.safetensors` (when present) the teacher's mean log-probabilities per top-1 class, which shape
the dropped logits when they are rebuilt.
"""




# --------------------------------------------------------------------------------------------------
# Writing: what a build calls, in this order


def check_resume(root: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Compare ``manifest`` with the one already in ``root``, if any.

    Raises ``ValueError`` listing the ``BUILD_KEYS`` that differ (another cache lives there); returns
    the saved manifest when that build is complete (nothing to do), else None (start or resume).
    """
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        return None
    saved = read_manifest(root)
    diff = manifest_differences(saved, manifest, BUILD_KEYS)
    if diff:
        raise ValueError(
            f"{root} holds a teacher cache built with other settings ({'; '.join(diff)}). Pass another "
            f"--cache-dir, or delete {root} to rebuild it with these settings."
        )
    return saved if saved.get("complete") else None


def start_build(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Create the folders, delete what a killed writer left, write ``manifest.json`` and ``README.md``
    (one process only)."""
    root = Path(root)
    data_dir = root / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    (root / PRIOR_DIR).mkdir(exist_ok=True)
    for stale in [*data_dir.glob(".tmp-*"), *(root / PRIOR_DIR).glob(".tmp-*")]:
        stale.unlink()
    _write_json_atomic(root / MANIFEST_FILE, manifest)
    (root / "README.md").write_text(_README.format(**manifest))


def pending_shards(
    root: str | os.PathLike, num_shards: int, rank: int = 0, world_size: int = 1
) -> tuple[list[int], list[int]]:
    """``(mine, todo)``: the shards ``s % world_size == rank`` this process builds, and those of them not
    yet written."""
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if not (Path(root) / DATA_DIR / shard_name(s, num_shards)).is_file()]
    return mine, todo


class ShardWriter:
    """One shard's rows, gathered batch by batch, then written whole.

    ``add(logits, views)`` compresses a batch of ``[B, C]`` teacher logits to the manifest's top-k
    (and adds them to the shard's ``TailPrior`` when the cache has one); ``views`` holds the batch's
    other columns as lists (``index``, ``view``, ``label`` and the view parameters: what
    ``collate_views`` gives without ``pixel_values``). ``write()`` saves the prior sums, then the
    parquet file, each under a temporary name renamed when complete.
    """

    def __init__(self, root: str | os.PathLike, shard: int, manifest: dict[str, Any]):
        self.root = Path(root)
        self.path = self.root / DATA_DIR / shard_name(shard, manifest["num_shards"])
        self.top_k = int(manifest["top_k"])
        self.features = cache_features(self.top_k, int(manifest["num_classes"]))
        self.columns: dict[str, list] = {name: [] for name in self.features}
        self.prior = TailPrior(int(manifest["num_classes"])) if manifest.get("tail_prior") else None

    def add(self, logits: Tensor, views: dict[str, list]) -> None:
        packed = compress_logits(logits, self.top_k)
        if self.prior is not None:
            self.prior.add(logits)
        for key in ("values", "indices", "lse", "tail_lse"):
            self.columns[key] += packed[key].cpu().tolist()
        for key, value in views.items():
            self.columns[key] += list(value)

    def write(self) -> Path:
        if self.prior is not None:  # before the shard: a finished shard always has its prior sums
            _save_atomic(self.prior.state(), self.root / PRIOR_DIR / f"{self.path.stem}.safetensors")
        tmp = self.path.parent / f".tmp-{self.path.name}.{os.getpid()}"
        datasets.Dataset.from_dict(self.columns, features=self.features).to_parquet(str(tmp))
        os.replace(tmp, self.path)  # a shard is either complete or absent
        return self.path


def finalize_build(root: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check that every shard is there with the right rows; merge the tail prior; add statistics
    (``num_rows``, ``teacher_view_top1``, ``bytes``, ``bytes_per_view``, ``shards``); mark complete."""
    root = Path(root)
    files = [root / DATA_DIR / shard_name(s, manifest["num_shards"]) for s in range(manifest["num_shards"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"teacher cache {root}: shards missing after the build: {missing[:5]}")
    rows = correct = 0
    for f in files:
        table = pq.read_table(f, columns=["label", "indices"])
        labels = table.column("label").to_numpy()
        top1 = table.column("indices").combine_chunks().flatten().to_numpy()[:: manifest["top_k"]]
        correct += int((top1 == labels).sum())
        rows += table.num_rows
    expected = manifest["num_images"] * manifest["num_views"]
    if rows != expected:
        raise RuntimeError(f"teacher cache {root}: {rows} rows, expected {expected}; delete it and rebuild.")
    if manifest.get("tail_prior"):
        prior = None
        for f in files:
            part = TailPrior.from_state(_load_safetensors(root / PRIOR_DIR / f"{f.stem}.safetensors"))
            prior = part if prior is None else prior.merge(part)
        _save_atomic({"log_prior": prior.table()}, root / TAIL_PRIOR_FILE)
    size = sum(f.stat().st_size for f in files)
    manifest = {
        **manifest,
        "complete": True,
        "num_rows": rows,
        "teacher_view_top1": 100.0 * correct / max(rows, 1),
        "bytes": size,
        "bytes_per_view": size / max(rows, 1),
        "shards": [f.name for f in files],
    }
    _write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest


def load_tail_prior(root: str | os.PathLike, manifest: dict[str, Any]) -> Tensor | None:
    """The cache's ``[C, C]`` tail prior, or None when the manifest names none."""
    if not manifest.get("tail_prior"):
        return None
    root = Path(root)
    prior = _load_safetensors(root / manifest["tail_prior"])["log_prior"]
    c = int(manifest["num_classes"])
    if prior.shape != (c, c):
        raise ValueError(
            f"teacher cache {root}: {manifest['tail_prior']} has shape {tuple(prior.shape)}, expected "
            f"[{c}, {c}]; delete the cache and rebuild it."
        )
    return prior


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    """``safetensors`` file written to a temporary name, then renamed: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise RuntimeError(
            f"teacher cache {path.parent.parent}: {path.name} is missing (a shard written by an older "
            f"timm-kd?); delete the cache folder and rebuild it."
        )
    return load_file(str(path))
