"""From a dataset to batches: seeded timm transforms, a seeded sampler, collate, loaders.

``apply_transform`` turns a dataset from ``load_image_dataset`` into a torch dataset of
``{"pixel_values": Tensor[C, H, W], "label": int, "index": int}`` and ``create_loader`` batches
it reproducibly from a seed: a sample's augmentation is seeded from ``(seed, epoch, index)``
(``sample_seed``), the order from ``(seed, epoch)`` (``SeededSampler``).
"""
from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np
import torch
from timm.data import create_transform, resolve_data_config

from .embedded import EMBEDDED_NAME, EMBEDDED_TRANSFORM_KWARGS, _check_seed
from .images import OnCorrupt, _check_on_corrupt, _corrupt_error, decode_image, describe_image, undecoded
from .sources import get_label_names

__all__ = [
    "sample_seed",
    "seeded_transform",
    "TransformedImageDataset",
    "apply_transform",
    "SeededSampler",
    "collate_images",
    "create_loader",
    "resolve_model_data_config",
    "create_timm_transform",
]

_logger = logging.getLogger(__name__)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s transform in ``epoch``: a pure function of the three, < 2**63.

    ``SeededSampler`` takes the epoch's order from ``sample_seed(seed, epoch, 2**32)``.
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def seeded_transform(transform: Callable | None, image, seed: int) -> Any:
    """``transform(image)`` with the Python, NumPy and torch CPU RNGs seeded by ``seed``.

    ``transform=None`` gives a float tensor in [0, 1]. In the main process (``num_workers=0``)
    the three RNG states are restored afterwards, so the training loop's own randomness (dropout,
    Mixup) is untouched; a loader worker runs nothing else, so it skips the NumPy state copy.
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
        image = decode_image(value)
    except Exception as e:
        if on_corrupt == "error":
            raise _corrupt_error(describe_image(value, index), e) from e
        _logger.warning("skipping corrupt %s: %s: %s", describe_image(value, index), type(e).__name__, e)
        return {"pixel_values": None, "label": int(label), "index": index}
    pixel_values = seeded_transform(transform, image, sample_seed(seed, epoch, index))
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
        self.dataset = undecoded(dataset.select_columns(["image", "label"]))
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

    streamed = undecoded(dataset).map(_apply, with_indices=True, remove_columns=["image"])
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
            generator.manual_seed(sample_seed(self.seed, epoch, 2**32))
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
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _DATA_CONFIG_KEYS}
    if isinstance(model_or_config, torch.nn.Module):
        config = resolve_model_data_config(model_or_config, dataset_name=dataset_name, **overrides)
    else:
        config = {**model_or_config, **overrides}
    if is_training and dataset_name == EMBEDDED_NAME:
        kwargs = {**EMBEDDED_TRANSFORM_KWARGS, **kwargs}
    config = {k: v for k, v in config.items() if k in _DATA_CONFIG_KEYS and k != "img_size"}
    return create_transform(**config, is_training=is_training, **kwargs)
