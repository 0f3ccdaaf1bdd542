"""Independent references for the loss tests, written from the authors' published formulas.

Each function re-derives one method the way the authors' code computes it (probabilities, then
``p * (log p - log q)`` sums, batch means), in plain tensor ops and in whatever dtype it is given
(tests call them in float64). They share nothing with ``timm_kd.losses``, so a test comparing the
two compares two independent implementations.
"""
from __future__ import annotations

import torch

# A fixed small batch for golden values: 3 samples, 5 classes. Sample 0 is confident and right,
# sample 1 is unsure, sample 2's student and teacher disagree on the top class.
STUDENT = [
    [2.0, -1.0, 0.5, 0.1, -0.3],
    [0.3, 0.2, 0.1, -0.4, 0.9],
    [-0.5, 1.5, 0.2, 2.2, -1.0],
]
TEACHER = [
    [5.0, 1.0, -2.0, 0.5, 0.0],
    [1.0, 2.5, -0.5, 0.0, 1.5],
    [0.0, 4.0, 1.0, 3.0, -2.0],
]
LABELS = [0, 1, 3]


def fixed_batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.tensor(STUDENT, dtype=dtype),
        torch.tensor(TEACHER, dtype=dtype),
        torch.tensor(LABELS, dtype=torch.long),
    )


def random_batch(
    batch: int = 8, classes: int = 10, scale: float = 3.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    t = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    return s, t, y


def positive_max_batch(
    batch: int = 8, classes: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits whose per-sample maxima are positive and within a factor 2 of each other."""
    s, t, y = random_batch(batch, classes, 2.0, seed, dtype)
    return s + 3.0, t + 3.0, y


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k (log p_k - log q_k)`` per row, 0 where ``p_k == 0``."""
    keep = p > 0  # the excluded entries must not reach log() either, or their gradient is NaN
    safe_p = torch.where(keep, p, torch.ones_like(p))
    safe_q = torch.where(keep, q, torch.ones_like(q))
    return torch.where(keep, p * (safe_p.log() - safe_q.log()), torch.zeros_like(p)).sum(-1)


def ref_cross_entropy(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    prob = torch.softmax(s, -1)
    return -prob.gather(1, y[:, None]).log().mean()


def ref_kd(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD term as mdistiller's ``kd_loss``: ``tau^2 * mean_b KL(p_t || p_s)``."""
    return _kl_rows(torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)).mean() * tau * tau


def ref_dtkd_terms(
    s: torch.Tensor, t: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DTKD authors' dynamic-temperature term, no guard: returns (L_DTKD, T_t [B], T_s [B])."""
    xs = s.max(1).values
    xt = t.max(1).values
    temp_s = 2 * xs / (xt + xs) * tau
    temp_t = 2 * xt / (xt + xs) * tau
    p = torch.softmax(t / temp_t[:, None], -1)
    q = torch.softmax(s / temp_s[:, None], -1)
    return (_kl_rows(p, q) * temp_t * temp_s).mean(), temp_t, temp_s


def ref_dtkd(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    epoch: float,
    tau: float = 4.0,
    alpha: float = 3.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    warmup: float = 20,
) -> torch.Tensor:
    """The DTKD authors' objective: ``min(epoch/warmup, 1) (alpha L_DTKD + beta KD) + gamma CE``."""
    dtkd = ref_dtkd_terms(s, t, tau)[0]
    kd_part = alpha * dtkd + beta * ref_kd(s, t, tau)
    return min(epoch / warmup, 1.0) * kd_part + gamma * ref_cross_entropy(s, y)


def ref_dkd_terms(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """mdistiller's ``dkd_loss`` terms (TCKD, NCKD), each times tau^2, batch mean; probabilities first."""
    is_gt = torch.nn.functional.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
    bs = torch.stack([(ps * is_gt).sum(1), (ps * (1 - is_gt)).sum(1)], 1)
    bt = torch.stack([(pt * is_gt).sum(1), (pt * (1 - is_gt)).sum(1)], 1)
    tckd = _kl_rows(bt, bs).mean() * tau**2
    ns = torch.softmax(s / tau - 1000.0 * is_gt, -1)
    nt = torch.softmax(t / tau - 1000.0 * is_gt, -1)
    nckd = _kl_rows(nt, ns).mean() * tau**2
    return tckd, nckd


def ref_dkd(
    s: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    epoch: float,
    alpha: float = 1.0,
    beta: float = 8.0,
    tau: float = 4.0,
    ce_weight: float = 1.0,
    warmup: float = 20,
) -> torch.Tensor:
    tckd, nckd = ref_dkd_terms(s, t, y, tau)
    return ce_weight * ref_cross_entropy(s, y) + min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


def _ref_pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The DIST authors' ``pearson_correlation``: cosine similarity of the row-centred vectors with
    ``a.norm(dim=1)`` (whose gradient at a zero vector is 0) and eps 1e-8."""
    ac = a - a.mean(1).unsqueeze(1)
    bc = b - b.mean(1).unsqueeze(1)
    return (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1) + 1e-8)


def ref_dist_terms(s: torch.Tensor, t: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DIST authors' (inter, intra) relation losses with the tau^2 factors."""
    ys, yt = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    inter = 1 - _ref_pearson_rows(ys, yt).mean()
    intra = 1 - _ref_pearson_rows(ys.T, yt.T).mean()
    return tau**2 * inter, tau**2 * intra


def ref_standardize(z: torch.Tensor) -> torch.Tensor:
    """The logit-standardization authors' ``normalize``: z-score with the unbiased std, eps 1e-7."""
    n = z.shape[-1]
    mean = z.sum(-1, keepdim=True) / n
    std = ((z - mean).pow(2).sum(-1, keepdim=True) / (n - 1)).sqrt()
    return (z - mean) / (std + 1e-7)


def student_grad(fn, s: torch.Tensor) -> torch.Tensor:
    """Gradient of ``fn(s)`` (a scalar) with respect to a fresh leaf copy of ``s``."""
    s = s.detach().clone().requires_grad_(True)
    fn(s).backward()
    return s.grad
