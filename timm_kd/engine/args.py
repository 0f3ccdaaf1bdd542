"""The command line, generated from ``TrainConfig``'s field metadata; recipes only change defaults.

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_train_args(parser, **IMAGENET_DEFAULTS, method="ats")
    config = config_from_args(parser.parse_args())

Each field becomes one flag in its help group (see ``timm_kd.engine.config`` for the metadata):
an int or float field parses its text with ``int``/``float``, a boolean is a switch (``--x``, or
``--no-x`` for a field that defaults to True, or ``--x/--no-x``), a field with ``parse`` uses that
function, and a dict field (``loss_kwargs``) is a repeatable ``KEY=VALUE`` flag whose pairs update
the recipe's defaults. ``--push-to-hub`` and ``--hub-private`` are the recipes' publishing flags,
not training options: ``config_from_args`` leaves them in the namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from .config import TrainConfig, option_flag

__all__ = ["HelpFormatter", "add_train_args", "config_from_args", "RecipeCropPct", "SMALL_INPUT_SIZE"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Recipe ``--help``: the script's docstring as written, and each flag's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = "%(default)" in text or "(default:" in text
        if not shown and default not in (None, True, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


#: below this --input-size a recipe's eval crop fraction becomes 1.0 (see ``RecipeCropPct``)
SMALL_INPUT_SIZE = 64
_NONE_DEFAULT = re.compile(r" ?\(default: [^()]*\)")


class RecipeCropPct(float):
    """A recipe's ``--crop-pct`` default, told apart from a value the user typed (a plain float).

    An eval center crop of ``crop_pct`` resizes the short side to ``input_size / crop_pct`` and cuts
    the border away: at ImageNet's 224 px (0.875) the border is background, but an image of 32 or 48
    px has no border to spare (CIFAR practice evaluates the whole image). So a recipe's default
    applies at ``--input-size`` of ``SMALL_INPUT_SIZE`` and above, and 1.0 below; a ``--crop-pct``
    given on the command line always applies.
    """

    def __repr__(self) -> str:
        return repr(float(self))


def _resolve_crop_pct(values: dict[str, Any]) -> float | None:
    crop, size = values.get("crop_pct"), values.get("input_size")
    if isinstance(crop, RecipeCropPct):
        return 1.0 if size is not None and size < SMALL_INPUT_SIZE else float(crop)
    return crop


#: where ``add_train_args`` records the method its ``loss_kwargs`` defaults belong to
_LOSS_DEFAULTS_METHOD = "_loss_defaults_method"


def _defaults_key(dest: str) -> str:
    """Where a repeatable ``KEY=VALUE`` flag's recipe defaults wait in the namespace
    (``loss_args`` -> ``_loss_defaults``)."""
    return "_" + dest.removesuffix("_args") + "_defaults"


def _scalar_type(annotation: Any) -> Any:
    """``int`` or ``float`` for an ``int``/``float`` field (optional or not); None (text) otherwise."""
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = [m for m in members if m is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (int, float) else None


def _add_option(group, f: dataclasses.Field, annotation: Any, value: Any) -> dict[str, Any]:
    """Add the flag of field ``f`` with default ``value``; returns the parser defaults it needs."""
    meta, flag = f.metadata, option_flag(f)
    text = meta["help"].replace("{default}", str(value))
    if value is not None and "dest" not in meta:
        # "(default: the student's)" says what None means; a recipe's value replaces it
        text = _NONE_DEFAULT.sub("", text)
    small_crop = isinstance(value, float) and value != 1.0 and not isinstance(value, RecipeCropPct)
    if f.name == "crop_pct" and small_crop:
        value = RecipeCropPct(value)
        text += f" (default: {float(value)}; 1.0 below {SMALL_INPUT_SIZE} px unless given)"
    kw: dict[str, Any] = {"default": value, "help": text}
    for key in ("choices", "metavar"):
        if key in meta:
            kw[key] = meta[key]
    if flag != "--" + f.name.replace("_", "-"):
        kw["dest"] = f.name
    extra: dict[str, Any] = {}
    if "dest" in meta:  # repeatable KEY=VALUE pairs over the recipe's defaults
        kw.update(dest=meta["dest"], action="append", type=meta["parse"], default=[])
        extra[_defaults_key(meta["dest"])] = dict(value)
    elif meta.get("action") == "optional":
        kw["action"] = argparse.BooleanOptionalAction
    elif isinstance(f.default, bool):
        kw["action"] = "store_false" if flag.startswith("--no-") and f.default else "store_true"
    else:
        parse = meta.get("parse") or _scalar_type(annotation)
        if parse is not None:
            kw["type"] = parse
    group.add_argument(flag, **kw)
    return extra


def add_train_args(
    parser: argparse.ArgumentParser, *, only_groups: tuple[str, ...] | None = None, **defaults: Any
) -> argparse.ArgumentParser:
    """Add a flag for every ``TrainConfig`` field to ``parser``, in its help group, with ``defaults``
    (TrainConfig field names) overriding the dataclass defaults, plus the publishing flags.
    ``only_groups`` (help group titles) keeps only those groups' flags and no publishing flags (a command
    that does not train: the other fields keep their defaults). Returns ``parser``;
    ``config_from_args`` turns the parsed namespace into a ``TrainConfig``."""
    fields = dataclasses.fields(TrainConfig)
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"add_train_args: unknown defaults {sorted(unknown)}")
    d = TrainConfig(**defaults)
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    parser_defaults: dict[str, Any] = {_LOSS_DEFAULTS_METHOD: d.method}  # the loss the defaults are for
    for f in fields:
        title = f.metadata["group"]
        if only_groups is not None and title not in only_groups:
            continue
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        parser_defaults.update(_add_option(groups[title], f, hints[f.name], getattr(d, f.name)))
    if only_groups is not None:
        parser.set_defaults(**parser_defaults)
        return parser
    g = parser.add_argument_group("publishing")
    g.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="after training, push the student (timm format + model card) to this Hub repo, e.g. "
        "your-name/resnet18-ats; the id and a token are checked before training starts",
    )
    g.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    parser.set_defaults(**parser_defaults)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from parsed ``add_train_args`` flags (extra recipe flags are ignored)."""
    values = vars(args)
    kw = {}
    for f in dataclasses.fields(TrainConfig):
        dest = f.metadata.get("dest")
        if dest is not None:
            defaults = values.get(_defaults_key(dest), {})
            owner = values.get(_LOSS_DEFAULTS_METHOD, values.get("method"))
            if dest == "loss_args" and values.get("method") != owner:
                defaults = {}  # a recipe's loss arguments belong to its own loss, not to another --method
            kw[f.name] = {**defaults, **dict(values.get(dest, []))}
        elif f.name in values:
            kw[f.name] = values[f.name]
    if "crop_pct" in kw:
        kw["crop_pct"] = _resolve_crop_pct(values)
    return TrainConfig(**kw)
