"""timm-kd: knowledge distillation for timm image models."""
from .hub import push_to_hub, save_pretrained, validate_repo_id
from .losses import create_loss, list_losses, register_loss
from .version import __version__
from .wrapper import DistillWrapper

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
