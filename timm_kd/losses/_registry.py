"""Loss registry: register distillation losses by name, create them by name, read their card facts.

Modelled on timm's model registry (``register_model`` / ``create_model`` / ``list_models``, with
metadata attached at registration). An entry is any callable (a class or a factory) returning a
loss of the calling convention in ``_base.py``, and may carry a ``LossCard``: the facts a model
card states about the method, read by the hub with ``get_loss_card``.

Other packages add losses through the ``timm_kd.losses`` entry-point group (the entry point's name
becomes the registry name; docs/losses.md). Entry points are loaded the first time the registry is
queried; a broken plug-in is reported with a warning instead of breaking ``import timm_kd``.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from typing import Any, TypeVar

from ._compile import compile_loss

__all__ = [
    "ENTRY_POINT_GROUP", "LossCard", "create_loss", "get_loss_card", "get_loss_entrypoint", "is_loss",
    "list_losses", "register_loss",
]

ENTRY_POINT_GROUP = "timm_kd.losses"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class LossCard:
    """What a model card says about a distillation method.

    ``title`` (``"Asymmetric Temperature Scaling (ATS)"``), ``paper`` (``"Li et al., NeurIPS 2022"``),
    ``summary`` (one or two sentences, past tense, on what the student was trained with), ``arxiv``
    (``"2210.04427"``), ``cites`` (BibTeX keys, the method's own paper first; the built-ins' are in
    ``model_cards/citations.bib``) and ``bibtex`` (entries for keys not in that file: plug-ins).
    """

    title: str
    paper: str
    summary: str
    arxiv: str | None = None
    cites: tuple[str, ...] = ()
    bibtex: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cites", (self.cites,) if isinstance(self.cites, str) else tuple(self.cites))
        given = [("title", self.title), ("paper", self.paper), ("summary", self.summary)]
        given += [(k, v) for k, v in (("arxiv", self.arxiv), ("bibtex", self.bibtex)) if v is not None]
        given += [("cites", key) for key in self.cites]
        for name, value in given:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"LossCard.{name} must be a non-empty string, got {value!r}")

    @classmethod
    def from_any(cls, card: LossCard | Mapping[str, Any]) -> LossCard:
        """``card`` itself, or a ``LossCard`` built from a mapping of its fields."""
        if isinstance(card, cls):
            return card
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(card) - set(known))
        if unknown:
            raise ValueError(f"unknown LossCard field(s) {unknown}; the fields are {known}")
        return cls(**card)


class LossArgumentError(ValueError, TypeError):
    """A keyword the loss does not take: a ValueError (a bad configuration value) and a TypeError
    (what calling the loss with it would raise), so handlers of either catch it."""


_loss_entrypoints: dict[str, Callable[..., Any]] = {}
_loss_to_module: dict[str, str] = {}
_loss_cards: dict[str, LossCard | None] = {}
_plugins_loaded = False


def register_loss(
    name: str | None = None,
    *,
    overwrite: bool = False,
    card: LossCard | Mapping[str, Any] | None = None,
) -> Callable[[F], F]:
    """Decorator that registers a loss class or factory under ``name``.

    Args:
        name: registry name; defaults to the decorated object's ``__name__`` in lower case.
        overwrite: replace an existing entry of the same name instead of raising.
        card: the method's model-card facts (a ``LossCard`` or a mapping of its fields), returned
            by ``get_loss_card(name)``; without one the model card names the loss only.
    """
    facts = None if card is None else LossCard.from_any(card)

    def _register(fn: F) -> F:
        key = name if name is not None else fn.__name__.lower()
        if not isinstance(key, str) or not key or key != key.strip():
            raise ValueError(f"loss name must be a non-empty string without surrounding spaces, got {key!r}")
        if key in _loss_entrypoints and not overwrite and _loss_entrypoints[key] is not fn:
            raise ValueError(
                f"a loss named {key!r} is already registered by "
                f"{_loss_to_module.get(key, '?')}; pick another name or pass overwrite=True"
            )
        _loss_entrypoints[key] = fn
        _loss_to_module[key] = getattr(fn, "__module__", "?")
        _loss_cards[key] = facts
        return fn

    return _register


def _load_plugins() -> None:
    """Import losses that other installed packages declare in the ``timm_kd.losses`` group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _loss_entrypoints:
            continue  # built-ins and explicit registrations win over plug-ins of the same name
        try:
            fn = ep.load()
        except Exception as e:  # a broken plug-in must not break timm_kd
            warnings.warn(f"could not load timm-kd loss plug-in {ep.name!r} ({ep.value}): {e!r}")
            continue
        # The plug-in module may have registered itself with @register_loss on import.
        if ep.name not in _loss_entrypoints:
            register_loss(ep.name)(fn)


def list_losses(filter: str = "") -> list[str]:
    """Sorted registry names, optionally filtered by a wildcard pattern (``"*kd"``)."""
    _load_plugins()
    names = sorted(_loss_entrypoints)
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter)]
    return names


def is_loss(name: str) -> bool:
    _load_plugins()
    return name in _loss_entrypoints


def get_loss_entrypoint(name: str) -> Callable[..., Any]:
    """The class or factory registered under ``name``; unknown names raise with suggestions."""
    _load_plugins()
    try:
        return _loss_entrypoints[name]
    except (KeyError, TypeError):
        pass
    known = sorted(_loss_entrypoints)
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown loss {name!r}.{hint} Known losses: {', '.join(known)}. "
        f"Third-party losses register through the {ENTRY_POINT_GROUP!r} entry-point group."
    )


def get_loss_card(name: str) -> LossCard | None:
    """The ``LossCard`` registered with ``name``, or None for a loss registered without one.

    Unknown names raise the same ValueError as ``get_loss_entrypoint``.
    """
    get_loss_entrypoint(name)
    return _loss_cards.get(name)


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """A ValueError naming the loss and its parameters for keywords ``fn`` does not accept."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        p.name for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, accepted, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise LossArgumentError(
            f"loss {name!r} does not take the argument(s) {', '.join(hints)}. "
            f"Its parameters: {', '.join(accepted) or '(none)'}"
        )


def create_loss(name: str, *, compile: bool | dict[str, Any] = False, **kwargs: Any) -> Any:
    """Create a registered loss by name: ``create_loss("ats", tau_correct=4.0, tau_wrong=2.0)``.

    A keyword the loss does not take raises a ValueError (``LossArgumentError``) naming the loss and
    its parameters. ``compile=True`` (or a dict of ``torch.compile`` keyword arguments) returns it
    through ``compile_loss``: compiled once, whatever the epoch.
    """
    entry = get_loss_entrypoint(name)
    _check_kwargs(name, entry, kwargs)
    loss_fn = entry(**kwargs)
    if compile:
        return compile_loss(loss_fn, **(compile if isinstance(compile, dict) else {}))
    return loss_fn
