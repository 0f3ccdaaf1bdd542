"""Helpers for the data tests: real image files written with PIL."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image


def write_image(path: str, seed: int, size: tuple[int, int] = (24, 20)) -> None:
    """A real random RGB image, PNG or JPEG by extension."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def write_truncated_jpeg(path: str, seed: int = 0) -> None:
    """A JPEG cut in half: PIL opens it (the header is intact) but cannot decode the pixels."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def write_image_folder(
    root: str,
    classes: dict[str, int],
    splits: tuple[str, ...] = ("train", "validation"),
) -> dict[str, int]:
    """``root/<split>/<class>/<i>.png|jpg`` (alternating formats); returns images per split."""
    counts = {}
    seed = 0
    for split in splits:
        counts[split] = 0
        for name, n in classes.items():
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                write_image(os.path.join(root, split, name, f"{i}.{ext}"), seed)
                seed += 1
                counts[split] += 1
    return counts
