"""Decoding images and the corrupt-image policy.

An image value is what a ``datasets.Image(decode=False)`` column holds (``{"bytes", "path"}``)
or a PIL image. ``on_corrupt`` is ``"error"`` (raise, naming the index and file) or ``"skip"``
(leave the image out); ``verify_images`` applies it to a whole dataset before training (once per
version of the data: a record remembers the result), the loaders (``pipeline``) to each sample
during training.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from typing import Any, Literal

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

__all__ = ["OnCorrupt", "decode_image", "default_record_dir", "describe_image", "undecoded", "verify_images"]

OnCorrupt = Literal["error", "skip"]

_DECODER = datasets.Image()
_RECORD_VERSION = 1
_logger = logging.getLogger(__name__)


def describe_image(value: Any, index: int) -> str:
    """``"image 7 (train/dog/x.jpg)"``: how messages name an image (the path only when it has one)."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"image {index}" + (f" ({path})" if path else "")


def decode_image(value: Any) -> Image.Image:
    """``{"bytes", "path"}`` (or a PIL image) -> fully decoded RGB PIL image; raises on corrupt data."""
    image = value if isinstance(value, Image.Image) else _DECODER.decode_example(value)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_on_corrupt(on_corrupt: str) -> None:
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")


def _corrupt_error(description: str, error: BaseException) -> ValueError:
    return ValueError(
        f"cannot decode {description}: {type(error).__name__}: {error}. Replace or delete the file, or pass "
        f"on_corrupt='skip' (--on-corrupt skip) to leave corrupt images out"
    )


def undecoded(dataset: datasets.Dataset | datasets.IterableDataset):
    """``dataset`` with its ``"image"`` column cast to ``datasets.Image(decode=False)`` (if it decodes).

    Rows then hold ``{"bytes", "path"}``, which ``decode_image`` turns into a PIL image: decoding
    happens where the corrupt-image policy applies.
    """
    feature = (dataset.features or {}).get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column("image", datasets.Image(decode=False))
    return dataset


def _record_key(raw: datasets.Dataset) -> str | None:
    """What a verification is valid for: the dataset's fingerprint, its rows, and each image file's stat.

    The fingerprint covers the Arrow data (images stored as bytes, the rows a view selects); the
    size and modification time of every file an image refers to by path cover the files, which
    the fingerprint does not read. None when ``datasets`` caching is off (fingerprints are then
    random, so a record could never be found again).
    """
    fingerprint = getattr(raw, "_fingerprint", None)  # datasets' content hash of the Arrow data
    if not fingerprint or not datasets.is_caching_enabled():
        return None
    digest = hashlib.sha256(f"{_RECORD_VERSION}:{fingerprint}:{len(raw)}".encode())
    column = raw.with_format("arrow")["image"]
    if pa.types.is_struct(column.type):
        paths = pc.struct_field(column, "path").to_pylist()
        inline = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        for path, has_bytes in zip(paths, inline):
            if path is None or has_bytes:
                continue
            try:
                st = os.stat(path)
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:32]


def default_record_dir() -> str:
    """Where verification records live by default: ``timm_kd_verified/`` in the datasets cache."""
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "timm_kd_verified")


def _read_record(record_dir: str | None, key: str | None, rows: int) -> list[tuple[int, str]] | None:
    if record_dir is None or key is None:
        return None
    try:
        with open(os.path.join(record_dir, f"{key}.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if record.get("rows") != rows:
        return None
    return [(int(i), str(what)) for i, what in record.get("corrupt", [])]


def _write_record(record_dir: str | None, key: str | None, rows: int, corrupt: list[tuple[int, str]]) -> None:
    if record_dir is None or key is None:
        return
    try:
        os.makedirs(record_dir, exist_ok=True)
        path = os.path.join(record_dir, f"{key}.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows, "corrupt": [list(c) for c in corrupt]}, f)
        os.replace(tmp, path)  # readers see the whole record or none
    except OSError as e:  # a read-only cache: verify again next time
        _logger.warning("could not store the image verification record in %s: %s", record_dir, e)


def _auto_num_proc(rows: int) -> int | None:
    """Processes for a scan: this process's CPUs, one per 1,000 images at most (None: in-process)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cpus, rows // 1000)
    return n if n > 1 else None


def _scan(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
    bad_index, bad_what = [], []
    for value, index in zip(batch["image"], indices):
        try:
            decode_image(value)
        except Exception as e:  # any decoder failure: corrupt
            bad_index.append(index)
            bad_what.append(f"{describe_image(value, index)}: {type(e).__name__}: {e}")
    return {"index": bad_index, "what": bad_what}


def _decode_all(raw: datasets.Dataset, num_proc: int | None, progress: bool) -> list[tuple[int, str]]:
    if not progress:
        datasets.disable_progress_bars()
    try:
        found = raw.map(
            _scan,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            num_proc=num_proc if num_proc and num_proc > 1 else None,  # 1: in this process, no pool
            keep_in_memory=True,
            load_from_cache_file=False,
            desc="verifying images",
        )
    finally:
        if not progress:
            datasets.enable_progress_bars()
    # A clean dataset maps to zero rows, and datasets then drops the columns too.
    return list(zip(found["index"], found["what"])) if len(found) else []


def verify_images(
    dataset: datasets.Dataset,
    *,
    on_corrupt: OnCorrupt = "error",
    num_proc: int | None = None,
    progress: bool = True,
    record_dir: str | None = "",
) -> tuple[datasets.Dataset, list[tuple[int, str]]]:
    """Decode every image once, before training, and remember it; return ``(dataset, corrupt)``.

    ``corrupt`` lists ``(index, "path: error")`` for images PIL cannot fully decode (truncated or
    corrupt files, unreadable paths). With ``on_corrupt="error"`` they raise ``ValueError`` naming
    the first files; with ``"skip"`` they are removed from the returned dataset and a warning gives
    the count.

    The scan costs one decode per image, shared by ``num_proc`` processes (default: one per CPU,
    at most one per 1,000 images). Its result is stored as a small JSON record in ``record_dir``
    (default ``""``: ``default_record_dir()``, in the datasets cache; ``None``: no record), keyed on
    the dataset's fingerprint, its row count and the path, size and modification time of every
    image file. The next call on the same data (the next launch, a resume, a cache build, another
    rank after the main one) reads the record and decodes nothing; a changed, added or removed
    file changes the key and the scan runs again. The loader's per-sample policy
    (``TransformedImageDataset``) catches anything that breaks later.
    """
    _check_on_corrupt(on_corrupt)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "verify_images needs a map-style datasets.Dataset (streaming data is checked per batch)"
        )
    raw = undecoded(dataset)
    record_dir = default_record_dir() if record_dir == "" else record_dir
    key = _record_key(raw) if record_dir is not None else None
    corrupt = _read_record(record_dir, key, len(raw))
    if corrupt is not None:
        _logger.info("images of %d rows verified before (record %s): not decoded again", len(raw), key)
    else:
        corrupt = _decode_all(raw, _auto_num_proc(len(raw)) if num_proc is None else num_proc, progress)
        _write_record(record_dir, key, len(raw), corrupt)
    if not corrupt:
        return dataset, []
    if on_corrupt == "error":
        shown = "; ".join(what for _, what in corrupt[:5])
        raise ValueError(
            f"{len(corrupt)} of {len(dataset)} images cannot be decoded: {shown}"
            f"{' ...' if len(corrupt) > 5 else ''}. Replace or delete them, or pass on_corrupt='skip' "
            f"(--on-corrupt skip) to leave them out"
        )
    bad = {i for i, _ in corrupt}
    warnings.warn(f"skipping {len(corrupt)} corrupt image(s) of {len(dataset)}: {corrupt[0][1]}")
    return dataset.select([i for i in range(len(dataset)) if i not in bad]), corrupt
