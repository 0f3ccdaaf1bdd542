"""Publish distilled students to the Hugging Face Hub in timm's own format.

A saved folder, and the Hub repository a push creates, hold exactly what plain ``timm`` reads::

    config.json        architecture, num_classes, num_features, global_pool, label_names (when
                       known), model_args (the keyword arguments that rebuild the network) and
                       pretrained_cfg (the preprocessing the student was trained and evaluated with)
    model.safetensors  the student's state dict
    README.md          the model card, rendered from ``model_cards/student_card.md``

so that, with only timm installed::

    timm.create_model("hf-hub:org/name", pretrained=True)       # from the Hub
    timm.create_model("local-dir:/path/to/folder", pretrained=True)  # timm >= 1.0.16

rebuild the student. Modules: ``config`` (``config.json``: ``student_config``), ``card`` (the
model card from the run metadata and the loss's card facts: ``create_model_card``, ``META_KEYS``),
``provenance`` (what taught the student: ``describe_teacher``) and ``push``
(``validate_repo_id``, ``check_push_ready``, ``save_pretrained``, ``push_to_hub``, ``push_report``).
"""
from .card import META_KEYS, PLAIN_TRAINING, create_model_card
from .config import CONFIG_NAME, student_config
from .provenance import describe_teacher
from .push import (
    CARD_NAME,
    FOLDER_FILES,
    WEIGHTS_NAME,
    HubPushError,
    check_push_ready,
    push_report,
    push_to_hub,
    save_pretrained,
    validate_repo_id,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "FOLDER_FILES",
    "META_KEYS",
    "PLAIN_TRAINING",
    "HubPushError",
    "validate_repo_id",
    "check_push_ready",
    "student_config",
    "create_model_card",
    "describe_teacher",
    "save_pretrained",
    "push_to_hub",
    "push_report",
]
