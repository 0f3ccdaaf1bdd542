"""Metric modules shipped with timm-kd, loaded by path through ``evaluate`` (no download).

``load_topk_metric()`` returns the top-1/top-5 accuracy metric (``topk_accuracy/topk_accuracy.py``).
"""

from __future__ import annotations

import os
from typing import Any

import evaluate

__all__ = ["TOPK_ACCURACY_PATH", "load_topk_metric"]

#: folder of the top-k accuracy metric module, for ``evaluate.load(TOPK_ACCURACY_PATH)``
TOPK_ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topk_accuracy")


def load_topk_metric(config_name: str | None = None, **kwargs: Any) -> Any:
    """``evaluate.load`` of the shipped top-k accuracy metric; works offline.

    Args:
        config_name: ``None``/``"default"`` for class ids (ranked best first), ``"logits"`` for raw scores.
        kwargs: passed to ``evaluate.load`` (``keep_in_memory`` defaults to True: no arrow files on disk).
    """
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(TOPK_ACCURACY_PATH, config_name, **kwargs)
