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
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._base import DistillLoss, check_non_negative, check_positive, cross_entropy
from ._registry import register_loss

__all__ = ["DISTLoss", "dist_terms", "pearson_correlation"]

#: the authors' epsilon in the Pearson-correlation denominator
_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: cosine similarity of the centred vectors."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def _pearson_parts(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """Pearson correlations ``rho`` of centred ``a``, ``b`` along ``dim`` and the coefficients of its
    gradient, ``d rho / d a = c_b * b - c_a * a``, with ``c_a = 0`` where ``a`` has no spread."""
    # vecdot, not norm(dim=0): the column norm is ~5x slower on CPU than a column dot product
    na = torch.linalg.vecdot(a, a, dim=dim).sqrt_().unsqueeze(dim)
    nb = torch.linalg.vecdot(b, b, dim=dim).sqrt_().unsqueeze(dim)
    num = torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)
    den = na * nb + _EPS
    rho = num / den
    c_a = torch.where(na > 0, rho * nb / (na.clamp_min(1e-30) * den), torch.zeros_like(na))
    return rho, 1.0 / den, c_a


class _DISTRelations(torch.autograd.Function):
    """``(1 - mean_b rho_rows, 1 - mean_c rho_cols)`` of ``softmax(u)``, ``softmax(v)``, closed-form backward.

    The correlation is taken between centred vectors, so its gradient is already centred along the
    same dimension; the softmax backward is ``y * (g - sum(g * y))``. Autograd would otherwise run
    about 30 ``[B, C]`` kernels (benchmarks/losses.py); tests check the gradient with gradcheck.
    """

    @staticmethod
    def forward(ctx, u, v):
        y_s, y_t = torch.softmax(u, dim=-1), torch.softmax(v, dim=-1)
        a_r, b_r = y_s - y_s.mean(1, keepdim=True), y_t - y_t.mean(1, keepdim=True)
        a_c, b_c = y_s - y_s.mean(0, keepdim=True), y_t - y_t.mean(0, keepdim=True)
        rho_r, cb_r, ca_r = _pearson_parts(a_r, b_r, dim=1)
        rho_c, cb_c, ca_c = _pearson_parts(a_c, b_c, dim=0)
        ctx.save_for_backward(y_s, a_r, b_r, cb_r, ca_r, a_c, b_c, cb_c, ca_c)
        return 1.0 - rho_r.mean(), 1.0 - rho_c.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_inter, grad_intra):
        y_s, a_r, b_r, cb_r, ca_r, a_c, b_c, cb_c, ca_c = ctx.saved_tensors
        w_r = -grad_inter / a_r.shape[0]  # d(1 - mean rho)/d rho, per row
        w_c = -grad_intra / a_c.shape[1]  # per column
        g = b_r * (cb_r * w_r)
        g.addcmul_(a_r, ca_r * -w_r).addcmul_(b_c, cb_c * w_c).addcmul_(a_c, ca_c * -w_c)
        return g.sub_(torch.linalg.vecdot(g, y_s).unsqueeze(1)).mul_(y_s), None  # softmax backward


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_inter, L_intra)``, each including the ``tau^2`` factor."""
    inter, intra = _DISTRelations.apply(student_logits / tau, teacher_logits.detach() / tau)
    return inter * tau**2, intra * tau**2


@register_loss("dist")
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
        check_inputs: validate labels and finiteness on every call (one host sync).
    """

    name = "dist"

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 2.0,
        check_inputs: bool = True,
    ):
        super().__init__(check_inputs=check_inputs)
        self.beta = check_non_negative("beta", beta, self.name)
        self.gamma = check_non_negative("gamma", gamma, self.name)
        self.tau = check_positive("tau", tau, self.name)
        self.ce_weight = check_non_negative("ce_weight", ce_weight, self.name)
        self.kd_weight = check_non_negative("kd_weight", kd_weight, self.name)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        *,
        epoch: float | None = None,
    ) -> dict[str, torch.Tensor]:
        x = self.prepare(student_logits, teacher_logits, target)
        with self.float32(x.student):
            ce = cross_entropy(x.student, x.target)
            inter, intra = dist_terms(x.student, x.teacher, self.tau)
            loss = self.ce_weight * ce + self.kd_weight * (self.beta * inter + self.gamma * intra)
        return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
