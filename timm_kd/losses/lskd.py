"""KD with logit standardization (Sun, Zhu, Ren, Bai, Chen; "Logit Standardization in Knowledge
Distillation", CVPR 2024, arXiv 2403.01427; authors' code: github sunshangquan/logit-standardization-KD).

Hinton KD on z-scored logits (``standardize.py``), with the paper's settings::

    loss = 0.1 * CE(z_s, y) + 9 * tau^2 * KL(softmax(Z(z_t) / tau) || softmax(Z(z_s) / tau)),  tau = 2

The math is ``kd.py``'s (``KDLoss(logit_standardize=True)``); this file only holds the defaults of
the authors' "KD + Ours" runs (``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``, with
mdistiller's KD ``CE_WEIGHT = 0.1`` left unchanged), used for both their CIFAR-100 and ImageNet
results. Cross-entropy sees the raw student logits, as in the authors' code.
"""
from __future__ import annotations

from ._registry import register_loss
from .kd import KDLoss

__all__ = ["LSKDLoss"]


@register_loss("lskd")
class LSKDLoss(KDLoss):
    """KD with logit standardization: ``KDLoss(logit_standardize=True)`` with the paper's defaults.

    Args:
        tau: base temperature applied to the standardized logits (2.0).
        ce_weight: weight of cross-entropy with the labels (0.1).
        kd_weight: weight of the KD term (9.0).
        check_inputs: validate labels and finiteness on every call (one host sync).
    """

    name = "lskd"

    def __init__(
        self,
        tau: float = 2.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        check_inputs: bool = True,
    ):
        super().__init__(
            tau=tau,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            logit_standardize=True,
            check_inputs=check_inputs,
        )
