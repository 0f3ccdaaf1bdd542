"""Distillation losses and their registry.

Every loss follows one calling convention (see ``_base.py``)::

    loss_fn(student_logits, teacher_logits, target, *, epoch=None) -> dict[str, Tensor]

Create them by name with ``create_loss("ats", tau_correct=4.0, tau_wrong=2.0)``; list them with
``list_losses()``; add your own with ``@register_loss("name")`` or the ``timm_kd.losses``
entry-point group; read a loss's model-card facts with ``get_loss_card(name)``. Importing a
method's module registers it: one file per method.
"""
from ._base import DistillLoss, LossInputs, cross_entropy
from ._compile import CompiledLoss, compile_loss
from ._registry import (
    ENTRY_POINT_GROUP,
    LossCard,
    create_loss,
    get_loss_card,
    get_loss_entrypoint,
    is_loss,
    list_losses,
    register_loss,
)
from .ats import (
    ATSLoss,
    ISATSLoss,
    ats_target_probs,
    isats_candidates,
    isats_select_tau_wrong,
    label_gap,
    wrong_class_moments,
)
from .dist import DISTLoss
from .dkd import DKDLoss
from .dtkd import DTKDLoss
from .functional import kl_div, soft_cross_entropy, standardize_logits, tempered_kl
from .kd import KDLoss, kd_term
from .lskd import LSKDLoss

__all__ = [
    "ENTRY_POINT_GROUP",
    # losses and their base
    "ATSLoss", "DISTLoss", "DKDLoss", "DTKDLoss", "DistillLoss", "ISATSLoss", "KDLoss", "LSKDLoss",
    "LossInputs",
    # registry and compilation
    "CompiledLoss", "LossCard", "compile_loss", "create_loss", "get_loss_card", "get_loss_entrypoint",
    "is_loss", "list_losses", "register_loss",
    # functions
    "ats_target_probs", "cross_entropy", "isats_candidates", "isats_select_tau_wrong", "kd_term", "kl_div",
    "label_gap", "soft_cross_entropy", "standardize_logits", "tempered_kl", "wrong_class_moments",
]
