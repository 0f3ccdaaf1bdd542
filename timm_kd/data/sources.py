"""Where image-classification data comes from: the embedded dataset, a local folder, a Hub id.

``load_image_dataset`` returns an HF ``datasets.Dataset`` (or ``IterableDataset`` when streaming)
whose columns are ``"image"`` (``datasets.Image``) and ``"label"`` (int, ``ClassLabel`` when names
are known), whatever the source called them; ``check_labels`` tells before training whether the
labels fit a model.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.data_files import SPLIT_KEYWORDS
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from ..offline import HubUnreachableError, hub_offline_mode, hub_unreachable_reason
from .embedded import EMBEDDED_NAME, make_embedded_dataset

__all__ = ["load_image_dataset", "split_validation", "get_label_names", "get_num_classes", "check_labels"]

_logger = logging.getLogger(__name__)

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "picture", "pixel_values")
_LABEL_NAMES = ("label", "labels", "fine_label", "class", "cls", "target", "targets", "category")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
_IMAGE_EXTENSIONS = frozenset(e.lower() for e in ImageFolder.EXTENSIONS)
_LAST_FOLDER: dict[str, Any] = {}  # the last local folder loaded (all splits), by its files and arguments
_DATA_FILE_BUILDERS = {
    ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".jsonl": "json", ".json": "json"
}


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
        f"Pass one of them (--train-split / --val-split in the recipes), or, for data without a validation "
        f"split, hold out part of the training split (--val-fraction 0.1)."
    )


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No ``datasets`` progress bars within the block: reading local files is not "Downloading data"."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _data_file_builder(path: str) -> str | None:
    """The ``datasets`` builder for a data file (``parquet``, ``arrow``, ``csv``, ``json``), else None."""
    name = path.lower()
    for suffix, builder in _DATA_FILE_BUILDERS.items():
        if name.endswith(suffix):
            return builder
    return None


def _load_data_file(
    path: str, split: str, streaming: bool, cache_dir: str | None, load_kwargs: dict[str, Any]
) -> datasets.Dataset | datasets.IterableDataset:
    """One data file (or a glob of them) is one split: ``train``."""
    builder = _data_file_builder(path)
    if builder is None:
        raise ValueError(
            f"dataset path {path!r} is a file that is not a data file ({', '.join(_DATA_FILE_BUILDERS)}); "
            f"pass a data file, or a folder (one sub-folder per class, or data/<split>-*.parquet)"
        )
    if _SPLIT_ALIASES.get(split, split) != "train":
        raise ValueError(
            f"dataset {path!r} is one data file: it holds the 'train' split only, not {split!r}. Hold out "
            f"part of it (--val-fraction 0.1), or put the splits in a folder as data/train-*.{builder} and "
            f"data/validation-*.{builder} and pass the folder"
        )
    _logger.info("reading %s file(s) %s", builder, path)
    with _quiet_progress():
        return datasets.load_dataset(
            builder, data_files={"train": path}, split="train", streaming=streaming, cache_dir=cache_dir,
            **load_kwargs,
        )


def _image_folder_files(path: str) -> dict[str, list[str]] | None:
    """The image files of a class folder, per split, from one directory walk; None if it is not one.

    The layout ``datasets`` infers for an image folder (split folders named train/val/test... per
    ``datasets.data_files.SPLIT_KEYWORDS``, else the whole folder is ``train``; hidden and
    ``__``-prefixed entries skipped; labels from the parent folders), but walked once: ``datasets``
    walks the tree once per candidate pattern, tens of times. None (``datasets`` infers the layout
    itself) for folders without images, with data files or with metadata files.
    """
    split_of = {keyword: str(split) for split, keywords in SPLIT_KEYWORDS.items() for keyword in keywords}
    try:
        top = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "__")))
    except OSError:
        return None
    roots: dict[str, list[str]] = {}
    for name in top:
        if name in split_of:
            roots.setdefault(split_of[name], []).append(os.path.join(path, name))
        elif re.match(rf"({'|'.join(split_of)})[-._ ]", name):
            return None  # train-00/, val_a/...: datasets' own split patterns decide
    nested_splits = not roots  # then a split folder further down (images/train/...) is datasets' case
    if not roots:
        roots = {"train": [path]}
    files: dict[str, list[str]] = {}
    for split, folders in roots.items():
        found = files.setdefault(split, [])
        for folder in folders:
            for root, dirs, names in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
                if nested_splits and root != path and any(d in split_of for d in dirs):
                    return None
                for name in names:
                    if name.startswith((".", "__")):
                        continue
                    if name in ImageFolder.METADATA_FILENAMES or _data_file_builder(name):
                        return None
                    if os.path.splitext(name)[1].lower() in _IMAGE_EXTENSIONS:
                        found.append(os.path.join(root, name))
    files = {split: sorted(found) for split, found in files.items() if found}
    return files or None


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
    given = "data_files" in load_kwargs or "data_dir" in load_kwargs
    files = None if given else _image_folder_files(path)
    arguments = (os.path.abspath(path), streaming, cache_dir, sorted(load_kwargs.items()))
    digest = hashlib.sha256(repr(arguments).encode())
    for split_name, names in (files or {}).items():
        digest.update(("\0".join([split_name, *names]) + "\n").encode())
    key = digest.hexdigest()
    loaded = _LAST_FOLDER.get(key)
    if loaded is None:  # the train and validation splits of one start: one load
        _logger.info("reading local folder %s", path)
        try:  # an image folder's files, or datasets infers the layout (data/<split>-*.parquet|arrow|csv)
            with _quiet_progress():
                source = {"path": "imagefolder", "data_files": files} if files is not None else {"path": path}
                loaded = datasets.load_dataset(
                    **source, cache_dir=cache_dir, streaming=streaming, **load_kwargs
                )
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise ValueError(
                f"found no images or data files in {path!r} ({e}). A local dataset is a folder with one "
                f"sub-folder per class (e.g. {path}/cat/001.jpg, optionally under train/, validation/ and "
                f"test/), a folder of parquet/arrow/csv files (the Hub layout: data/train-*.parquet), a data "
                f"file, or a folder written by Dataset.save_to_disk."
            ) from e
        _LAST_FOLDER.clear()
        _LAST_FOLDER[key] = loaded
    return loaded[_pick_split(list(loaded), split, path)]


def _load_hub(
    name: str, split: str, streaming: bool, cache_dir: str | None, load_kwargs: dict[str, Any]
) -> datasets.Dataset | datasets.IterableDataset:
    """A Hub id; when the Hub cannot be reached, the local cache only, failing at once."""
    reason = hub_unreachable_reason()
    try:
        if reason is None:
            return _load_hub_split(name, split, streaming, cache_dir, load_kwargs)
        with hub_offline_mode():
            return _load_hub_split(name, split, streaming, cache_dir, load_kwargs)
    except (OSError, datasets.exceptions.DatasetsError) as e:  # not found, gated, offline, network
        if reason is not None:
            raise HubUnreachableError(
                f"dataset {name!r} (split {split!r}) must come from the Hugging Face Hub, but {reason} "
                f"and it is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}). Fixes: "
                f"pass a local copy (--dataset PATH: an image folder, a folder of parquet files such as a "
                f"Hub repository's data/train-*.parquet, a .parquet file, or a Dataset.save_to_disk "
                f"folder); or fill the cache once online "
                f"(python -c \"import datasets; datasets.load_dataset('{name}')\"), then run with "
                f"HF_DATASETS_OFFLINE=1 to skip the network. ({type(e).__name__}: {e})"
            ) from None
        raise RuntimeError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}. Check the id on https://huggingface.co/datasets, log in with "
            f"`hf auth login` and accept the dataset's terms if it is gated (imagenet-1k is). If you meant "
            f"a local folder or file, pass a path that exists (e.g. ./{name})."
        ) from e


def _load_hub_split(
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
                return _load_hub_split(name, resolved, streaming, cache_dir, load_kwargs)
            raise ValueError(f"dataset {name!r} has no split {split!r}: {msg}") from e
        raise


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
        if isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"):
            ds = ds.cast_column(image, datasets.Image())  # a csv/json column of image file paths
            image_feature = ds.features[image]
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

    ``name_or_path`` is what ``datasets.load_dataset`` takes, plus saved datasets:

    * ``"embedded"``: ``make_embedded_dataset(split, **embedded_kwargs)`` (splits ``train`` and
      ``test``; ``validation``/``val`` are aliases of ``test``).
    * a local folder: an image folder (``class_name/xxx.jpg``, optionally under ``train/``,
      ``validation/``, ``test/``; folder names become labels; walked once, all its splits loaded
      together and kept for the next call on the same files), or, through
      ``datasets.load_dataset(folder)``, data files in the Hub layout (``data/train-*.parquet``,
      ``data/validation-*.parquet``; parquet, arrow, csv or json, splits from the file names or a
      README's ``configs``); or a folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``.
    * a data file (``.parquet``, ``.arrow``, ``.csv``, ``.json``, ``.jsonl``) or a glob of them:
      the ``train`` split (another split is an error that suggests holding out a validation part,
      ``split_validation``).
    * otherwise a Hugging Face Hub dataset id (``"imagenet-1k"``, ``"uoft-cs/cifar100"``), loaded
      with ``datasets.load_dataset`` (``streaming=True`` for sets that do not fit on disk). When the
      Hub cannot be reached (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or no connection to
      ``HF_ENDPOINT`` within seconds) the local datasets cache is used, and a set not in it raises
      ``timm_kd.offline.HubUnreachableError`` at once, naming the dataset and the local alternatives.

    Local sources load without ``datasets``' progress bars (nothing is downloaded).
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
    elif os.path.isfile(path) or (any(c in path for c in "*?[") and glob.glob(path)):
        ds = _load_data_file(path, split, streaming, cache_dir, load_kwargs)
    elif _looks_like_path(name_or_path) or _data_file_builder(path):
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


def split_validation(
    dataset: datasets.Dataset, fraction: float, *, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(train, validation)``: ``fraction`` of each class held out, chosen by ``seed``.

    For data without a validation split (a flat class folder, one data file). Each class keeps
    ``round(fraction * n)`` of its ``n`` images in the validation part (at least one of a class with
    two or more, and never all of them), drawn by a permutation from ``seed``; both parts keep the
    dataset's order. The same data and seed give the same split on every rank and every launch.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            "a validation part can only be held out of a map-style dataset; with --streaming pass a "
            "dataset that has a validation split (--val-split)"
        )
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), e.g. 0.1; got {fraction!r}")
    labels = dataset.with_format("arrow")["label"].to_numpy()
    order = np.random.default_rng(seed).permutation(len(labels))
    grouped = order[np.argsort(labels[order], kind="stable")]  # by class, random within a class
    _, starts, counts = np.unique(labels[grouped], return_index=True, return_counts=True)
    take = np.where(counts >= 2, np.clip(np.rint(fraction * counts), 1, counts - 1), 0).astype(np.int64)
    held = np.concatenate([grouped[a : a + k] for a, k in zip(starts, take)]) if len(take) else grouped[:0]
    if len(held) == 0:
        raise ValueError(
            f"holding out {fraction} of {len(labels)} images leaves no validation image (every class needs "
            f"two or more); use a larger --val-fraction or a dataset with a validation split"
        )
    keep = np.ones(len(labels), dtype=bool)
    keep[held] = False
    return dataset.select(np.flatnonzero(keep)), dataset.select(np.sort(held))


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
