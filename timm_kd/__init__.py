"""timm-kd: knowledge distillation for timm image models."""
from .losses import create_loss, list_losses, register_loss

__version__ = "0.1.0"

__all__ = ["__version__", "create_loss", "list_losses", "register_loss"]
