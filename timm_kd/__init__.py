"""timm-kd: knowledge distillation for timm image models.

The public names below are imported on first use (PEP 562), so that ``import timm_kd`` and the
command line's ``--help`` do not import torch; ``from timm_kd import DistillWrapper`` works as usual.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_attributes
from .version import __version__

if TYPE_CHECKING:  # the static view of the lazy names below (and the import graph's edges)
    from .hub import push_to_hub, save_pretrained, validate_repo_id
    from .losses import create_loss, list_losses, register_loss
    from .wrapper import DistillWrapper

#: public name -> the submodule that defines it
_LAZY = {
    "DistillWrapper": "wrapper",
    "create_loss": "losses",
    "list_losses": "losses",
    "register_loss": "losses",
    "push_to_hub": "hub",
    "save_pretrained": "hub",
    "validate_repo_id": "hub",
}

__all__ = [
    "DistillWrapper",
    "__version__",
    "create_loss",
    "list_losses",
    "register_loss",
    "push_to_hub",
    "save_pretrained",
    "validate_repo_id",
]


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
