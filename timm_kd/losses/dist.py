"""DIST: knowledge distillation from a stronger teacher (Huang, You, Wang, Qian, Xu; "Knowledge
Distillation from A Stronger Teacher", NeurIPS 2022, arXiv 2205.10536; authors' code:
github hunto/DIST_KD, loss in github hunto/image_classification_sota ``lib/models/losses/dist_kd.py``).

Instead of matching probabilities exactly (KL), DIST matches their *relations* with Pearson
correlation, which ignores shift and scale of the predictions. With ``Y_s = softmax(Z_s / tau)``
and ``Y_t = softmax(Z_t / tau)``, both ``[B, C]``::

    rho(a, b) = <a - mean(a), b - mean(b)> / (||a - mean(a)|| * ||b - mean(b)|| + 1e-8)
    L_inter = tau^2 * (1 - mean_b rho(Y_s[b, :], Y_t[b, :]))     (each sample's class ranking)
    L_intra = tau^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))     (each class over the batch)
    loss = ce_weight * CE(z_s, y) + kd_weight * (beta * L_inter + gamma * L_intra)

``eps = 1e-8`` and the ``tau^2`` factors are the authors'. The intra-class term correlates columns
*over the batch*, so its value depends on the batch (with a batch of 1 the columns have no spread,
``rho = 0`` and ``L_intra = tau^2``, with zero gradient). Under data parallelism it is computed on
each rank's local batch, as in the authors' code.

Everything is plain autograd through the authors' formula, so the gradient is theirs also where a
row or column has no spread: ``a.norm()``'s gradient is 0 at a zero vector, and a term without
spread contributes exactly 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy
from ._registry import LossCard, register_loss

__all__ = ["DISTLoss", "dist_terms", "pearson_correlation"]

#: the authors' epsilon in the Pearson-correlation denominator
_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = _EPS) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: cosine similarity of the centred vectors,
    ``<a', b'> / (|a'| |b'| + eps)`` as in the authors' code."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_inter, L_intra)``, each including the ``tau^2`` factor."""
    y_s = F.softmax(student_logits / tau, dim=1)
    y_t = F.softmax(teacher_logits.detach() / tau, dim=1)
    inter = 1.0 - pearson_correlation(y_s, y_t, dim=1).mean()
    intra = 1.0 - pearson_correlation(y_s, y_t, dim=0).mean()
    return inter * tau**2, intra * tau**2


@register_loss(
    "dist",
    card=LossCard(
        title="DIST: distillation from a stronger teacher", paper="Huang et al., NeurIPS 2022",
        arxiv="2205.10536", cites=("huang2022dist",),
        summary="The student matched the teacher through Pearson correlations of their predictions: "
        "across classes for each image (inter-class) and across images for each class (intra-class).",
    ),
)
class DISTLoss(DistillLoss):
    """DIST: ``ce_weight * CE + kd_weight * (beta * L_inter + gamma * L_intra)``.

    Defaults are the authors' ImageNet baseline (ResNet34 -> ResNet18, 72.07 %): ``DIST(beta=1,
    gamma=1, tau=1)`` with ``ori_loss_weight=1`` and ``kd_loss_weight=2`` in their configs
    (``configs/strategies/distill/resnet_dist.yaml``). For CIFAR-100 they use ``tau=4`` with the
    same weights (``dist_cifar.yaml``).

    Args:
        beta: weight of the inter-class relation term (1.0).
        gamma: weight of the intra-class relation term (1.0).
        tau: softmax temperature (1.0 on ImageNet, 4.0 on CIFAR-100 in the authors' configs).
        ce_weight: weight of cross-entropy with the labels (1.0).
        kd_weight: weight of the whole DIST term (2.0, the authors' ``kd_loss_weight``).
    """

    name = "dist"

    def __init__(
        self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, ce_weight: float = 1.0,
        kd_weight: float = 2.0, check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.beta = check_non_negative("beta", beta, self.name)
        self.gamma = check_non_negative("gamma", gamma, self.name)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.kd_weight = check_non_negative("kd_weight", kd_weight, self.name)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, epoch: float | None = None
    ) -> dict[str, Tensor]:
        x = self.prepare(student_logits, teacher_logits, target)
        with self.float32(x.student):
            ce = cross_entropy(x.student, x.target)
            inter, intra = dist_terms(x.student, x.teacher, self.tau)
            loss = self.ce_weight * ce + self.kd_weight * (self.beta * inter + self.gamma * intra)
        return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
