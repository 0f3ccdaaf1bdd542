"""Distillation losses and their registry.

Every loss follows one calling convention (see ``_base.py``)::

    loss_fn(student_logits, teacher_logits, target, *, epoch=None) -> dict[str, Tensor]

Create them by name with ``create_loss("ats", tau_correct=4.0, tau_wrong=2.0)``; list them with
``list_losses()``; add your own with ``@register_loss("name")`` or the ``timm_kd.losses``
entry-point group.
"""
from ._base import DistillLoss, LossInputs, cross_entropy, kl_div, soft_cross_entropy
from ._registry import (
    ENTRY_POINT_GROUP,
    create_loss,
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
from .kd import KDLoss, kd_term
from .standardize import standardize_logits

# Importing a loss module registers it. Keep one import per method file.
for _mod in ("ats", "dtkd", "dkd", "dist", "lskd"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # pragma: no cover - files land one by one during development
        if _e.name != f"{__name__}.{_mod}":
            raise
del _mod
