"""Decoding images and the corrupt-image policy.

An image value is what a ``datasets.Image(decode=False)`` column holds (``{"bytes", "path"}``)
or a PIL image. ``on_corrupt`` is ``"error"`` (raise, naming the index and file) or ``"skip"``
(leave the image out); ``verify_images`` applies it to a whole dataset before training, the
loaders (``pipeline``) to each sample during training.
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import datasets
from PIL import Image

__all__ = ["OnCorrupt", "decode_image", "describe_image", "undecoded", "verify_images"]

OnCorrupt = Literal["error", "skip"]

_DECODER = datasets.Image()


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


def verify_images(
    dataset: datasets.Dataset,
    *,
    on_corrupt: OnCorrupt = "error",
    num_proc: int | None = None,
    progress: bool = True,
) -> tuple[datasets.Dataset, list[tuple[int, str]]]:
    """Decode every image once, before training; return ``(dataset, corrupt)``.

    ``corrupt`` lists ``(index, "path: error")`` for images PIL cannot fully decode (truncated or
    corrupt files, unreadable paths). With ``on_corrupt="error"`` they raise ``ValueError`` naming
    the first files; with ``"skip"`` they are removed from the returned dataset and a warning gives
    the count. This costs one decode per image (``num_proc`` processes share the work); the loader's
    per-batch policy (``TransformedImageDataset``) catches the rest during training.
    """
    _check_on_corrupt(on_corrupt)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "verify_images needs a map-style datasets.Dataset (streaming data is checked per batch)"
        )
    raw = undecoded(dataset)

    def _scan(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        bad_index, bad_what = [], []
        for value, index in zip(batch["image"], indices):
            try:
                decode_image(value)
            except Exception as e:  # any decoder failure: corrupt
                bad_index.append(index)
                bad_what.append(f"{describe_image(value, index)}: {type(e).__name__}: {e}")
        return {"index": bad_index, "what": bad_what}

    if not progress:
        datasets.disable_progress_bars()
    try:
        found = raw.map(
            _scan,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            num_proc=num_proc,
            keep_in_memory=True,
            load_from_cache_file=False,
            desc="verifying images",
        )
    finally:
        if not progress:
            datasets.enable_progress_bars()
    # A clean dataset maps to zero rows, and datasets then drops the columns too.
    corrupt = list(zip(found["index"], found["what"])) if len(found) else []
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
