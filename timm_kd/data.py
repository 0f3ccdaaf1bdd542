"""Data for timm-kd: HF datasets, local image folders, the embedded digits dataset, timm transforms.

Every loader here returns an HF ``datasets.Dataset`` (or ``IterableDataset`` when streaming) whose
columns are ``"image"`` (``datasets.Image``) and ``"label"`` (int, ``ClassLabel`` when names are
known), whatever the source called them. ``apply_transform`` turns it into a torch dataset of
``{"pixel_values": Tensor[C, H, W], "label": int, "index": int}`` and ``create_loader`` batches it
reproducibly from a seed::

    train = load_image_dataset("embedded", "train")            # or "imagenet-1k", "./my_images"
    check_labels(train, num_classes=student.num_classes)       # before any training
    tf = create_timm_transform(student, is_training=True, dataset_name="embedded")
    loader = create_loader(apply_transform(train, tf, seed=0), batch_size=128, shuffle=True, seed=0)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)                        # Accelerate's prepared loader does this
        for batch in loader:
            batch["pixel_values"], batch["label"], batch["num_skipped"]

The embedded dataset (``make_embedded_dataset``) is a real 100-class task built from the
handwritten digits scikit-learn ships, so the whole pipeline runs anywhere without a download.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import logging
import os
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import datasets
import numpy as np
import torch

__all__ = [
    "EMBEDDED_NAME",
    "EMBEDDED_CLASS_NAMES",
    "EMBEDDED_TRANSFORM_KWARGS",
    "make_embedded_dataset",
    "embedded_source_pools",
    "load_image_dataset",
    "get_label_names",
    "get_num_classes",
    "check_labels",
    "verify_images",
    "apply_transform",
    "TransformedImageDataset",
    "SeededSampler",
    "collate_images",
    "create_loader",
    "resolve_model_data_config",
    "create_timm_transform",
]

_logger = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_CLASS_NAMES = [f"{i:02d}" for i in range(100)]
OnCorrupt = Literal["error", "skip"]

# timm training-transform settings for the embedded dataset: a mirrored digit is not a digit
# (no flips), the crops stay large so both digits remain visible, and colour jitter on grey
# digits costs 1 ms per image for nothing.
EMBEDDED_TRANSFORM_KWARGS: dict[str, Any] = {
    "hflip": 0.0,
    "scale": (0.7, 1.0),
    "ratio": (0.8, 1.25),
    "color_jitter": 0.0,
}

# ---------------------------------------------------------------------------------------------
# The embedded dataset
# ---------------------------------------------------------------------------------------------

_DIGITS_ROWS = 1797
_DEMO_HINT = "install the demo extra: pip install 'timm-kd[demo]' (or pip install scikit-learn)"


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digit images scikit-learn ships, as (float32 [N,8,8] in [0,1], int64 [N]).

    Reads the csv that ``sklearn.datasets.load_digits`` reads, without importing scikit-learn
    (which costs ~1.5 s: scipy); falls back to ``load_digits`` if the file is not where expected.
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
        from sklearn.datasets import load_digits

        digits = load_digits()
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
    _, target = _load_digits()
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
    images, _ = _load_digits()
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
    from PIL import Image

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

    What the default gives (150 source digits, noise 0.3, shift 2, no distortion, 32x32, 10,000
    train / 2,000 test images). With ``recipes/quickstart.py``'s schedule (3 epochs, AdamW, batch
    64, 2-core CPU, seed 0): teacher ``resnet10t`` (4.97M params) 84.2 % top-1, student
    ``test_resnet`` (0.38M) trained alone 74.4 %, the same student distilled with ATS 79.3 %.
    Each model trained alone with cross-entropy for 10 epochs (AdamW, lr 2e-3, cosine, batch 128,
    timm transforms, seed 0; ``benchmarks/embedded_dataset.py``, one CPU thread on a 2-core
    machine shared with other jobs, so the times were taken under load)::

        model               params   top-1    train time
        test_convnext       0.21 M   71.8 %    205 s
        test_efficientnet   0.12 M   82.6 %    473 s
        test_resnet         0.38 M   84.7 %    492 s
        resnet10t           4.97 M   87.7 %    782 s

    The gap to the teacher is widest early in training and for the weaker student architectures.
    With every training digit and clean images (``num_source_digits=None, noise=0,
    max_shift=0``) both test_resnet and resnet10t reach 99.0 %: nothing is left to distil.
    ``distortion=1`` makes it harder still (test_resnet 77.5 %, resnet10t 80.8 %, test_convnext
    54.2 %).

    Building the default train split takes 1.2-1.8 s (test: 0.3 s) on the loaded 2-core machine.

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
    num = num_train if split == "train" else num_test
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f"num_{split} must be a positive int, got {num!r}")
    pools = embedded_source_pools(seed, num_source_digits)
    pool = pools[split]
    _, target = _load_digits()
    by_digit = [pool[target[pool] == d] for d in range(10)]

    rng = _rng(seed, 1 if split == "train" else 2)
    labels = rng.permutation(np.arange(num) % 100)
    left = np.empty(num, dtype=np.int64)
    right = np.empty(num, dtype=np.int64)
    for digit in range(10):
        for out, which in ((left, labels // 10), (right, labels % 10)):
            rows = np.flatnonzero(which == digit)
            out[rows] = by_digit[digit][rng.integers(0, len(by_digit[digit]), size=len(rows))]
    shifts = rng.integers(-max_shift, max_shift + 1, size=(num, 4))

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
    pixels = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)

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


# ---------------------------------------------------------------------------------------------
# Loading: "embedded", a local folder, or a Hub id
# ---------------------------------------------------------------------------------------------

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "pixel_values")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "cls", "target", "targets", "category")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}


def _looks_like_path(name: str) -> bool:
    """A string meant as a local path rather than a Hub id (``org/name`` has at most one slash)."""
    return (
        name.startswith(("/", ".", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith("/")
        or (len(name) > 1 and name[1] == ":")  # C:\...
    )


def _pick_split(available: Sequence[str], split: str, source: str) -> str:
    available = [str(s) for s in available]
    if split in available:
        return split
    alias = _SPLIT_ALIASES.get(split)
    if alias in available:
        return alias
    reverse = [k for k, v in _SPLIT_ALIASES.items() if v == split and k in available]
    if reverse:
        return reverse[0]
    raise ValueError(
        f"dataset {source!r} has no split {split!r}; available splits: {', '.join(available) or 'none'}. "
        f"Pass one of them (--train-split / --val-split in the recipes)."
    )


def _load_local(
    path: str, split: str, streaming: bool, cache_dir: str | None, load_kwargs: dict[str, Any]
) -> datasets.Dataset | datasets.IterableDataset:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
        os.path.join(path, "state.json")
    ):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[_pick_split(list(loaded), split, path)]
        return loaded.to_iterable_dataset() if streaming else loaded
    try:
        loaded = datasets.load_dataset(
            "imagefolder", data_dir=path, cache_dir=cache_dir, streaming=streaming, **load_kwargs
        )
    except FileNotFoundError as e:
        raise ValueError(
            f"found no images in {path!r} ({e}). An image folder holds one sub-folder per class "
            f"(e.g. {path}/cat/001.jpg), optionally under train/, validation/ and test/."
        ) from e
    return loaded[_pick_split(list(loaded), split, path)]


def _load_hub(
    name: str, split: str, streaming: bool, cache_dir: str | None, load_kwargs: dict[str, Any]
) -> datasets.Dataset | datasets.IterableDataset:
    try:
        return datasets.load_dataset(
            name, split=split, streaming=streaming, cache_dir=cache_dir, **load_kwargs
        )
    except ValueError as e:
        msg = str(e)
        if "Unknown split" in msg or "Bad split" in msg:
            try:
                available = datasets.get_dataset_split_names(name, **load_kwargs)
            except Exception:  # fall back to the library's own message
                available = None
            if available:  # raises with the list, or resolves an alias such as val -> validation
                resolved = _pick_split(available, split, name)
                return _load_hub(name, resolved, streaming, cache_dir, load_kwargs)
            raise ValueError(f"dataset {name!r} has no split {split!r}: {msg}") from e
        raise
    except (OSError, datasets.exceptions.DatasetsError) as e:  # not found, gated, offline, network
        offline = any(
            os.environ.get(var, "0").upper() in ("1", "ON", "YES", "TRUE")
            for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the dataset is not in the local cache: run once "
            "online, or point to a local copy"
            if offline
            else "check the id on https://huggingface.co/datasets, log in with `hf auth login` and accept "
            "the dataset's terms if it is gated (imagenet-1k is)"
        )
        raise RuntimeError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}. {hint}. If you meant a local folder, pass a path that exists "
            f"(e.g. ./{name})."
        ) from e


def _find_column(
    features: datasets.Features | None,
    columns: Sequence[str],
    given: str | None,
    kind: str,
    feature_type: type,
    names: Sequence[str],
    source: str,
) -> str:
    arg = f"{kind}_column"
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{arg}={given!r} is not a column of {source!r}; its columns are {list(columns)}"
            )
        return given
    typed = [c for c in columns if features is not None and isinstance(features.get(c), feature_type)]
    for name in names:  # a conventional name wins, typed first (cifar100: fine_label over coarse_label)
        if name in typed:
            return name
    if len(typed) == 1:
        return typed[0]
    for name in names:
        if name in columns:
            return name
    raise ValueError(
        f"cannot tell which column of {source!r} holds the {kind}s; its columns are {list(columns)}. "
        f"Pass {arg}=... (--{kind}-column in the recipes)."
    )


def _standardize(
    ds: datasets.Dataset | datasets.IterableDataset,
    image_column: str | None,
    label_column: str | None,
    source: str,
) -> datasets.Dataset | datasets.IterableDataset:
    features = ds.features
    columns = list(features) if features is not None else list(ds.column_names or [])
    if not columns and isinstance(ds, datasets.IterableDataset):
        columns = list(next(iter(ds.take(1)), {}).keys())
    image = _find_column(features, columns, image_column, "image", datasets.Image, _IMAGE_NAMES, source)
    try:
        label = _find_column(
            features, columns, label_column, "label", datasets.ClassLabel, _LABEL_NAMES, source
        )
    except ValueError as e:
        if features is not None and len(columns) == 1 and isinstance(features.get(image), datasets.Image):
            raise ValueError(
                f"{source!r} has images but no labels. An image folder needs one sub-folder per class "
                f"(e.g. cat/001.jpg, dog/002.jpg); folder names become the labels."
            ) from e
        raise
    if features is not None:
        image_feature, label_feature = features[image], features[label]
        if not isinstance(image_feature, datasets.Image):
            raise ValueError(
                f"column {image!r} of {source!r} holds {image_feature}, not images; pass image_column=..."
            )
        if not isinstance(label_feature, datasets.ClassLabel) and not (
            isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint"))
        ):
            raise ValueError(
                f"column {label!r} of {source!r} holds {label_feature}; class labels must be integers or a "
                f"ClassLabel. Encode string labels with dataset.class_encode_column({label!r}) on the whole "
                f"DatasetDict (so every split gets the same ids), or pass label_column=..."
            )
    ds = ds.select_columns([image, label])
    if image != "image":
        ds = ds.rename_column(image, "image")
    if label != "label":
        ds = ds.rename_column(label, "label")
    return ds


def load_image_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    embedded_kwargs: dict[str, Any] | None = None,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of an image-classification dataset, with columns renamed to image/label.

    ``name_or_path`` is one of:

    * ``"embedded"``: ``make_embedded_dataset(split, **embedded_kwargs)`` (splits ``train`` and
      ``test``; ``validation``/``val`` are aliases of ``test``).
    * an existing local folder: an image folder (``class_name/xxx.jpg``, optionally under
      ``train/``, ``validation/``, ``test/``; folder names become labels, via
      ``datasets.load_dataset("imagefolder", data_dir=...)``), or a folder written by
      ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``.
    * otherwise a Hugging Face Hub dataset id (``"imagenet-1k"``, ``"uoft-cs/cifar100"``), loaded
      with ``datasets.load_dataset`` (``streaming=True`` for sets that do not fit on disk).

    A path-like string (starting with ``/``, ``.``, ``~``, or with more than one ``/``) that does
    not exist raises ``FileNotFoundError`` instead of being sent to the Hub. An unknown split lists
    the available ones (``val``/``validation`` aliases are resolved); an empty split raises. The
    image and label columns are detected (``Image``/``ClassLabel`` features, then the names
    ``image``/``img``..., ``label``/``labels``/``fine_label``...) or given, renamed to ``"image"`` and
    ``"label"``; other columns are dropped. ``load_kwargs`` go to ``datasets.load_dataset``
    (``name=``, ``revision=``, ``token=``, ``data_files=``...).
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"dataset must be 'embedded', a local folder or a Hub id, got {name_or_path!r}")
    if name_or_path == EMBEDDED_NAME:
        embedded_split = {"validation": "test", "val": "test"}.get(split, split)
        if embedded_split not in ("train", "test"):
            raise ValueError(
                f"dataset 'embedded' has no split {split!r}; available splits: train, test (validation "
                f"is an alias of test)"
            )
        ds = make_embedded_dataset(embedded_split, **(embedded_kwargs or {}))
        return ds.to_iterable_dataset() if streaming else ds
    if embedded_kwargs:
        raise ValueError("embedded_kwargs only apply to the 'embedded' dataset")
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        ds = _load_local(path, split, streaming, cache_dir, load_kwargs)
    elif os.path.exists(path):
        raise ValueError(
            f"dataset path {name_or_path!r} is a file; pass the folder that holds one sub-folder per class"
        )
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(
            f"dataset path {name_or_path!r} does not exist (resolved to {os.path.abspath(path)!r}); "
            f"check the path, or pass a Hub dataset id such as 'imagenet-1k' or 'uoft-cs/cifar100'"
        )
    else:
        ds = _load_hub(name_or_path, split, streaming, cache_dir, load_kwargs)
    ds = _standardize(ds, image_column, label_column, name_or_path)
    if isinstance(ds, datasets.Dataset):
        empty = len(ds) == 0
    else:
        empty = next(iter(ds.take(1)), None) is None
    if empty:
        raise ValueError(
            f"split {split!r} of dataset {name_or_path!r} is empty; pick a split that holds images "
            f"(--train-split / --val-split in the recipes)"
        )
    return ds


def get_label_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str] | None:
    """Class names from the ``"label"`` ``ClassLabel`` feature, or ``None`` when it has none."""
    feature = (dataset.features or {}).get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _label_min_max(dataset: datasets.Dataset) -> tuple[int | None, int | None, int]:
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")["label"]
    stats = pc.min_max(column)
    low, high = stats["min"].as_py(), stats["max"].as_py()
    return low, high, column.null_count


def get_num_classes(dataset: datasets.Dataset | datasets.IterableDataset) -> int | None:
    """Number of classes: from ``ClassLabel``, else ``max(label) + 1`` (map-style), else ``None``."""
    names = get_label_names(dataset)
    if names is not None:
        return len(names)
    if isinstance(dataset, datasets.Dataset) and len(dataset):
        _, high, _ = _label_min_max(dataset)
        return None if high is None else int(high) + 1
    return None


def check_labels(
    dataset: datasets.Dataset | datasets.IterableDataset, num_classes: int, *, name: str = "dataset"
) -> None:
    """Raise ``ValueError`` (naming the problem and the fix) if labels do not fit ``num_classes``.

    Checks the ``ClassLabel`` size and, for map-style datasets, the actual min/max of the label
    column (on Arrow, no image is decoded): missing labels, negative labels (``-1`` marks an
    unlabelled split such as imagenet-1k's ``test``) and labels ``>= num_classes`` are errors.
    Streaming datasets are checked through their ``ClassLabel`` only. Call it before training.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    names = get_label_names(dataset)
    if names is not None and len(names) > num_classes:
        raise ValueError(
            f"{name} has {len(names)} classes ({', '.join(names[:3])}, ...) but the model has {num_classes} "
            f"outputs; create the model with num_classes={len(names)} (a teacher trained on other classes "
            f"needs a class_map)"
        )
    if not isinstance(dataset, datasets.Dataset):
        return
    low, high, nulls = _label_min_max(dataset)
    if nulls:
        raise ValueError(f"{name} has {nulls} rows without a label; remove them (dataset.filter) first")
    if low is not None and low < 0:
        raise ValueError(
            f"{name} has negative labels (min {low}); -1 marks an unlabelled split (e.g. the 'test' split "
            f"of imagenet-1k): evaluate on a labelled split such as 'validation'"
        )
    if high is not None and high >= num_classes:
        raise ValueError(
            f"{name} has labels up to {high} but the model has {num_classes} outputs "
            f"(labels 0..{num_classes - 1}); create the model with num_classes={high + 1}, or remap "
            f"the labels (a teacher trained on other classes needs a class_map)"
        )
    if names is None and high is not None and high + 1 < num_classes:
        _logger.info("%s uses labels 0..%d of the model's %d classes", name, high, num_classes)


# ---------------------------------------------------------------------------------------------
# Decoding, corrupt images
# ---------------------------------------------------------------------------------------------

_DECODER = datasets.Image()


def _describe(value: Any, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"image {index}" + (f" ({path})" if path else "")


def _decode(value: Any):
    """``{"bytes", "path"}`` (or a PIL image) -> fully decoded RGB PIL image; raises on corrupt data."""
    from PIL import Image

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


def _undecoded(dataset: datasets.Dataset | datasets.IterableDataset):
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
    the count. This costs one decode per image (ImageNet: minutes with ``num_proc``); the loader's
    per-batch policy (``TransformedImageDataset``) catches the rest during training.
    """
    _check_on_corrupt(on_corrupt)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "verify_images needs a map-style datasets.Dataset (streaming data is checked per batch)"
        )
    raw = _undecoded(dataset)

    def _scan(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        bad_index, bad_what = [], []
        for value, index in zip(batch["image"], indices):
            try:
                _decode(value)
            except Exception as e:  # any decoder failure: corrupt
                bad_index.append(index)
                bad_what.append(f"{_describe(value, index)}: {type(e).__name__}: {e}")
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


# ---------------------------------------------------------------------------------------------
# Transforms, sampler, collate, loader
# ---------------------------------------------------------------------------------------------


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def _seeded_transform(transform: Callable | None, image, seed: int) -> torch.Tensor:
    """Apply ``transform`` with the Python, NumPy and torch CPU RNGs seeded by ``seed``.

    In the main process (``num_workers=0``) the three RNG states are restored afterwards, so the
    training loop's own randomness (dropout, Mixup) is untouched; a loader worker runs nothing
    else, so it skips the (slow, ~0.15 ms) NumPy state copy.
    """
    if transform is None:
        return _to_tensor(image)
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[], enabled=restore):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            return transform(image)
        finally:
            if restore:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _make_item(
    value: Any,
    label: int,
    index: int,
    epoch: int,
    transform: Callable | None,
    seed: int,
    on_corrupt: str,
) -> dict[str, Any]:
    """Decode + seeded transform of one sample; the corrupt-image policy lives here, once."""
    try:
        image = _decode(value)
    except Exception as e:
        if on_corrupt == "error":
            raise _corrupt_error(_describe(value, index), e) from e
        _logger.warning("skipping corrupt %s: %s: %s", _describe(value, index), type(e).__name__, e)
        return {"pixel_values": None, "label": int(label), "index": index}
    pixel_values = _seeded_transform(transform, image, _sample_seed(seed, epoch, index))
    return {"pixel_values": pixel_values, "label": int(label), "index": index}


class TransformedImageDataset(torch.utils.data.Dataset):
    """A map-style torch dataset: decodes ``dataset[i]["image"]``, applies a timm transform.

    ``ds[i]`` or ``ds[(i, epoch)]`` (what ``SeededSampler`` yields) returns
    ``{"pixel_values": Tensor, "label": int, "index": i}``. The transform's randomness is seeded per
    sample from ``(seed, epoch, i)`` (Python ``random``, NumPy and torch CPU RNGs, restored
    afterwards), so the augmented view of a sample does not depend on the worker count, on the
    batch order or on batches being skipped on resume. A corrupt image raises ``ValueError`` naming
    the index and file (``on_corrupt="error"``), or gives ``pixel_values=None``, which
    ``collate_images`` drops and counts (``"skip"``). ``transform=None`` gives float tensors in [0, 1].
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: Callable[[Any], torch.Tensor] | None,
        *,
        seed: int = 0,
        on_corrupt: OnCorrupt = "error",
    ):
        _check_on_corrupt(on_corrupt)
        if not isinstance(dataset, datasets.Dataset):
            raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
        missing = {"image", "label"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"dataset lacks column(s) {sorted(missing)}; load it with load_image_dataset, which names "
                f"them 'image' and 'label'"
            )
        self.dataset = _undecoded(dataset.select_columns(["image", "label"]))
        self.transform = transform
        self.seed = _check_seed(seed)
        self.on_corrupt = on_corrupt
        self.label_names = get_label_names(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        row = self.dataset[index]
        return _make_item(
            row["image"], row["label"], index, epoch, self.transform, self.seed, self.on_corrupt
        )


def apply_transform(
    dataset: datasets.Dataset | datasets.IterableDataset,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    seed: int = 0,
    on_corrupt: OnCorrupt = "error",
) -> TransformedImageDataset | datasets.IterableDataset:
    """Attach a transform: map-style -> ``TransformedImageDataset``; streaming -> ``.map`` (lazy).

    Items are ``{"pixel_values": Tensor, "label": int, "index": int}``. Streaming data sets drop
    corrupt images with ``.filter`` when ``on_corrupt="skip"`` (a warning names each one) and seed
    each sample's transform from ``(seed, position in the stream)``.
    """
    _check_on_corrupt(on_corrupt)
    if isinstance(dataset, datasets.Dataset):
        return TransformedImageDataset(dataset, transform, seed=seed, on_corrupt=on_corrupt)
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"expected a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")
    seed = _check_seed(seed)

    def _apply(example: dict[str, Any], index: int) -> dict[str, Any]:
        return _make_item(example["image"], example["label"], index, 0, transform, seed, on_corrupt)

    streamed = _undecoded(dataset).map(_apply, with_indices=True, remove_columns=["image"])
    if on_corrupt == "skip":
        streamed = streamed.filter(lambda example: example["pixel_values"] is not None)
    return streamed


class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, epoch)``; the order is a pure function of ``(seed, epoch)``.

    The same on every rank and after a resume: Accelerate shards its batches across processes and
    its prepared loader calls ``set_epoch`` at the start of each pass. Without Accelerate, call
    ``loader.sampler.set_epoch(epoch)``; a complete pass also advances the epoch by one. It is not
    a ``RandomSampler``, so Accelerate leaves it in place.
    """

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = _check_seed(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch = self.epoch
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_sample_seed(self.seed, epoch, 2**32))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        for index in order:
            yield (index, epoch)
        self.epoch = epoch + 1


def collate_images(batch: list[dict[str, Any]], *, count_skipped: bool = True) -> dict[str, Any]:
    """Stack items into ``{"pixel_values": [B,C,H,W], "label": [B], "index": [B], "num_skipped": int}``.

    Items with ``pixel_values=None`` (corrupt, ``on_corrupt="skip"``) are dropped and counted in
    ``num_skipped`` (a Python int; left out with ``count_skipped=False``, which Accelerate's batch
    dispatching of streaming data needs: it concatenates tensors only). A batch whose images are
    all corrupt raises: the data set is broken.
    """
    kept = [item for item in batch if item["pixel_values"] is not None]
    if not kept:
        raise ValueError(
            f"all {len(batch)} images of a batch are corrupt "
            f"(indices {[item['index'] for item in batch][:8]}); "
            f"the data set looks broken: list the bad files with timm_kd.data.verify_images"
        )
    out = {
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]),
        "label": torch.tensor([item["label"] for item in kept], dtype=torch.long),
        "index": torch.tensor([item["index"] for item in kept], dtype=torch.long),
    }
    if count_skipped:
        out["num_skipped"] = len(batch) - len(kept)
    return out


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def create_loader(
    dataset: TransformedImageDataset | datasets.IterableDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
    shuffle_buffer_size: int = 10_000,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` whose batches are a pure function of ``seed`` (and the epoch).

    Map-style (a ``TransformedImageDataset`` from ``apply_transform``): a ``SeededSampler`` plus the
    per-sample seeded transforms, so two loaders with the same seed give identical batches at any
    ``num_workers``; call ``loader.sampler.set_epoch(e)`` (Accelerate's prepared loader does it).
    Streaming: ``dataset.shuffle(seed, buffer_size)`` when ``shuffle``, ``num_workers`` capped at the
    number of shards. ``collate_fn`` defaults to ``collate_images``. ``persistent_workers`` and
    ``prefetch_factor`` (batches loaded ahead per worker) apply only with ``num_workers > 0``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seed = _check_seed(seed)
    common = {"batch_size": batch_size, "drop_last": drop_last, "pin_memory": pin_memory}
    if isinstance(dataset, datasets.IterableDataset):
        if shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        num_workers = min(num_workers, dataset.num_shards)
        return torch.utils.data.DataLoader(
            dataset,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            collate_fn=collate_fn or functools.partial(collate_images, count_skipped=False),
            **common,
        )
    if isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "create_loader needs decoded, transformed samples: pass apply_transform(dataset, transform)"
        )
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        sampler=SeededSampler(len(dataset), shuffle=shuffle, seed=seed),
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        collate_fn=collate_fn or collate_images,
        generator=generator,
        worker_init_fn=_seed_worker,
        **common,
    )


_DATA_CONFIG_KEYS = ("input_size", "img_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def resolve_model_data_config(
    model: torch.nn.Module, *, dataset_name: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """timm's data config for ``model`` (``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``), with ``overrides``. For the embedded dataset the input size
    defaults to the images' own (32x32) and ``crop_pct`` to 1: a timm ``test_*`` model's default
    160x160 would upscale 5x for nothing."""
    from timm.data import resolve_data_config

    args = dict(overrides)
    if dataset_name == EMBEDDED_NAME:
        args.setdefault("input_size", (3, 32, 32))
        args.setdefault("crop_pct", 1.0)
    return resolve_data_config(args, model=model)


def create_timm_transform(
    model_or_config: torch.nn.Module | dict[str, Any],
    *,
    is_training: bool,
    dataset_name: str | None = None,
    **kwargs: Any,
) -> Callable:
    """timm's transform: ``create_transform(**data_config, is_training=..., **kwargs)``.

    ``model_or_config`` is a timm model (its config is resolved with ``resolve_model_data_config``)
    or a data config dict. ``kwargs`` holds data-config overrides (``input_size``, ``mean``...) and
    ``create_transform`` arguments (``scale``, ``hflip``, ``auto_augment``, ``re_prob``...). For the
    embedded dataset, training transforms default to ``EMBEDDED_TRANSFORM_KWARGS`` (no flips).
    """
    from timm.data import create_transform

    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _DATA_CONFIG_KEYS}
    if isinstance(model_or_config, torch.nn.Module):
        config = resolve_model_data_config(model_or_config, dataset_name=dataset_name, **overrides)
    else:
        config = {**model_or_config, **overrides}
    if is_training and dataset_name == EMBEDDED_NAME:
        kwargs = {**EMBEDDED_TRANSFORM_KWARGS, **kwargs}
    config = {k: v for k, v in config.items() if k in _DATA_CONFIG_KEYS and k != "img_size"}
    return create_transform(**config, is_training=is_training, **kwargs)
