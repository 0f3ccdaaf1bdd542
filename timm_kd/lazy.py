"""Package attributes resolved on first use (PEP 562), so that importing a package costs nothing.

``timm_kd`` and ``timm_kd.engine`` name their public objects in a table (name -> submodule) and
install the pair this module returns::

    __getattr__, __dir__ = lazy_attributes(__name__, globals(), {"fit": "loop", ...})

``timm_kd.engine.fit`` then imports ``timm_kd.engine.loop`` on first access and caches the object
in the package's namespace; a submodule name (``timm_kd.engine.setup``) resolves too. That is
what lets ``timm-kd --help`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, namespace: dict[str, Any], table: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``namespace`` is its ``globals()``.

    ``table`` maps each public name to the submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
