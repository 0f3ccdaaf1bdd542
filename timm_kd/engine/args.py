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
import types
import typing
from typing import Any

from .config import TrainConfig, option_flag

__all__ = ["HelpFormatter", "add_train_args", "config_from_args"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Recipe ``--help``: the script's docstring as written, and each flag's default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, True, False, [], argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


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
    kw: dict[str, Any] = {"default": value, "help": meta["help"].replace("{default}", str(value))}
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


def add_train_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add a flag for every ``TrainConfig`` field to ``parser``, in its help group, with ``defaults``
    (TrainConfig field names) overriding the dataclass defaults, plus the publishing flags.
    Returns ``parser``; ``config_from_args`` turns the parsed namespace into a ``TrainConfig``."""
    fields = dataclasses.fields(TrainConfig)
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"add_train_args: unknown defaults {sorted(unknown)}")
    d = TrainConfig(**defaults)
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, Any] = {}
    parser_defaults: dict[str, Any] = {}
    for f in fields:
        title = f.metadata["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        parser_defaults.update(_add_option(groups[title], f, hints[f.name], getattr(d, f.name)))

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
            kw[f.name] = {**values.get(_defaults_key(dest), {}), **dict(values.get(dest, []))}
        elif f.name in values:
            kw[f.name] = values[f.name]
    return TrainConfig(**kw)
