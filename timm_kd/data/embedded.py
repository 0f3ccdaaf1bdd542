"""The embedded dataset: a real 100-class image task built from scikit-learn's handwritten digits.

Each image shows a two-digit number ``"00"``..``"99"`` made of two real 8x8 digit images, so the
whole pipeline runs anywhere without a download (``pip install 'timm-kd[demo]'``).
``load_image_dataset("embedded", split)`` returns it; ``docs/data.md`` lists what timm models
reach on it.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_CLASS_NAMES",
    "EMBEDDED_TRANSFORM_KWARGS",
    "load_digits",
    "embedded_source_pools",
    "make_embedded_dataset",
]

EMBEDDED_NAME = "embedded"
EMBEDDED_CLASS_NAMES = [f"{i:02d}" for i in range(100)]

# timm training-transform settings for the embedded dataset: a mirrored digit is not a digit
# (no flips), the crops stay large so both digits remain visible, and grey digits need no colour
# jitter.
EMBEDDED_TRANSFORM_KWARGS: dict[str, Any] = {
    "hflip": 0.0,
    "scale": (0.7, 1.0),
    "ratio": (0.8, 1.25),
    "color_jitter": 0.0,
}

_DIGITS_ROWS = 1797
_DEMO_HINT = "install the demo extra: pip install 'timm-kd[demo]' (or pip install scikit-learn)"


@functools.lru_cache(maxsize=1)
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit images scikit-learn ships, as (float32 [N,8,8] in [0,1], int64 [N]).

    Reads the csv that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn
    (and scipy with it); falls back to ``sklearn.datasets.load_digits`` if the file is not where expected. The
    arrays are read-only.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError(f"the embedded dataset is built from scikit-learn's bundled digits: {_DEMO_HINT}")
    images = target = None
    for location in spec.submodule_search_locations or []:
        path = os.path.join(location, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            try:
                table = np.loadtxt(path, delimiter=",")
            except (OSError, ValueError):
                break
            if table.shape == (_DIGITS_ROWS, 65):
                images, target = table[:, :64].reshape(-1, 8, 8) / 16.0, table[:, 64]
            break
    if images is None:
        import sklearn.datasets

        digits = sklearn.datasets.load_digits()
        images, target = digits.images / 16.0, digits.target
    images = np.ascontiguousarray(images, dtype=np.float32)
    target = np.asarray(target, dtype=np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_check_seed(seed), *stream]))


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def embedded_source_pools(seed: int = 0, num_source_digits: int | None = 150) -> dict[str, np.ndarray]:
    """Indices into ``sklearn.datasets.load_digits()`` used by each split of the embedded dataset.

    Returns ``{"train": int array, "test": int array}``: the 1,797 digit images are split per digit
    (stratified) into a train pool (about 2/3, 1,198 images) and a test pool (about 1/3, 599),
    deterministically from ``seed``; the train pool is then cut to ``num_source_digits`` images,
    an equal share per digit (``None`` = all). A larger ``num_source_digits`` gives a superset of a
    smaller one. The two arrays never share an index.
    """
    _, target = load_digits()
    rng = _rng(seed, 0)
    train_by_digit, test_by_digit = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(target == digit))
        n_test = int(round(len(idx) / 3))
        test_by_digit.append(idx[:n_test])
        train_by_digit.append(idx[n_test:])
    available = sum(len(t) for t in train_by_digit)
    if num_source_digits is not None:
        if (
            not isinstance(num_source_digits, (int, np.integer))
            or isinstance(num_source_digits, bool)
            or not 10 <= num_source_digits <= available
        ):
            raise ValueError(
                f"num_source_digits must be an int from 10 (one image per digit) to {available} (the "
                f"whole train pool), or None for all; got {num_source_digits!r}"
            )
        share, extra = divmod(int(num_source_digits), 10)
        train_by_digit = [t[: share + (d < extra)] for d, t in enumerate(train_by_digit)]
    return {"train": np.concatenate(train_by_digit), "test": np.concatenate(test_by_digit)}


@functools.lru_cache(maxsize=4)
def _upscaled_digits(size: int) -> np.ndarray:
    """All 1,797 digits resized (bilinear) to ``size`` x ``size``, float32 in [0, 1]."""
    images, _ = load_digits()
    up = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(images))[:, None], size=(size, size), mode="bilinear", align_corners=False
    )
    out = up[:, 0].clamp_(0, 1).numpy()
    out.setflags(write=False)
    return out


def _distort(digits: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random affine distortion of each digit: rotation up to +-20 deg, scale 1 +- 0.25, shear
    +-0.3, all times ``strength`` (bilinear resampling, zero padding)."""
    n = len(digits)
    angle = np.deg2rad(20.0) * strength * rng.uniform(-1, 1, n)
    scale = 1.0 + 0.25 * strength * rng.uniform(-1, 1, n)
    shear = 0.3 * strength * rng.uniform(-1, 1, n)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # theta maps output to input coords
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    batch = torch.from_numpy(np.ascontiguousarray(digits))[:, None]
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta), list(batch.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(batch, grid, mode="bilinear", align_corners=False)
    return out[:, 0].clamp_(0, 1).numpy()


def _encode_png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()




def make_embedded_dataset(
    split: str = "train",
    *,
    seed: int = 0,
    num_source_digits: int | None = 150,
    noise: float = 0.3,
    max_shift: int = 2,
    distortion: float = 0.0,
    image_size: int = 32,
    num_train: int = 10_000,
    num_test: int = 2_000,
    with_sources: bool = False,
) -> datasets.Dataset:
    """A real, small, 100-class image task built from scikit-learn's bundled handwritten digits.

    Each image shows a two-digit number ``"00"``..``"99"``: two real 8x8 digit images (from the UCI
    "Optical Recognition of Handwritten Digits" set, Alpaydin & Kaynak 1998, as shipped by
    scikit-learn) upscaled to ``image_size/2`` pixels, side by side, light ink on a dark
    ``image_size`` x ``image_size`` RGB canvas. Train and test pairs are drawn from disjoint digit
    images (``embedded_source_pools``), so the test split measures generalisation to unseen
    handwriting. Classes are balanced. Like CIFAR-100, classes share structure ("38" looks like
    "88" and "39"), which is what a teacher's soft labels carry.

    Deterministic from ``seed``: the same arguments give the same images, byte for byte. Use the
    same ``seed`` for both splits (that is what keeps them disjoint).

    Difficulty knobs: ``num_source_digits`` (how many digit images the training pairs are drawn
    from; ``None`` = the whole train pool of 1,198), ``noise`` (std of Gaussian pixel noise on
    intensities in [0, 1], fresh for every image of both splits), ``max_shift`` (each digit is
    placed at a random offset of up to this many pixels, both splits) and ``distortion`` (random
    rotation, scale and shear of each digit, 0 = none, 1 = up to 20 degrees, +-25 %, +-0.3).
    With every training digit and clean images (``num_source_digits=None, noise=0,
    max_shift=0``) the task leaves little to distil; ``docs/data.md`` gives the accuracies timm
    models reach at each setting.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: seed of the pool split, the pairing, the noise and the shifts.
        num_source_digits: train pool size, from 10 to 1,198, or ``None`` for all.
        noise: pixel noise std (>= 0).
        max_shift: max random offset of each digit in pixels (>= 0).
        distortion: strength of the random affine distortion of each digit, in [0, 1].
        image_size: side of the square image, even, >= 16 (32 is CIFAR's size; timm ResNets with
            total stride 32 end at 1x1 there, and timm's ``test_*`` models run at any size >= 32).
        num_train / num_test: number of images in the split.
        with_sources: add int columns ``"source_left"``/``"source_right"`` (row indices into
            ``load_digits()``), for tests and audits.

    Returns:
        ``datasets.Dataset`` with ``"image"`` (``datasets.Image(mode="RGB")``: decodes to RGB PIL
        images) and ``"label"`` (``ClassLabel`` with names ``"00"``..``"99"``).
    """
    num = num_train if split == "train" else num_test
    _check_embedded_args(split, noise, max_shift, distortion, image_size, num)
    pool = embedded_source_pools(seed, num_source_digits)[split]
    rng = _rng(seed, 1 if split == "train" else 2)
    labels, left, right, shifts = _draw_pairs(pool, num, max_shift, rng)
    pixels = _render(left, right, shifts, image_size, max_shift, distortion, noise, rng)

    data: dict[str, list] = {
        "image": [{"bytes": _encode_png(p), "path": None} for p in pixels],
        "label": labels.tolist(),
    }
    features = {
        "image": datasets.Image(mode="RGB"),
        "label": datasets.ClassLabel(names=EMBEDDED_CLASS_NAMES),
    }
    if with_sources:
        data["source_left"], data["source_right"] = left.tolist(), right.tolist()
        features["source_left"] = features["source_right"] = datasets.Value("int64")
    features = datasets.Features(features)
    info = datasets.DatasetInfo(
        features=features,
        description=(
            f"timm-kd embedded dataset: two-digit numbers 00-99 from scikit-learn's handwritten digits "
            f"(seed={seed}, num_source_digits={num_source_digits}, noise={noise}, max_shift={max_shift}, "
            f"distortion={distortion}, image_size={image_size})"
        ),
        citation=(
            "Alpaydin, E. and Kaynak, C. (1998). Optical Recognition of Handwritten Digits. "
            "UCI Machine Learning Repository. https://doi.org/10.24432/C50P49"
        ),
        license="CC BY 4.0 (UCI source data)",
    )
    return datasets.Dataset.from_dict(
        data, features=features, info=info, split=datasets.NamedSplit(split)
    )


def _check_embedded_args(
    split: str, noise: float, max_shift: int, distortion: float, image_size: int, num: int
) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"the embedded dataset has splits 'train' and 'test', got split={split!r}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if not (isinstance(max_shift, int) and max_shift >= 0):
        raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
    if not (isinstance(distortion, (int, float)) and 0 <= distortion <= 1):
        raise ValueError(f"distortion must be a number in [0, 1], got {distortion!r}")
    if not (isinstance(image_size, int) and image_size >= 16 and image_size % 2 == 0):
        raise ValueError(f"image_size must be an even int >= 16, got {image_size!r}")
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f"num_{split} must be a positive int, got {num!r}")


def _draw_pairs(
    pool: np.ndarray, num: int, max_shift: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Balanced labels, the source digit rows of each image's two digits, and their offsets."""
    _, target = load_digits()
    by_digit = [pool[target[pool] == d] for d in range(10)]
    labels = rng.permutation(np.arange(num) % 100)
    left = np.empty(num, dtype=np.int64)
    right = np.empty(num, dtype=np.int64)
    for digit in range(10):
        for out, which in ((left, labels // 10), (right, labels % 10)):
            rows = np.flatnonzero(which == digit)
            out[rows] = by_digit[digit][rng.integers(0, len(by_digit[digit]), size=len(rows))]
    shifts = rng.integers(-max_shift, max_shift + 1, size=(num, 4))
    return labels, left, right, shifts


def _render(
    left: np.ndarray,
    right: np.ndarray,
    shifts: np.ndarray,
    image_size: int,
    max_shift: int,
    distortion: float,
    noise: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """uint8 [N, image_size, image_size] grey images: the two digits side by side, then noise."""
    num = len(left)
    half = image_size // 2
    digits = _upscaled_digits(half)
    left_digits, right_digits = digits[left], digits[right]
    if distortion > 0:
        left_digits = _distort(left_digits, distortion, rng)
        right_digits = _distort(right_digits, distortion, rng)
    pad = max_shift
    canvas = np.zeros((num, image_size + 2 * pad, image_size + 2 * pad), dtype=np.float32)
    top = pad + (image_size - half) // 2
    for i in range(num):
        dy, dx = top + shifts[i, 0], pad + shifts[i, 1]
        canvas[i, dy : dy + half, dx : dx + half] = left_digits[i]
        dy, dx = top + shifts[i, 2], pad + half + shifts[i, 3]
        region = canvas[i, dy : dy + half, dx : dx + half]
        np.maximum(region, right_digits[i], out=region)
    canvas = canvas[:, pad : pad + image_size, pad : pad + image_size]
    if noise > 0:
        canvas = canvas + rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
