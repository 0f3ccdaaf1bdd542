"""Loss registry: register distillation losses by name, create them by name.

Modelled on timm's model registry (``register_model`` / ``create_model`` / ``list_models``).

A loss entry point is any callable (a class or a factory function) that returns a loss object
following the one calling convention of timm-kd::

    loss_fn(student_logits, teacher_logits, target, *, epoch=None) -> dict[str, Tensor]

``"loss"`` in the returned dict is the whole objective (cross-entropy included) that
``backward()`` is called on; the other keys are the individual terms, for logging.

Other packages add losses through the ``timm_kd.losses`` entry-point group. In their
``pyproject.toml``::

    [project.entry-points."timm_kd.losses"]
    my_kd = "my_package.losses:MyKDLoss"

The entry point's name becomes the registry name. Entry points are loaded lazily, the first time
the registry is queried, and a broken plug-in is reported with a warning instead of breaking
``import timm_kd``.
"""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

__all__ = [
    "ENTRY_POINT_GROUP",
    "register_loss",
    "create_loss",
    "list_losses",
    "is_loss",
    "get_loss_entrypoint",
]

ENTRY_POINT_GROUP = "timm_kd.losses"

_loss_entrypoints: dict[str, Callable[..., Any]] = {}
_loss_to_module: dict[str, str] = {}
_plugins_loaded = False

F = TypeVar("F", bound=Callable[..., Any])


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"loss name must be a non-empty string without surrounding spaces, got {name!r}")
    return name


def register_loss(name: str | None = None, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator that registers a loss class or factory under ``name``.

    Args:
        name: registry name; defaults to the decorated object's ``__name__`` in lower case.
        overwrite: replace an existing entry of the same name instead of raising.

    Example::

        @register_loss("my_kd")
        class MyKD(torch.nn.Module):
            def forward(self, student_logits, teacher_logits, target, *, epoch=None):
                ...
                return {"loss": loss, "kd": kd}
    """

    def _register(fn: F) -> F:
        key = _check_name(name if name is not None else fn.__name__.lower())
        if key in _loss_entrypoints and not overwrite and _loss_entrypoints[key] is not fn:
            raise ValueError(
                f"a loss named {key!r} is already registered by "
                f"{_loss_to_module.get(key, '?')}; pick another name or pass overwrite=True"
            )
        _loss_entrypoints[key] = fn
        _loss_to_module[key] = getattr(fn, "__module__", "?")
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


def create_loss(name: str, *, compile: bool | dict[str, Any] = False, **kwargs: Any) -> Any:
    """Create a registered loss by name: ``create_loss("ats", tau_correct=4.0, tau_wrong=2.0)``.

    ``compile=True`` (or a dict of ``torch.compile`` keyword arguments) returns it wrapped by
    ``compile_loss``: compiled once, whatever the epoch (``_compile.py``).
    """
    loss_fn = get_loss_entrypoint(name)(**kwargs)
    if compile:
        from ._compile import compile_loss

        return compile_loss(loss_fn, **(compile if isinstance(compile, dict) else {}))
    return loss_fn
