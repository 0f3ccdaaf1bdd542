"""Whether the Hugging Face Hub can be reached, decided in seconds rather than after retries.

Without a network, ``huggingface_hub`` retries each file with back-off (about 50 s for one timm
model) and ``datasets`` does the same for a dataset id, then both raise errors that name neither
what was being loaded nor the fixes. ``hub_unreachable_reason`` answers at once: the offline
environment variables, else one TCP connection to the endpoint (``HF_ENDPOINT``, default
``https://huggingface.co``) with a short timeout. When the Hub cannot be reached, callers load
inside ``hub_offline_mode()``: files already in the local Hugging Face cache still load, and a
missing one fails immediately, so the caller can raise ``HubUnreachableError`` naming the model or
dataset and the local alternatives.

Behind an HTTP(S) proxy (``HTTPS_PROXY``, ``ALL_PROXY``) a direct connection says nothing, so no
probe is made and the Hub counts as reachable.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import huggingface_hub.constants as hub_constants

__all__ = [
    "HubUnreachableError",
    "hub_cache_dir",
    "hub_endpoint",
    "hub_offline_mode",
    "hub_unreachable_reason",
]

_TRUE = ("1", "ON", "YES", "TRUE")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_probed: dict[str, str | None] = {}  # endpoint -> reason (None: reachable); one probe per process


class HubUnreachableError(ConnectionError):
    """A model or dataset needs the Hugging Face Hub, which cannot be reached, and is not cached."""


def hub_endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT``, else ``https://huggingface.co``."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps downloaded files (``HF_HUB_CACHE``, by default under ``HF_HOME``)."""
    return hub_constants.HF_HUB_CACHE


def _offline_variable() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return var
    return None


def _probe(endpoint: str, timeout: float) -> str | None:
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        return f"HF_ENDPOINT={endpoint!r} is not a URL"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:  # DNS failure, refused, unreachable network, timeout
        return f"{endpoint} cannot be reached ({type(e).__name__}: {e})"


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be used now (``"HF_HUB_OFFLINE=1 is set"``, ``"... cannot be reached"``), or None.

    The offline variables (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``)
    answer without a network call; otherwise one TCP connection to ``hub_endpoint()`` is tried
    (``timeout`` seconds), once per process and endpoint. Behind a proxy the answer is None.
    """
    var = _offline_variable()
    if var is not None:
        return f"{var}={os.environ[var]} is set"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    endpoint = hub_endpoint()
    if endpoint not in _probed:
        _probed[endpoint] = _probe(endpoint, timeout)
    return _probed[endpoint]


@contextlib.contextmanager
def hub_offline_mode() -> Iterator[None]:
    """Within the block, ``huggingface_hub`` and ``datasets`` (if imported) act as with ``HF_HUB_OFFLINE=1``.

    Both libraries read the variable once, at import, into a module constant that their calls
    consult; the block sets those constants and restores them after. Cached files load, anything
    else raises at once instead of retrying.
    """
    saved: list[tuple[object, str, object]] = [
        (hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)
    ]
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        names = [n for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(ds_config, n)]
        saved += [(ds_config, n, getattr(ds_config, n)) for n in names]
    try:
        for module, name, _ in saved:
            setattr(module, name, True)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
