"""Replayable augmentation: draw a view's parameters once, apply them again later, pixel for pixel.

A cache stores, per view, the parameters of its random steps (crop, flips, colour jitter); training
applies them again with ``ReplayTransform.replay(image, params)`` and sees the pixels the teacher saw.
``ReplayedViews`` is the dataset a build runs the teacher on: view ``v`` of image ``i`` is the
transform under the seed online training uses for image ``i`` in epoch ``v``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .. import data as D

__all__ = [
    "DETERMINISTIC_STEPS",
    "REPLAYABLE_STEPS",
    "default_view_params",
    "ReplayTransform",
    "ReplayedViews",
    "collate_views",
]

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


class ReplayedViews(torch.utils.data.Dataset):
    """``(index, view)`` pairs -> view ``view`` of training image ``index`` and its parameters.

    ``base`` is a ``timm_kd.data.TransformedImageDataset`` (its ``.dataset`` is read); the view is
    ``replay`` under the seed ``sample_seed(seed, view, index)``, the seed online training uses for
    image ``index`` in epoch ``view``. Items are ``{"pixel_values", "index", "view", "label",
    <view params>}``; collate with ``collate_views``. A corrupt image raises, naming the fix.
    """

    def __init__(self, base, replay: ReplayTransform, seed: int, items: list[tuple[int, int]]):
        self.base, self.replay, self.seed, self.items = base, replay, seed, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index, view = self.items[j]
        row = self.base.dataset[index]
        try:
            image = D.decode_image(row["image"])
        except Exception as e:
            raise ValueError(
                f"cannot cache {D.describe_image(row['image'], index)}: {type(e).__name__}: {e}. Drop "
                f"corrupt images first with --verify-images yes --on-corrupt skip (in both cache-teacher "
                f"and training)."
            ) from e
        pixels, params = D.seeded_transform(self.replay, image, D.sample_seed(self.seed, view, index))
        return {"pixel_values": pixels, "index": index, "view": view, "label": int(row["label"]), **params}


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacked ``pixel_values``; every other key as a list (the columns of a shard)."""
    out: dict[str, Any] = {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
    for key in items[0]:
        if key != "pixel_values":
            out[key] = [it[key] for it in items]
    return out
