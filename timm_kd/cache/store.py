"""The cache on disk: its format, its manifest, and the primitives a build writes it with.

Layout of a cache folder (a ``datasets`` repository the Hub can host)::

    manifest.json                        build settings; ``complete`` and ``files`` once every shard is there
    README.md                            the ``datasets`` config (``load_dataset(folder)`` works)
    data/train-SSSSS-of-NNNNN.parquet    one row per (image, view), ordered by image then view
    prior/train-SSSSS-of-NNNNN.safetensors  each shard's ``TailPrior`` sums (merged at the end)
    records/train-SSSSS-of-NNNNN.json    each shard's size, SHA-256 and rows (and its prior part's)
    tail_prior.safetensors               the ``[C, C]`` tail prior (``log_prior``), when the build has one

Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``, so row ``i * num_views + v`` of
the concatenated shards is view ``v`` of image ``i``. Every file is written to a temporary name and
renamed: a shard is either complete or absent, which is what lets a killed build resume.

Integrity: a shard's record (size, SHA-256, rows) is written before the shard is renamed into
place; ``finalize_build`` checks every shard against its record and copies the records of every
file (shards, prior parts, the tail prior) into the manifest's ``files``. ``verify_cache`` checks a
cache against them (a complete cache against its manifest, a partial one against the records),
naming each damaged file; training refuses a damaged cache, and rerunning the build rebuilds only
the damaged shards. The manifest also fingerprints the teacher's weights
(``teacher_weights_sha256``): the SHA-256 of its weight files (a ``--teacher-checkpoint`` file, the
weight files of a ``local-dir:`` folder), which training recomputes, or, for weights that come
from elsewhere (a pretrained tag, ``hf-hub:``, random, a module), of its state dict's bytes, which
only a rebuild can recompute (``teacher_weights_source``: ``"files"`` or ``"state_dict"``).

Building is engine-side (``timm_kd.engine.build_teacher_cache``); it runs the teacher and writes
through ``check_resume``, ``start_build``, ``pending_shards``, ``ShardWriter`` and ``finalize_build``
(with ``verify_cache``, ``reopen_build`` and ``remove_cache`` for repairs and ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from .. import files as file_io
from .logits import TailPrior, compress_logits, index_dtype

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "DATA_DIR",
    "PRIOR_DIR",
    "RECORDS_DIR",
    "TAIL_PRIOR_FILE",
    "BUILD_KEYS",
    "TRAIN_KEYS",
    "TEACHER_KEYS",
    "shard_name",
    "cache_features",
    "dataset_fingerprint",
    "file_sha256",
    "teacher_files_sha256",
    "state_dict_sha256",
    "verify_cache",
    "reopen_build",
    "remove_cache",
    "read_manifest",
    "manifest_differences",
    "check_resume",
    "start_build",
    "pending_shards",
    "ShardWriter",
    "finalize_build",
    "load_tail_prior",
]

FORMAT_VERSION = 2  # 2: shard records, the manifest's ``files`` and the teacher weights' fingerprint
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
PRIOR_DIR = "prior"  # per-shard TailPrior sums, merged into TAIL_PRIOR_FILE when the build completes
RECORDS_DIR = "records"  # per-shard size/sha256/rows, written before the shard is renamed into place
TAIL_PRIOR_FILE = "tail_prior.safetensors"
#: file suffixes that hold a local-dir: model's weights (hashed into ``teacher_weights_sha256``)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")
#: manifest keys that must agree between a partial cache and the command resuming it
BUILD_KEYS = (
    "format_version",
    "teacher",
    "teacher_checkpoint_sha256",
    "teacher_weights_sha256",
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
#: manifest keys a training run must agree with (the rest describes how the cache was built);
#: ``teacher_weights_sha256`` is compared when its source is ``"files"`` (see ``TeacherCache.check``)
TRAIN_KEYS = (
    "teacher",
    "teacher_checkpoint_sha256",
    "teacher_weights_sha256",
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
    return file_io.file_sha256(path)[:32] if path else None


def teacher_files_sha256(teacher: str | None, checkpoint: str | os.PathLike | None) -> str | None:
    """A fingerprint of the files a teacher's weights are read from: the ``checkpoint`` file, else
    every weight file (``WEIGHT_SUFFIXES``) of a ``local-dir:`` folder, by name and content (32 hex
    digits). None when the weights come from elsewhere (a pretrained tag, ``hf-hub:``, random)."""
    if checkpoint:
        paths = [Path(checkpoint)]
    elif teacher and teacher.startswith("local-dir:"):
        folder = Path(teacher.split(":", 1)[1])
        if not folder.is_dir():
            return None
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    else:
        return None
    if not paths:
        return None
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return h.hexdigest()[:32]


def state_dict_sha256(module: torch.nn.Module) -> str:
    """A fingerprint of a module's weights: every state-dict entry's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
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
            f"cache folder, or add --overwrite to replace it with a cache built with these settings."
        )
    return saved if saved.get("complete") else None


def start_build(root: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Create the folders, delete what a killed writer left, write ``manifest.json`` and ``README.md``
    (one process only)."""
    root = Path(root)
    data_dir = root / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    (root / PRIOR_DIR).mkdir(exist_ok=True)
    (root / RECORDS_DIR).mkdir(exist_ok=True)
    stale = [*data_dir.glob(".tmp-*"), *(root / PRIOR_DIR).glob(".tmp-*")]
    for path in stale + list((root / RECORDS_DIR).glob(".*.tmp-*")):
        path.unlink()
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
        prior = None
        if self.prior is not None:  # before the shard: a finished shard always has its prior sums
            part = self.root / PRIOR_DIR / f"{self.path.stem}.safetensors"
            _save_atomic(self.prior.state(), part)
            prior = _file_record(part)
        tmp = self.path.parent / f".tmp-{self.path.name}.{os.getpid()}"
        datasets.Dataset.from_dict(self.columns, features=self.features).to_parquet(str(tmp))
        record = {**_file_record(tmp), "rows": len(self.columns["index"]), "prior": prior}
        (self.root / RECORDS_DIR).mkdir(exist_ok=True)
        _write_json_atomic(_record_path(self.root, self.path.name), record)  # before the shard appears
        os.replace(tmp, self.path)  # a shard is either complete or absent
        return self.path


def _record_path(root: Path, shard: str) -> Path:
    return root / RECORDS_DIR / f"{Path(shard).stem}.json"


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _read_record(root: Path, shard: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(root, shard).read_text())
    except (OSError, ValueError):
        return None


def _file_problem(path: Path, expected: dict[str, Any] | None, label: str) -> str | None:
    """Why ``path`` does not match its record (``{"bytes", "sha256"}``), or None when it does."""
    if not path.is_file():
        return f"{label} is missing"
    if not isinstance(expected, dict):
        return f"{label} has no record of its size and SHA-256"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{label} has {size} bytes, {expected.get('bytes')} were written (truncated or replaced)"
    if file_sha256(path) != expected.get("sha256"):
        return f"{label} does not have the SHA-256 recorded when it was written (corrupted or replaced)"
    return None


def verify_cache(
    root: str | os.PathLike, manifest: dict[str, Any], *, prior_parts: bool = True
) -> dict[int | None, str]:
    """What is damaged in a cache: shard number (None: the merged tail prior) -> the reason, naming
    the file. A complete cache is checked against its manifest's ``files`` (every shard must be
    there); a partial one's written shards against their records (shards not yet written are work
    left, not damage). ``prior_parts``: also check each shard's ``TailPrior`` part (a rebuild needs
    them; training reads only the merged prior). Reads every file once (SHA-256)."""
    root = Path(root)
    complete = bool(manifest.get("complete"))
    files = manifest.get("files") or {}
    with_prior = bool(manifest.get("tail_prior"))
    problems: dict[int | None, str] = {}
    for s in range(int(manifest["num_shards"])):
        name = shard_name(s, int(manifest["num_shards"]))
        shard, part = root / DATA_DIR / name, root / PRIOR_DIR / f"{Path(name).stem}.safetensors"
        if complete:
            expected, expected_part = files.get(f"{DATA_DIR}/{name}"), files.get(f"{PRIOR_DIR}/{part.name}")
        elif not shard.is_file():
            continue
        else:
            record = _read_record(root, name) or {}
            expected, expected_part = record or None, record.get("prior")
        reason = _file_problem(shard, expected, f"{DATA_DIR}/{name}")
        if reason is None and with_prior and prior_parts:
            reason = _file_problem(part, expected_part, f"{PRIOR_DIR}/{part.name}")
        if reason is not None:
            problems[s] = reason
    if complete and with_prior:
        name = manifest["tail_prior"]
        reason = _file_problem(root / name, files.get(name), name)
        if reason is not None:
            problems[None] = reason
    return problems


def reopen_build(root: str | os.PathLike, manifest: dict[str, Any], shards: Sequence[int]) -> None:
    """Delete ``shards`` (each with its prior part and record) and the merged tail prior, and reopen
    the build (``start_build``: ``complete: False``), so that the build writes them again (one process)."""
    root = Path(root)
    names = [shard_name(s, int(manifest["num_shards"])) for s in shards]
    doomed = [root / TAIL_PRIOR_FILE]
    for name in names:
        stem = Path(name).stem
        doomed += [root / DATA_DIR / name, root / PRIOR_DIR / f"{stem}.safetensors", _record_path(root, name)]
    for path in doomed:
        path.unlink(missing_ok=True)
    start_build(root, manifest)


def remove_cache(root: str | os.PathLike) -> None:
    """Delete the teacher cache in ``root``: the files and folders a build writes, nothing else
    (``--overwrite``). Refuses a folder without ``manifest.json``: it holds no cache."""
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{root} holds no teacher cache (no {MANIFEST_FILE}); nothing was deleted.")
    for name in (DATA_DIR, PRIOR_DIR, RECORDS_DIR):
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (TAIL_PRIOR_FILE, "README.md", MANIFEST_FILE):
        (root / name).unlink(missing_ok=True)


def finalize_build(root: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check that every shard is there, matches its record and has the right rows; merge the tail
    prior; add statistics (``num_rows``, ``teacher_view_top1``, ``bytes``, ``bytes_per_view``,
    ``shards``) and every file's record (``files``: size and SHA-256); mark complete."""
    root = Path(root)
    files = [root / DATA_DIR / shard_name(s, manifest["num_shards"]) for s in range(manifest["num_shards"])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(
            f"teacher cache {root}: shards missing after the build: {missing[:5]}; rerun the same command "
            f"to build them."
        )
    damaged = verify_cache(root, {**manifest, "complete": False})
    if damaged:
        raise RuntimeError(
            f"teacher cache {root}: {'; '.join(damaged.values())}. Rerun the same command: it rebuilds the "
            f"damaged shards."
        )
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
            part = TailPrior.from_state(_load_safetensors(root, f"{PRIOR_DIR}/{f.stem}.safetensors"))
            prior = part if prior is None else prior.merge(part)
        _save_atomic({"log_prior": prior.table()}, root / TAIL_PRIOR_FILE)
    size = sum(f.stat().st_size for f in files)
    records = {}
    for f in files:
        record = _read_record(root, f.name)
        records[f"{DATA_DIR}/{f.name}"] = {"bytes": record["bytes"], "sha256": record["sha256"]}
        if record.get("prior"):
            records[f"{PRIOR_DIR}/{f.stem}.safetensors"] = record["prior"]
    if manifest.get("tail_prior"):
        records[manifest["tail_prior"]] = _file_record(root / manifest["tail_prior"])
    manifest = {
        **manifest,
        "complete": True,
        "num_rows": rows,
        "teacher_view_top1": 100.0 * correct / max(rows, 1),
        "bytes": size,
        "bytes_per_view": size / max(rows, 1),
        "shards": [f.name for f in files],
        "files": records,
    }
    _write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest


def load_tail_prior(root: str | os.PathLike, manifest: dict[str, Any]) -> Tensor | None:
    """The cache's ``[C, C]`` tail prior, or None when the manifest names none."""
    if not manifest.get("tail_prior"):
        return None
    root = Path(root)
    prior = _load_safetensors(root, manifest["tail_prior"])["log_prior"]
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


def _load_safetensors(root: Path, name: str) -> dict[str, Tensor]:
    """``root / name`` (a file of the cache in ``root``), its absence or damage named with the fix."""
    path = root / name
    fix = (
        f"Rerun the command that built the cache (it rebuilds the damaged parts), or delete the cache "
        f"folder {root} and build it again."
    )
    if not path.is_file():
        raise ValueError(f"teacher cache {root}: {name} is missing. {fix}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise ValueError(f"teacher cache {root}: {name} cannot be read ({e}). {fix}") from None
