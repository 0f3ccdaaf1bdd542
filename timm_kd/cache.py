"""Teacher-output cache: store the teacher's top-k logits once, distill from them without a teacher.

FKD-style (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022,
arXiv 2112.01528). This module holds the logit compression used by the cache.

Compression keeps, per sample, the ``k`` largest logits (fp16), their class indices, and two fp32
log-sum-exps: of the full logit vector and of the ``C - k`` dropped logits. Expansion rebuilds a full
``[B, C]`` logit vector whose softmax at temperature 1 equals the teacher's on the top-k classes and
puts the exact remaining probability mass on the other ``C - k`` classes, shaped by the cache's *tail
prior* (the teacher's mean log-probabilities over the training views it ranked first in the same
class; one ``[C, C]`` table per cache, nothing per view) or, without one, spread uniformly. See
``docs/cache.md`` for the measured error per loss.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = [
    "compress_logits",
    "expand_logits",
    "index_dtype",
    "TailPrior",
    "ReplayTransform",
    "build_teacher_cache",
    "dataset_fingerprint",
    "read_manifest",
    "TeacherCache",
    "CachedViewDataset",
    "CachedDistill",
    "collate_cached",
    "topk_error",
]

#: Largest number of classes for which a build stores a tail prior (``[C, C]`` float32: 4 MB at C = 1000,
#: 64 MB at 4096); above it (ImageNet-21k) the cache has none and the tail is rebuilt flat.
TAIL_PRIOR_MAX_CLASSES = 4096
TAIL_PRIOR_FILE = "tail_prior.safetensors"
#: how ``expand_logits`` shapes the dropped logits: the cache's prior, or one flat value
TAIL_MODES = ("prior", "flat")

# Fill used by ``expand_logits`` when no log-sum-exp is stored: missing logits sit this far below the
# smallest kept logit (a softmax ratio of exp(-8) ~ 3.4e-4 per missing class at T = 1).
NO_LSE_MARGIN = 8.0


def index_dtype(num_classes: int) -> torch.dtype:
    """Smallest signed integer dtype that holds class indices ``0 .. num_classes - 1``.

    ``int16`` when ``num_classes <= 32767`` (ImageNet-1k, CIFAR), else ``int32`` (ImageNet-21k).
    Signed because ``datasets``/Arrow and ``torch.gather`` handle signed types everywhere.
    """
    return torch.int16 if num_classes <= 32767 else torch.int32


def _check_k(k: int, num_classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"top-k must be an int, got {type(k).__name__} ({k!r}).")
    if k <= 0 or k > num_classes:
        raise ValueError(
            f"top-k must satisfy 1 <= k <= num_classes ({num_classes}), got k={k}. "
            f"Pick a k in that range, e.g. k=10 (FKD's default) or k={num_classes} to store every logit."
        )


def compress_logits(logits: Tensor, k: int) -> dict[str, Tensor]:
    """Keep the top-k logits of each row, plus the log-sum-exp needed to rebuild the softmax.

    For a row ``z`` of ``C`` logits::

        idx      = argtopk(z, k)                       # int16 if C <= 32767 else int32, [B, k]
        values   = fp16(z[idx])                         # [B, k], sorted descending
        lse      = log(sum_c exp(z_c))          (fp32)  # [B]
        tail_lse = log(sum_{c not in idx} exp(z_c)) (fp32, -inf when k == C)  # [B]

    Both are computed from the full fp32 logits: ``exp(values - lse)`` are the teacher's probabilities
    of the kept classes (up to fp16 rounding of ``values``) and ``exp(tail_lse - lse)`` is the exact
    probability mass of the ``C - k`` dropped classes. ``tail_lse`` matters when that mass is small:
    ``1 - sum exp(values - lse)`` then loses most of its digits to the fp16 rounding of ``values``
    (a top logit of 9 is rounded by up to 0.004, which moves its probability by 0.4 %).

    Args:
        logits: ``[B, C]`` float logits (any float dtype; computed in fp32).
        k: number of logits kept per row, ``1 <= k <= C``.

    Returns:
        ``{"values": fp16 [B, k], "indices": int [B, k], "lse": fp32 [B], "tail_lse": fp32 [B]}`` on the
        input's device.
    """
    if logits.dim() != 2:
        raise ValueError(f"compress_logits expects [B, C] logits, got shape {tuple(logits.shape)}.")
    num_classes = logits.shape[1]
    _check_k(k, num_classes)
    z = logits.detach().float()
    values, indices = torch.topk(z, k, dim=1, largest=True, sorted=True)
    lse = torch.logsumexp(z, dim=1)
    if k < num_classes:
        tail_lse = torch.logsumexp(z.scatter(1, indices, float("-inf")), dim=1)
    else:
        tail_lse = torch.full_like(lse, float("-inf"))
    return {
        "values": values.to(torch.float16),
        "indices": indices.to(index_dtype(num_classes)),
        "lse": lse,
        "tail_lse": tail_lse,
    }


#: water-filling rounds of ``_fill_tail`` (fixed: no host sync; 4 gave the exact mass on the parity teacher)
_FILL_ROUNDS = 8


def _fill_tail(shape: Tensor, tail_lse: Tensor, cap: Tensor) -> Tensor:
    """Shift each row of ``shape`` (``-inf`` at the kept classes) so that its log-sum-exp is ``tail_lse``
    with no entry above ``cap`` (``[B, 1]`` each): water-filling. With ``H`` the entries held at the
    cap and ``F`` the free ones::

        f_j = shape_j + a,   a = log(exp(tail_lse) - |H| exp(cap)) - logsumexp_{j in F} shape_j

    and every free entry that ends above the cap joins ``H``; repeated ``_FILL_ROUNDS`` times (``H``
    only grows, so this converges; the true tail satisfies the constraint, so a solution exists). A
    last ``min`` keeps the cap even if the rounds ran out (then the tail's mass is slightly low).
    """
    held = torch.zeros_like(shape, dtype=torch.bool)
    out = shape + (tail_lse - shape.logsumexp(dim=1, keepdim=True))
    for _ in range(_FILL_ROUNDS):
        held |= out > cap
        n_held = held.sum(dim=1, keepdim=True).to(shape.dtype)
        rest = tail_lse + torch.log1p(-(n_held * (cap - tail_lse).exp()).clamp(max=1.0 - 1e-6))
        free = shape.masked_fill(held, float("-inf"))
        # (clamp: a row whose every entry is held has no free mass; keeps -inf + inf out of it)
        out = torch.where(held, cap, free + (rest - free.logsumexp(dim=1, keepdim=True).clamp_min(-1e30)))
    return torch.minimum(out, cap)


class TailPrior:
    """Running sums for a cache's tail prior: the teacher's mean log-softmax, grouped by its top-1 class.

    For every view ``b`` with teacher logits ``z_b`` and top-1 class ``c_b = argmax z_b``::

        prior[c, :] = mean over {b : c_b = c} of log softmax(z_b)            [C, C]

    (float64 sums; a class the teacher never ranks first gets the mean over all views). Row ``c`` is
    what this teacher, on average, thinks of every other class when it says "c": which wrong classes
    look like ``c``. ``expand_logits`` uses it to shape the dropped logits of a view whose top-1 is
    ``c``. It is a property of the teacher and the training views, stored once per cache
    (``tail_prior.safetensors``), so the per-view cost stays k values, k indices and two numbers.
    """

    def __init__(self, num_classes: int):
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, logits: Tensor) -> None:
        """Accumulate a batch of ``[B, C]`` teacher logits (any device and float dtype)."""
        z = logits.detach().float()
        lp = z.log_softmax(dim=1).double().cpu()
        top1 = z.argmax(dim=1).cpu()
        self.sums.index_add_(0, top1, lp)
        self.counts += torch.bincount(top1, minlength=self.counts.numel()).double()

    def merge(self, other: TailPrior) -> TailPrior:
        self.sums += other.sums
        self.counts += other.counts
        return self

    def state(self) -> dict[str, Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> TailPrior:
        out = cls(state["counts"].numel())
        out.sums, out.counts = state["sums"].double(), state["counts"].double()
        return out

    def table(self) -> Tensor:
        """The ``[C, C]`` float32 prior (mean log-probabilities per top-1 class)."""
        seen = self.counts > 0
        if not bool(seen.any()):
            raise ValueError("tail prior: no views were added.")
        overall = self.sums[seen].sum(dim=0) / self.counts.sum()
        mean = self.sums / self.counts.clamp_min(1.0)[:, None]
        return torch.where(seen[:, None], mean, overall).float()


def expand_logits(
    values: Tensor,
    indices: Tensor,
    num_classes: int,
    lse: Tensor | None = None,
    tail_lse: Tensor | None = None,
    tail_prior: Tensor | None = None,
) -> Tensor:
    """Rebuild ``[B, C]`` float32 logits from top-k values/indices (inverse of ``compress_logits``).

    The kept entries are written back exactly (``out[b, idx[b, j]] = values[b, j]``). The others are
    filled so that the softmax at T = 1 keeps the dropped probability mass exactly.

    With a tail prior ``P`` (``[C, C]``, ``TailPrior.table()``) and ``tail_lse`` ``T_b``, the dropped
    entries take the prior's shape for the view's top-1 class ``c = idx[b, 0]``, shifted to the stored
    mass::

        out[b, j] = P[c, j] + T_b - logsumexp_{j' dropped} P[c, j']     (j dropped; <= min_j v_j)

    so the tail keeps its mass *and* the teacher's typical ranking of the wrong classes (what a
    tempered softmax at T > 1 brings forward). No dropped logit may exceed the smallest kept one (the
    teacher's own order): entries the shift would lift above it are held there and the rest shifted
    up to keep the mass (``_fill_tail``). Without a prior, every dropped entry gets one fill
    value ``f_b`` per row and the mass is spread uniformly. With ``tail_lse``::

        f = T - log(C - k)                          (clamped to <= min_j v_j)
        => sum over the dropped classes of exp(f) = exp(T): their mass is the teacher's, exactly.

    With only the full log-sum-exp ``L`` (``lse``), the dropped mass is recovered as a difference::

        m = 1 - sum_j exp(v_j - L)                  (clamped to >= 1e-12)
        f = L + log(m / (C - k))                    (clamped to <= min_j v_j)

    which is exact in exact arithmetic but, when ``m`` is small, mostly fp16 rounding of ``v``
    (``tail_lse`` avoids this; ``compress_logits`` returns both). Either way ``softmax(out)_c`` is
    ``exp(v_c - L)`` on the kept classes and ``m / (C - k)`` on each dropped one. The clamp only acts
    under rounding: the average dropped probability can never exceed the smallest kept one. With
    neither, the fill is ``min_j v_j - NO_LSE_MARGIN`` (8.0): each dropped class is treated as
    exp(8) ~ 3000x less likely than the smallest kept one.

    Approximation: the T = 1 distribution's top-k entries and tail mass are preserved; the tail's
    shape is the prior's (this view's own deviations from its class's average are lost) or flat. A
    tempered softmax ``softmax(out / T)`` at ``T != 1`` is therefore not exactly the teacher's, and
    losses that use the logits themselves (standardization, logit moments) see the rebuilt tail. The
    error per registered loss, prior and flat, is measured in ``docs/cache.md`` and bounded in
    ``tests/test_cache.py``. With ``k == C`` the result equals the fp16-rounded input.

    Args:
        values: ``[B, k]`` top-k logits (any float dtype).
        indices: ``[B, k]`` integer class indices.
        num_classes: ``C``, the full number of classes.
        lse: optional ``[B]`` fp32 log-sum-exp of the full logits.
        tail_lse: optional ``[B]`` fp32 log-sum-exp of the dropped logits (preferred over ``lse``).
        tail_prior: optional ``[C, C]`` tail prior (used with ``tail_lse``; else ignored).

    Returns:
        ``[B, C]`` float32 logits on ``values``' device.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"values and indices must both be [B, k]; got {tuple(values.shape)} and {tuple(indices.shape)}."
        )
    k = values.shape[1]
    _check_k(k, num_classes)
    v = values.float()
    idx = indices.long()
    vmin = v.min(dim=1).values
    if k < num_classes and tail_lse is not None and tail_prior is not None:
        if tail_prior.shape != (num_classes, num_classes):
            raise ValueError(
                f"tail_prior must be [C, C] = [{num_classes}, {num_classes}], got {tuple(tail_prior.shape)}; "
                f"it belongs to a cache of another number of classes."
            )
        shape = tail_prior.to(device=v.device, dtype=torch.float32).index_select(0, idx[:, 0])
        shape.scatter_(1, idx, float("-inf"))  # the kept classes take no part in the tail's mass
        tail = tail_lse.to(device=v.device, dtype=torch.float32).reshape(-1, 1)
        out = _fill_tail(shape, tail, vmin[:, None])
        return out.scatter_(1, idx, v)
    if k == num_classes:
        fill = vmin  # nothing to fill; any value is overwritten by the scatter below
    elif tail_lse is not None:
        fill = tail_lse.to(device=v.device, dtype=torch.float32).reshape(-1) - math.log(num_classes - k)
        fill = torch.minimum(fill, vmin)
    elif lse is not None:
        lse = lse.to(device=v.device, dtype=torch.float32).reshape(-1)
        kept = torch.exp(v - lse[:, None]).sum(dim=1)
        missing = (1.0 - kept).clamp_min(1e-12)
        fill = lse + torch.log(missing) - math.log(num_classes - k)
        fill = torch.minimum(fill, vmin)
    else:
        fill = vmin - NO_LSE_MARGIN
    out = fill[:, None].expand(v.shape[0], num_classes).contiguous()
    out.scatter_(1, idx, v)
    return out


# --------------------------------------------------------------------------------------------------
# Replayable augmentation: draw a view's parameters once, apply them again later, pixel for pixel
# --------------------------------------------------------------------------------------------------

#: Transform steps without randomness (replayed by calling them).
DETERMINISTIC_STEPS = frozenset(
    {
        "Resize",
        "CenterCrop",
        "ToTensor",
        "MaybeToTensor",
        "PILToTensor",
        "MaybePILToTensor",
        "Normalize",
        "ConvertImageDtype",
    }
)
#: Random steps the cache records and replays.
REPLAYABLE_STEPS = frozenset(
    {
        "RandomResizedCropAndInterpolation",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomVerticalFlip",
        "ColorJitter",
    }
)
_REFUSED_HINTS = {
    "RandAugment": "drop --aa (AutoAugment/RandAugment)",
    "AutoAugment": "drop --aa (AutoAugment/RandAugment)",
    "AugMixAugment": "drop --aa (AugMix)",
    "TrivialAugmentWide": "drop --aa",
    "RandomErasing": "use --reprob 0 (random erasing)",
    "RandomApply": "turn off probabilistic colour jitter / grayscale",
    "RandomGrayscale": "turn off random grayscale",
    "GaussianBlur": "turn off random blur",
}
_NO_CROP = (-1, -1, -1, -1)
_NAN4 = (float("nan"),) * 4


def default_view_params() -> dict[str, Any]:
    """The parameters of a view whose transform has none of the random steps (identity values)."""
    return {
        "crop": list(_NO_CROP),
        "hflip": False,
        "vflip": False,
        "interpolation": "",
        "jitter": list(_NAN4),
        "jitter_order": [0, 1, 2, 3],
    }


class ReplayTransform:
    """A timm/torchvision ``Compose`` split into steps whose random draws are recorded and replayed.

    ``replay(image)`` draws every random parameter exactly as the original transform would (each
    step's own ``get_params`` / ``torch.rand`` in the same order, so under the same seeded RNGs the
    draws, and the pixels, equal ``transform(image)``) and returns ``(pixels, params)``;
    ``replay(image, params)`` applies stored parameters without drawing anything. ``params`` holds
    ``crop`` (top, left, height, width of the random-resized crop, -1 without one), ``hflip``,
    ``vflip``, ``interpolation`` (the mode the crop used), ``jitter`` (brightness, contrast,
    saturation, hue factors, NaN where off) and ``jitter_order``.

    Steps that draw random numbers it cannot record (RandAugment, random erasing, ...) raise a
    ``ValueError`` naming the step and the flag that turns it off.
    """

    def __init__(self, transform: Callable):
        steps = list(getattr(transform, "transforms", [transform]))
        seen: set[str] = set()
        for step in steps:
            name = type(step).__name__
            if name in REPLAYABLE_STEPS:
                kind = "crop" if "Crop" in name else name
                if kind in seen:
                    raise ValueError(f"the transform has two {name} steps; the teacher cache replays one.")
                seen.add(kind)
            elif name not in DETERMINISTIC_STEPS:
                hint = _REFUSED_HINTS.get(name, "remove it from the training transform")
                raise ValueError(
                    f"the training transform's step {name} ({step!r}) draws random numbers that the teacher "
                    f"cache cannot record and replay; the cache replays random-resized crops, flips and "
                    f"colour jitter only. For a cached run, {hint} (in both `timm-kd cache-teacher` and "
                    f"training), or distill online without --teacher-cache."
                )
        self.steps = steps

    def describe(self) -> list[str]:
        """The steps as text (their ``repr``): what a cache records as its transform config."""
        return [repr(step) for step in self.steps]

    def __call__(self, image) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.replay(image)

    def replay(self, image, params: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Apply the steps; draw fresh parameters if ``params`` is None. Returns ``(pixels, params)``."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        draw = params is None
        p = default_view_params() if draw else params
        img = image
        for step in self.steps:
            name = type(step).__name__
            if name in ("RandomResizedCropAndInterpolation", "RandomResizedCrop"):
                timm_style = name == "RandomResizedCropAndInterpolation"
                if draw:
                    i, j, h, w = step.get_params(img, step.scale, step.ratio)
                    interp = step.interpolation
                    if timm_style and isinstance(interp, (tuple, list)):
                        interp = random.choice(interp)
                    p["crop"] = [int(i), int(j), int(h), int(w)]
                    p["interpolation"] = (
                        interp.value if isinstance(interp, InterpolationMode) else str(interp)
                    )
                i, j, h, w = (int(x) for x in p["crop"])
                interp = InterpolationMode(p["interpolation"])
                if timm_style:
                    img = F.resized_crop(img, i, j, h, w, step.size, interp)
                else:
                    img = F.resized_crop(img, i, j, h, w, step.size, interp, antialias=step.antialias)
            elif name in ("RandomHorizontalFlip", "RandomVerticalFlip"):
                key = "hflip" if name == "RandomHorizontalFlip" else "vflip"
                if draw:
                    p[key] = bool(torch.rand(1) < step.p)
                if p[key]:
                    img = F.hflip(img) if key == "hflip" else F.vflip(img)
            elif name == "ColorJitter":
                if draw:
                    order, *factors = step.get_params(
                        step.brightness, step.contrast, step.saturation, step.hue
                    )
                    p["jitter_order"] = [int(x) for x in order]
                    p["jitter"] = [float("nan") if f is None else float(f) for f in factors]
                ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
                for fn_id in p["jitter_order"]:
                    factor = float(p["jitter"][fn_id])
                    if not math.isnan(factor):
                        img = ops[fn_id](img, factor)
            else:
                img = step(img)
        return img, p


# --------------------------------------------------------------------------------------------------
# Cache format: manifest.json + README.md (datasets config) + data/train-SSSSS-of-NNNNN.parquet
# --------------------------------------------------------------------------------------------------

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
PRIOR_DIR = "prior"  # per-shard TailPrior sums, merged into TAIL_PRIOR_FILE when the build completes
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
TEACHER_KEYS = ("teacher_values", "teacher_indices", "teacher_lse", "teacher_tail_lse")


def shard_name(shard: int, num_shards: int) -> str:
    """``train-00003-of-00010.parquet``: the Hub's split-shard naming, found by ``load_dataset``."""
    return f"train-{shard:05d}-of-{num_shards:05d}.parquet"


def cache_features(top_k: int, num_classes: int):
    """The ``datasets.Features`` of a cache row (one augmented view of one image)."""
    import datasets

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
    import numpy as np

    from .data import _undecoded

    h = hashlib.sha256()
    n = len(dataset)
    h.update(f"{n}|{dataset.features}".encode())
    if "label" in dataset.column_names:
        labels = dataset.data.column("label").to_numpy(zero_copy_only=False)
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if "image" in dataset.column_names and n:
        raw = _undecoded(dataset.select_columns(["image"]))
        for i in sorted({int(x) for x in np.linspace(0, n - 1, min(n, 64))}):
            value = raw[i]["image"]
            if isinstance(value, dict):
                h.update(value.get("bytes") or str(value.get("path")).encode())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:32]


def _file_sha256(path: str | None) -> str | None:
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


def _differences(saved: dict[str, Any], now: dict[str, Any], keys: Sequence[str]) -> list[str]:
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
# Building the cache
# --------------------------------------------------------------------------------------------------


class _ViewSet(torch.utils.data.Dataset):
    """``(index, view)`` pairs of one shard -> the replayed view and its parameters."""

    def __init__(self, base, replay: ReplayTransform, seed: int, items: list[tuple[int, int]]):
        self.base, self.replay, self.seed, self.items = base, replay, seed, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict[str, Any]:
        from .data import _decode, _describe, _sample_seed, _seeded_transform

        index, view = self.items[j]
        row = self.base.dataset[index]
        try:
            image = _decode(row["image"])
        except Exception as e:
            raise ValueError(
                f"cannot cache {_describe(row['image'], index)}: {type(e).__name__}: {e}. Drop corrupt "
                f"images first with --verify-images yes --on-corrupt skip (in both cache-teacher and "
                f"training)."
            ) from e
        pixels, params = _seeded_transform(self.replay, image, _sample_seed(self.seed, view, index))
        return {"pixel_values": pixels, "index": index, "view": view, "label": int(row["label"]), **params}


def _collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
    for key in items[0]:
        if key != "pixel_values":
            out[key] = [it[key] for it in items]
    return out


def build_teacher_cache(
    config,
    cache_dir: str | os.PathLike,
    *,
    num_views: int = 10,
    top_k: int = 10,
    shard_size: int = 10_000,
    teacher: nn.Module | None = None,
    accelerator=None,
) -> dict[str, Any]:
    """Run the teacher once over ``num_views`` augmented views of every training image; store them.

    ``config`` is the ``TrainConfig`` (or ``add_train_args`` namespace) of the training run that will
    use the cache: data, transform, teacher and seed flags are read from it, so the cache holds
    exactly the views that run would draw. View ``v`` of image ``i`` is the transform under the seed
    ``_sample_seed(seed, v, i)``, the seed online training uses in epoch ``v``: a cached run of
    ``epochs <= num_views`` epochs sees the online run's pixels and differs only by the top-k.

    Layout: ``cache_dir/manifest.json`` (build settings), ``README.md`` (a ``datasets`` config) and
    ``data/train-SSSSS-of-NNNNN.parquet``: shard ``s`` holds images ``[s * shard_size, (s + 1) *
    shard_size)``, one row per (image, view), ordered by image then view, so row ``i * num_views + v``
    of the concatenated shards is view ``v`` of image ``i``. Process ``r`` of ``W`` (``accelerate
    launch``) builds the shards ``s % W == r``. Each shard is written to a temporary name and renamed
    when complete; rerunning the same command skips finished shards (resume). A ``cache_dir`` built
    with other settings is refused. Returns the manifest.
    """
    import argparse

    import datasets
    from accelerate.utils import set_seed

    from . import __version__
    from . import data as D
    from .engine import (
        _create_student,
        _data_config_overrides,
        _load_data,
        _train_aug_kwargs,
        build_accelerator,
        check_config,
        config_from_args,
    )
    from .wrapper import DistillWrapper

    if isinstance(config, argparse.Namespace):
        config = config_from_args(config)
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be an int >= 1, got {num_views!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}.")
    if config.teacher is None and teacher is None:
        raise ValueError("cache-teacher needs a teacher: pass --teacher MODEL.")
    if config.streaming:
        raise ValueError(
            "the teacher cache indexes the rows of a map-style split; streaming datasets are not supported. "
            "Drop --streaming (download the split) to build a cache."
        )
    import dataclasses

    config = dataclasses.replace(config, method="kd", loss_kwargs={})  # the loss is not used here
    check_config(config)
    acc = accelerator or build_accelerator(config)
    set_seed(config.seed)  # as fit does: a random (test) teacher gets the same weights in every process
    data = _load_data(config, acc)
    num_classes = data.num_classes
    _check_k(top_k, num_classes)
    student = _create_student(config, num_classes)
    data_config = D.resolve_model_data_config(
        student, dataset_name=config.dataset, **_data_config_overrides(config)
    )
    transform = D.create_timm_transform(
        data_config, is_training=True, dataset_name=config.dataset, **_train_aug_kwargs(config)
    )
    replay = ReplayTransform(transform)
    with_prior = top_k < num_classes <= TAIL_PRIOR_MAX_CLASSES
    n = len(data.train)
    num_shards = max(1, math.ceil(n / shard_size))
    root, data_dir = Path(cache_dir), Path(cache_dir) / DATA_DIR
    manifest = {
        "format_version": FORMAT_VERSION,
        "teacher": config.teacher,
        "teacher_checkpoint": config.teacher_checkpoint,
        "teacher_checkpoint_sha256": _file_sha256(config.teacher_checkpoint),
        "pretrained_teacher": bool(config.pretrained_teacher),
        "class_map": config.class_map,
        "dataset": config.dataset,
        "train_split": config.train_split,
        "embedded_kwargs": dict(config.embedded_kwargs),
        "dataset_fingerprint": dataset_fingerprint(data.train),
        "num_images": n,
        "num_classes": num_classes,
        "top_k": top_k,
        "num_views": num_views,
        "seed": config.seed,
        "transform": replay.describe(),
        "data_config": {
            k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct")
        },
        "shard_size": shard_size,
        "num_shards": num_shards,
        "index_dtype": str(index_dtype(num_classes)).replace("torch.", ""),
        "tail_prior": TAIL_PRIOR_FILE if with_prior else None,
        "complete": False,
        "timm_kd_version": __version__,
    }
    if (root / MANIFEST_FILE).is_file():  # every rank checks, so all raise together
        saved = read_manifest(root)
        diff = _differences(saved, manifest, BUILD_KEYS)
        if diff:
            raise ValueError(
                f"{root} holds a teacher cache built with other settings ({'; '.join(diff)}). Pass another "
                f"--cache-dir, or delete {root} to rebuild it with these settings."
            )
        if saved.get("complete"):
            _log(acc, f"teacher cache {root} is already complete ({num_shards} shards); nothing to do")
            return saved
    if acc.is_main_process:
        data_dir.mkdir(parents=True, exist_ok=True)
        (root / PRIOR_DIR).mkdir(exist_ok=True)
        for stale in [*data_dir.glob(".tmp-*"), *(root / PRIOR_DIR).glob(".tmp-*")]:  # left by a killed build
            stale.unlink()
        _write_json_atomic(root / MANIFEST_FILE, manifest)
        (root / "README.md").write_text(_README.format(**manifest))
    acc.wait_for_everyone()

    with acc.main_process_first():
        wrapper = DistillWrapper(
            student,
            teacher if teacher is not None else config.teacher,
            loss="kd",
            class_map=_read_class_map(config.class_map),
            teacher_pretrained=config.pretrained_teacher,
            teacher_checkpoint=config.teacher_checkpoint if teacher is None else None,
            data_config=data_config,
            verbose=acc.is_main_process,
        )
    frozen = wrapper.teacher.to(acc.device).eval()
    del wrapper, student
    base = D.TransformedImageDataset(data.train, None, seed=config.seed, on_corrupt="error")
    features = cache_features(top_k, num_classes)
    mine = [s for s in range(num_shards) if s % acc.num_processes == acc.process_index]
    todo = [s for s in mine if not (data_dir / shard_name(s, num_shards)).is_file()]
    _log(
        acc,
        f"caching teacher {config.teacher}: {n} images x {num_views} views, top-{top_k} of {num_classes} "
        f"logits, {num_shards} shards ({len(mine) - len(todo)} of this process' {len(mine)} already done)",
    )
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        items = [(i, v) for i in range(lo, hi) for v in range(num_views)]
        loader = torch.utils.data.DataLoader(
            _ViewSet(base, replay, config.seed, items),
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            collate_fn=_collate_views,
            pin_memory=acc.device.type == "cuda",
        )
        columns: dict[str, list] = {name: [] for name in features}
        prior = TailPrior(num_classes) if with_prior else None
        for batch in loader:
            images = batch.pop("pixel_values").to(acc.device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), acc.autocast():
                logits = frozen(images)
            packed = compress_logits(logits, top_k)
            if prior is not None:
                prior.add(logits)
            columns["values"] += packed["values"].cpu().tolist()
            columns["indices"] += packed["indices"].cpu().tolist()
            columns["lse"] += packed["lse"].cpu().tolist()
            columns["tail_lse"] += packed["tail_lse"].cpu().tolist()
            for key, value in batch.items():
                columns[key] += value
        final = data_dir / shard_name(s, num_shards)
        if prior is not None:  # before the shard: a finished shard always has its prior sums
            _save_atomic(prior.state(), root / PRIOR_DIR / f"{final.stem}.safetensors")
        tmp = data_dir / f".tmp-{final.name}.{os.getpid()}"
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(tmp))
        os.replace(tmp, final)  # a shard is either complete or absent
        _log(acc, f"shard {s + 1}/{num_shards} written ({hi - lo} images x {num_views} views)")
    acc.wait_for_everyone()
    if acc.is_main_process:
        manifest = _finalize(root, manifest)
    acc.wait_for_everyone()
    return read_manifest(root)


def _finalize(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check that every shard is there with the right rows; add statistics; mark complete."""
    import pyarrow.parquet as pq

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


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    """``safetensors`` file written to a temporary name, then renamed: whole or absent."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise RuntimeError(
            f"teacher cache {path.parent.parent}: {path.name} is missing (a shard written by an older "
            f"timm-kd?); delete the cache folder and rebuild it."
        )
    return load_file(str(path))


def _log(acc, msg: str) -> None:
    if acc.is_main_process:
        print(msg, flush=True)


def _read_class_map(class_map: Any) -> Any:
    from .engine import _read_class_map as read

    return read(class_map)


# --------------------------------------------------------------------------------------------------
# Training from the cache
# --------------------------------------------------------------------------------------------------


class _ArrowRows:
    """Fast row reads from a ``datasets.Dataset``'s memory-mapped Arrow table.

    ``ds[i]`` formats a row through several layers of ``datasets`` (~2.5 ms for a cache row, more than
    decoding a small image); here the table's record batches (zero-copy, every column chunked
    alike) are located once per row, and their numeric columns read from zero-copy numpy views (made
    on a batch's first use, so the memory stays the page cache's), bool/string columns as pyarrow
    scalars: a few microseconds per row. Pickles as the dataset (by path), so DataLoader workers
    rebuild their own views.
    """

    def __init__(self, dataset):
        if getattr(dataset, "_indices", None) is not None:
            raise ValueError("_ArrowRows reads table rows directly; flatten_indices() the dataset first")
        self.dataset = dataset
        self._batches: list | None = None
        self._starts: list[int] = []
        self._views: dict[int, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "_batches": None, "_starts": [], "_views": {}}

    def __len__(self) -> int:
        return len(self.dataset)

    def _batch_views(self, b: int) -> dict[str, Any]:
        """Batch ``b``'s columns: numpy views (numbers, fixed-size lists of numbers) or Arrow arrays."""
        import pyarrow as pa

        views = self._views.get(b)
        if views is None:
            views = {}
            batch = self._batches[b]
            for name, column in zip(batch.schema.names, batch.columns):
                kind = column.type
                if pa.types.is_fixed_size_list(kind) and (
                    pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
                ):
                    views[name] = column.flatten().to_numpy(zero_copy_only=True).reshape(-1, kind.list_size)
                elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
                    views[name] = column.to_numpy(zero_copy_only=True)
                else:
                    views[name] = column  # bool (bit-packed) and strings: per-row scalars
            self._views[b] = views
        return views

    def __getitem__(self, i: int) -> dict[str, Any]:
        import bisect
        import itertools

        import numpy as np

        if not 0 <= i < len(self.dataset):
            raise IndexError(f"row {i} out of range for {len(self.dataset)} rows")
        if self._batches is None:
            self._batches = self.dataset.data.table.to_batches()
            self._starts = list(itertools.accumulate((b.num_rows for b in self._batches), initial=0))
        b = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[b]
        return {
            name: np.array(view[j]) if isinstance(view, np.ndarray) else view[j].as_py()
            for name, view in self._batch_views(b).items()
        }


class TeacherCache:
    """An opened, complete teacher cache: its manifest and its rows as a memory-mapped ``datasets.Dataset``.

    ``TeacherCache(dir)`` refuses an incomplete build (rerun ``cache-teacher`` to resume it).
    ``check(...)`` refuses a cache that does not match the training run; ``dataset(...)`` gives the
    training set that replays the stored views.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        import datasets

        self.root = Path(cache_dir)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        if m.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"teacher cache {self.root} has format version {m.get('format_version')}, this timm-kd reads "
                f"{FORMAT_VERSION}; rebuild it with `timm-kd cache-teacher`."
            )
        if not m.get("complete"):
            done = len(list((self.root / DATA_DIR).glob("train-*.parquet")))
            raise ValueError(
                f"teacher cache {self.root} is incomplete ({done} of {m.get('num_shards')} shards written): "
                f"its build was interrupted. Rerun the same `timm-kd cache-teacher` command to finish it."
            )
        files = [str(self.root / DATA_DIR / name) for name in m["shards"]]
        self.rows = datasets.load_dataset("parquet", data_files=files, split="train").with_format("numpy")
        if len(self.rows) != m["num_images"] * m["num_views"]:
            raise ValueError(
                f"teacher cache {self.root}: {len(self.rows)} rows, expected "
                f"{m['num_images'] * m['num_views']}; delete it and rebuild."
            )
        self.reader = _ArrowRows(self.rows)  # what training reads rows through (``self.rows[i]`` is slow)
        self.num_views = int(m["num_views"])
        self.num_classes = int(m["num_classes"])
        self.top_k = int(m["top_k"])
        #: ``[C, C]`` tail prior (``TailPrior``), or None (flat tail): caches of C > 4096, k = C, older builds
        self.tail_prior = None
        if m.get("tail_prior"):
            self.tail_prior = _load_safetensors(self.root / m["tail_prior"])["log_prior"]
            if self.tail_prior.shape != (self.num_classes, self.num_classes):
                raise ValueError(
                    f"teacher cache {self.root}: {m['tail_prior']} has shape {tuple(self.tail_prior.shape)}, "
                    f"expected [{self.num_classes}, {self.num_classes}]; delete the cache and rebuild it."
                )

    def check(self, config, train_dataset, num_classes: int, transform: Callable) -> None:
        """Raise ``ValueError`` listing every difference between the cache and this training run."""
        now = {
            "teacher": config.teacher,
            "teacher_checkpoint_sha256": _file_sha256(config.teacher_checkpoint),
            "pretrained_teacher": bool(config.pretrained_teacher),
            "class_map": config.class_map,
            "dataset_fingerprint": dataset_fingerprint(train_dataset),
            "num_classes": num_classes,
            "transform": ReplayTransform(transform).describe(),
        }
        diff = _differences(self.manifest, now, TRAIN_KEYS)
        if diff:
            raise ValueError(
                f"teacher cache {self.root} does not match this run: {'; '.join(diff)}. Rebuild the cache "
                f"with "
                f"`timm-kd cache-teacher` and this run's flags, or train with the flags the cache was built "
                f"with (see {self.root / MANIFEST_FILE})."
            )

        if config.epochs > self.num_views:
            warnings.warn(
                f"training for {config.epochs} epochs from a cache of {self.num_views} view(s) per image: "
                f"epoch e replays view e % {self.num_views}, so views repeat. Build more views "
                f"(--num-views {config.epochs}) for as many distinct views as online training."
            )
        if config.seed != self.manifest.get("seed"):
            warnings.warn(
                f"the cache's views were drawn with seed {self.manifest.get('seed')}, this run uses "
                f"--seed {config.seed}: the views are still valid augmentations, but not the ones an online "
                f"run with this seed would draw."
            )

    def dataset(self, train_dataset, transform: Callable, *, seed: int = 0) -> CachedViewDataset:
        """The training set replaying the stored views (collate with ``collate_cached``)."""
        return CachedViewDataset(train_dataset, self, transform, seed=seed)

    @staticmethod
    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_cached(batch)


class CachedViewDataset(torch.utils.data.Dataset):
    """Training samples replayed from a teacher cache.

    ``ds[(i, epoch)]`` (what ``SeededSampler`` yields) reads row ``i * num_views + epoch % num_views``
    of the cache, decodes image ``i``, applies the stored crop/flip/jitter with ``ReplayTransform``
    (the pixels the teacher saw) and returns ``{"pixel_values", "label", "index", "teacher_values",
    "teacher_indices", "teacher_lse"}``. Collate with ``collate_cached``.
    """

    def __init__(self, train_dataset, cache: TeacherCache, transform: Callable, *, seed: int = 0):
        from .data import TransformedImageDataset

        self.base = TransformedImageDataset(train_dataset, None, seed=seed)
        self.cache = cache
        self.replay = ReplayTransform(transform)
        self.index_dtype = index_dtype(cache.num_classes)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from .data import _decode

        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        view = epoch % self.cache.num_views
        row = self.cache.reader[index * self.cache.num_views + view]
        if int(row["index"]) != index or int(row["view"]) != view:
            raise ValueError(
                f"teacher cache {self.cache.root}: row {index * self.cache.num_views + view} holds image "
                f"{int(row['index'])} view {int(row['view'])}, expected image {index} view {view}; the cache "
                f"is damaged: delete it and rebuild."
            )
        item = self.base.dataset[index]
        params = {
            "crop": row["crop"].tolist(),
            "hflip": bool(row["hflip"]),
            "vflip": bool(row["vflip"]),
            "interpolation": str(row["interpolation"]),
            "jitter": row["jitter"].tolist(),
            "jitter_order": row["jitter_order"].tolist(),
        }
        pixels, _ = self.replay.replay(_decode(item["image"]), params)
        return {
            "pixel_values": pixels,
            "label": int(item["label"]),
            "index": index,
            # datasets' numpy format widens small ints: back to the stored dtypes (fp16, int16/int32)
            "teacher_values": torch.as_tensor(row["values"]).to(torch.float16),
            "teacher_indices": torch.as_tensor(row["indices"]).to(self.index_dtype),
            "teacher_lse": torch.tensor(float(row["lse"]), dtype=torch.float32),
            "teacher_tail_lse": torch.tensor(float(row["tail_lse"]), dtype=torch.float32),
        }


def collate_cached(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``timm_kd.data.collate_images`` plus the stacked ``teacher_*`` tensors."""
    from .data import collate_images

    out = collate_images(batch)
    for key in TEACHER_KEYS:
        out[key] = torch.stack([item[key] for item in batch])
    return out


class CachedDistill(nn.Module):
    """The cached counterpart of ``DistillWrapper``: a student and a loss, teacher logits from the batch.

    ``forward(images, target, epoch, teacher_values=..., teacher_indices=..., teacher_lse=...,
    teacher_tail_lse=...)``
    rebuilds the teacher's ``[B, C]`` logits with ``expand_logits`` (with the cache's tail prior, unless
    ``tail="flat"``) and returns ``{"loss", "output",
    "teacher_output", <loss terms>}`` like the wrapper. No teacher network exists in memory.
    """

    def __init__(
        self,
        student: nn.Module,
        loss: str,
        num_classes: int,
        cache: TeacherCache | None = None,
        tail: str = "prior",
        **loss_kwargs: Any,
    ):
        super().__init__()
        from .losses import create_loss

        if tail not in TAIL_MODES:
            raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}.")
        self.student = student
        self.loss_fn = create_loss(loss, **loss_kwargs)
        self.loss_name = loss
        self.num_classes = int(num_classes)
        self.cache = cache
        prior = cache.tail_prior if cache is not None and tail == "prior" else None
        self.register_buffer("tail_prior", prior, persistent=False)  # moves with .to(device)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        epoch: float | None = None,
        *,
        teacher_values: torch.Tensor,
        teacher_indices: torch.Tensor,
        teacher_lse: torch.Tensor | None = None,
        teacher_tail_lse: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        teacher_output = expand_logits(
            teacher_values, teacher_indices, self.num_classes, teacher_lse, teacher_tail_lse, self.tail_prior
        )
        output = self.student(images)
        terms = self.loss_fn(output, teacher_output, target, epoch=epoch)
        result = dict(terms)
        result["output"] = output
        result["teacher_output"] = teacher_output
        return result


def topk_error(
    loss_fn: Callable,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    k: int,
    *,
    epoch: float | None = None,
    use_lse: bool = True,
    tail_prior: Tensor | None = None,
) -> dict[str, float]:
    """How much distilling from top-k teacher logits changes a loss and its gradient.

    Computes ``L = loss_fn(z_s, z_t, y)["loss"]`` with the full teacher logits and ``L_k`` with
    ``expand_logits(compress_logits(z_t, k), tail_prior=...)``, and their gradients ``g``, ``g_k`` with
    respect to the student logits ``z_s``::

        loss_rel_err = |L_k - L| / |L|
        grad_rel_err = ||g_k - g||_F / ||g||_F
        grad_cos     = <g_k, g> / (||g_k|| ||g||)

    The gradient is what training sees: ``grad_rel_err`` of 0.05 means the update direction moves by
    about 3 degrees. Measured per registered loss in ``docs/cache.md``.
    """
    packed = compress_logits(teacher_logits, k)
    lse = (packed["lse"], packed["tail_lse"]) if use_lse else (None, None)
    approx = expand_logits(packed["values"], packed["indices"], teacher_logits.shape[1], *lse, tail_prior)
    out = {}
    grads = []
    for z_t in (teacher_logits.detach().float(), approx):
        z_s = student_logits.detach().float().clone().requires_grad_(True)
        loss = loss_fn(z_s, z_t, target, epoch=epoch)["loss"]
        (g,) = torch.autograd.grad(loss, z_s)
        grads.append(g)
        out.setdefault("losses", []).append(float(loss.detach()))
    full, topk = out.pop("losses")
    g, gk = grads
    return {
        "loss": full,
        "loss_topk": topk,
        "loss_rel_err": abs(topk - full) / max(abs(full), 1e-12),
        "grad_rel_err": float((gk - g).norm() / g.norm().clamp_min(1e-12)),
        "grad_cos": float((gk * g).sum() / (gk.norm() * g.norm()).clamp_min(1e-12)),
    }
