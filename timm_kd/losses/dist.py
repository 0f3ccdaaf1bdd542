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
from ._fused import ce_target_grad_, is_compiling, row_dot, row_dots
from ._registry import register_loss

__all__ = ["DISTLoss", "dist_terms", "pearson_correlation"]

#: the authors' epsilon in the Pearson-correlation denominator
_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: cosine similarity of the centred vectors."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def _pearson_parts(aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From the dot products of centred ``a``, ``b`` (``<a, a>``, ``<b, b>``, ``<a, b>``): the Pearson
    correlation ``rho`` and the coefficients of its gradient, ``d rho / d a = c_b * b - c_a * a``, with
    ``c_a = 0`` where ``a`` has no spread."""
    na, nb = aa.sqrt(), bb.sqrt()
    den = na * nb + _EPS
    rho = ab / den
    c_a = torch.where(na > 0, rho * nb / (na.clamp_min(1e-30) * den), torch.zeros_like(na))
    return rho, 1.0 / den, c_a


class _DISTRelations(torch.autograd.Function):
    """``(1 - mean_b rho_rows, 1 - mean_c rho_cols)`` of ``softmax(u)``, ``softmax(v)``, closed-form backward.

    The row dot products of the row-centred ``Y_s``, ``Y_t`` come from one batched matmul of the two
    stacked; the column ones from column sums. With ``m`` the row means (``1 / C``: the rows of a
    softmax sum to 1), ``mu`` the column means and
    ``w_r = -g_inter / B``, ``w_c = -g_intra / C``, the gradient with respect to ``Y_s`` is::

        G = (Y_t - m_t) cb_r w_r - (Y_s - m_s) ca_r w_r + (Y_t - mu_t) cb_c w_c - (Y_s - mu_s) ca_c w_c
          = Y_s (-ca_r w_r - ca_c w_c) + Y_t (cb_r w_r + cb_c w_c) + (per-row) + (per-column constants)

    (``cb``, ``ca`` from ``_pearson_parts``); the per-row constants drop out of the softmax backward
    ``y * (G - <G, y>)``, so ``G`` takes four passes over ``[B, C]`` and no centred copies are kept;
    with cross-entropy (``tau = 1``) its ``sigma y`` term is folded into the per-row shift.
    Autograd would otherwise run about 30 ``[B, C]`` kernels; tests gradcheck it.
    """

    @staticmethod
    def forward(ctx, u, v, idx=None, soft=None):
        ce = sigma_t = None
        if idx is None:
            y_s = torch.softmax(u, dim=-1)
        else:  # tau = 1: cross-entropy from the same softmax (see ``dist_terms``)
            log_y = torch.log_softmax(u, dim=-1)
            if soft is None:
                ce = -log_y.gather(1, idx).mean()
            else:
                sigma_t = soft.sum(dim=1, keepdim=True)
                ce = -row_dot(soft, log_y).mean()
            y_s = log_y.exp_()
        y_t = torch.softmax(v, dim=-1)
        n, c = y_s.shape
        # eager: two contiguous halves of one buffer (elementwise writes stay fast, one matmul reads
        # both); compiled: fresh tensors (writes into slices of a buffer become whole-buffer copies)
        # the rows of a softmax sum to 1: their mean is 1 / C, no reduction needed
        buf = None if is_compiling() else y_s.new_empty(2, n, c)
        if buf is None:
            rows = (y_s - 1.0 / c, y_t - 1.0 / c)
        else:
            rows = buf
            torch.sub(y_s, 1.0 / c, out=buf[0])
            torch.sub(y_t, 1.0 / c, out=buf[1])
        m = row_dots(rows, rows)  # [B, 2, 2]: the row dot products
        rho_r, cb_r, ca_r = _pearson_parts(m[:, 0, 0:1], m[:, 1, 1:2], m[:, 0, 1:2])
        mu_s, mu_t = y_s.mean(0, keepdim=True), y_t.mean(0, keepdim=True)
        if buf is None:
            a_c, b_c = y_s - mu_s, y_t - mu_t
        else:
            a_c, b_c = torch.sub(y_s, mu_s, out=buf[0]), torch.sub(y_t, mu_t, out=buf[1])
        # column dot products as a product and a column sum each (``vecdot(dim=0)`` takes 3x as long);
        # the squares in place: the centred copies are not needed afterwards
        ab = torch.mul(a_c, b_c).sum(0, keepdim=True)
        aa, bb = a_c.square_().sum(0, keepdim=True), b_c.square_().sum(0, keepdim=True)
        rho_c, cb_c, ca_c = _pearson_parts(aa, bb, ab)
        ctx.save_for_backward(y_s, y_t, mu_s, mu_t, cb_r, ca_r, cb_c, ca_c, idx, soft, sigma_t)
        if ce is None:
            return 1.0 - rho_r.mean(), 1.0 - rho_c.mean()
        return 1.0 - rho_r.mean(), 1.0 - rho_c.mean(), ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_inter, grad_intra, grad_ce=None):
        y_s, y_t, mu_s, mu_t, cb_r, ca_r, cb_c, ca_c, idx, soft, sigma_t = ctx.saved_tensors
        w_r = -grad_inter / y_s.shape[0]  # d(1 - mean rho)/d rho, per row
        w_c = -grad_intra / y_s.shape[1]  # per column
        alpha_c, beta_c = ca_c * -w_c, cb_c * w_c
        g = torch.addcmul(-(alpha_c * mu_s + beta_c * mu_t), y_s, ca_r * -w_r)  # + the column constants
        g.addcmul_(y_s, alpha_c).addcmul_(y_t, cb_r * w_r).addcmul_(y_t, beta_c)
        # softmax backward y * (G - <G, y>), with dCE/du = sigma y - target folded in as + sigma y
        shift = row_dot(g, y_s)
        if idx is not None:
            c_ce = grad_ce / y_s.shape[0]
            shift = shift - (c_ce if sigma_t is None else c_ce * sigma_t)
        g = g.sub_(shift).mul_(y_s)
        if idx is not None:
            g = ce_target_grad_(g, idx, soft, c_ce)
        return g, None, None, None


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_inter, L_intra)``, each including the ``tau^2`` factor."""
    if tau != 1.0:
        student_logits, teacher_logits = student_logits / tau, teacher_logits / tau
    inter, intra = _DISTRelations.apply(student_logits, teacher_logits.detach())
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
            if self.tau == 1.0:  # the authors' ImageNet setting: CE shares the student softmax
                soft = x.target if x.soft else None
                inter, intra, ce = _DISTRelations.apply(x.student, x.teacher, x.labels.unsqueeze(1), soft)
            else:
                ce = cross_entropy(x.student, x.target)
                inter, intra = dist_terms(x.student, x.teacher, self.tau)
            loss = self.ce_weight * ce + self.kd_weight * (self.beta * inter + self.gamma * intra)
        return {"loss": loss, "ce": ce.detach(), "inter": inter.detach(), "intra": intra.detach()}
