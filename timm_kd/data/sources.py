"""Where image-classification data comes from: the embedded dataset, a local folder, a Hub id.

``load_image_dataset`` returns an HF ``datasets.Dataset`` (or ``IterableDataset`` when streaming)
whose columns are ``"image"`` (``datasets.Image``) and ``"label"`` (int, ``ClassLabel`` when names
are known), whatever the source called them; ``check_labels`` tells before training whether the
labels fit a model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import datasets
import pyarrow.compute as pc

from .embedded import EMBEDDED_NAME, make_embedded_dataset

__all__ = ["load_image_dataset", "get_label_names", "get_num_classes", "check_labels"]

_logger = logging.getLogger(__name__)

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
