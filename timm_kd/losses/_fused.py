"""Tempered soft-target terms against the student logits, with closed-form backwards: the one place
where timm-kd computes a tempered KL divergence (``kd``, ``lskd``, ``ats``, ``isats``, ``dtkd``).

Why: on CPU, one elementwise pass over a ``[256, 1000]`` float32 tensor (an ``exp``, a product, a
row sum, each with a fresh output) costs a sizeable fraction of ``F.cross_entropy``'s whole
forward+backward. A loss's time is therefore the number of passes it makes over ``[B, C]`` tensors
(docs/losses.md has the measurements), and the math below is arranged to make few.

With a row's logits shifted by their maximum, ``d = z - max_k z_k`` (``d <= 0``: no overflow), a
temperature ``T`` (a number, or one per sample) and ``S = sum_k exp(d_k / T)``::

    log softmax(z / T)_k = d_k / T - log S                                  (_tempered_exp)

so a soft target ``p`` (rows summing to 1) needs no ``[B, C]`` log-probabilities, only the row dot
product ``<p, d>``::

    -sum_k p_k log q_k  = log S - <p, d> / T                                (soft cross-entropy)
    KL(p || q)          = <p, log p> - <p, d> / T + log S                   (h = <p, log p>, per row)
    d/dz  (either)      = (q - p) / T,      q = exp(d / T) / S
    d/dT  (either)      = -<q - p, d> / T^2                                 (student temperature)

and for a teacher target ``p = softmax(u / T_t)`` (``du = u - max u``), as ``dtkd`` needs::

    <p, log p>          = <p, du> / T_t - log S_t                           (tempered_target)
    dKL/dT_t            = -Cov_p(du, log p - log q) / T_t^2
                        = -(Var_p(du) / T_t - Cov_p(du, d) / T) / T_t^2

Cross-entropy per sample, against a label ``y`` or a soft target ``t`` with row sum
``sigma = sum_k t_k`` (1 for Mixup/CutMix targets), from the same ``d`` at ``T = 1``::

    CE = log S_1 - d_y              dCE/dz = softmax(z) - onehot(y)
    CE = sigma log S_1 - <t, d>     dCE/dz = sigma softmax(z) - t

Tests gradcheck both Functions in float64 and compare values with log-softmax references.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "add_at_", "dtkd_objective", "first_argmax", "first_max_index_", "is_compiling", "row_combine",
    "row_dot", "row_dots", "soft_target_objective", "tempered_kl", "tempered_target",
]


def _shift(z: torch.Tensor) -> torch.Tensor:
    """``z - max_k z_k`` per row (a new tensor)."""
    return z - z.amax(dim=1, keepdim=True)


def _tempered_exp(d: torch.Tensor, temp: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(d / T), S)`` with ``S`` the row sums ``[B, 1]``; ``log softmax(z / T) = d / T - log S``.

    A number ``T`` multiplies by ``1 / T`` (a vector multiply is several times cheaper than a
    divide on CPU); per-sample ``T`` divide, which keeps ``dtkd``'s value within float32 rounding
    of the reference when ``T_t T_s`` scales the KL up. Compiled, ``compiled_exp``."""
    if is_compiling():
        e = compiled_exp(d, 1.0 / temp)
    elif torch.is_tensor(temp):
        e = torch.div(d, temp).exp_()
    elif temp == 1.0:
        e = d.exp()
    else:
        e = torch.mul(d, 1.0 / temp).exp_()
    return e, e.sum(dim=1, keepdim=True)


#: whether the code runs inside ``torch.compile``'s trace (``torch.compiler.is_compiling`` from torch
#: 2.3; Dynamo's own before). Where a fused Function's best eager form (batched matmuls, writes into
#: slices of one buffer, in-place scatters) is slow or copies whole tensors in a compiled graph, it
#: takes the plain form there: the same values, laid out for Inductor's loop over rows.
is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


#: ``log2(e)``: ``exp(x) = exp2(x * log2(e))``
_LOG2E = math.log2(math.e)
#: largest whole temperature for which ``unit_exp`` multiplies instead of taking another exp
_MAX_POWER = 8


def compiled_exp(d: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``exp(d * scale)`` for ``torch.compile`` (``scale`` a number or ``[B, 1]``, e.g. ``1 / T``).

    Computed as ``exp2(d * (scale * log2 e))``: ``log2 e`` folds into the scale the row loop multiplies
    by anyway, and Inductor's CPU ``exp2`` (Sleef) skips the ``exp``'s reduction by ``ln 2`` (the same
    folding as FlashAttention's softmax scale). Exps are most of a fused loss's compiled row loop (one
    costs about as much as 30 multiplies); this made compiled ``dtkd`` about 7% faster. The extra
    rounding of the scaled argument changes ``exp(x)`` by at most ``|x| * 2^-23`` relative, on tail
    entries whose weight in every row sum is small. Only compiled code calls it: eager ``exp`` is one
    vectorized ATen pass, about twice as fast as Inductor's."""
    return torch.exp2(d * (scale * _LOG2E))


def unit_exp(d: torch.Tensor, e_tau: torch.Tensor, tau: float) -> torch.Tensor:
    """``exp(d)`` under ``torch.compile``, given ``e_tau = exp(d / tau)`` for a number ``tau``.

    With a whole ``tau`` up to 8 (the default ``tau = 4`` of ``kd``, ``dtkd``), ``e_tau ** tau`` by
    repeated squaring, two multiplies at ``tau = 4`` instead of an exp: losses that need softmax at
    ``T = 1`` (cross-entropy) and at ``T = tau`` then take one exp fewer per element. The relative
    error grows to about ``tau`` ulp (a few 1e-7 at ``tau = 4``); ``d <= 0``, so nothing overflows.
    For any other ``tau``, ``compiled_exp(d)``. Only compiled code calls it: eagerly, exp is one
    vectorized pass and each multiply another pass."""
    n = int(tau)
    if not (n == tau and 1 <= n <= _MAX_POWER):
        return compiled_exp(d)
    out, base = None, e_tau
    while True:
        if n & 1:
            out = base if out is None else out * base
        n >>= 1
        if not n:
            return out
        base = base * base


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row dot products ``[B, 1]``, as a batched ``[1, C] x [C, 1]`` matmul that reads both once and
    writes no ``[B, C]`` product (about half of ``torch.linalg.vecdot``'s time on ``[256, 1000]``
    float32; the right operand is passed as a transposed row, which takes BLAS's fast path: as a
    ``[B, C, 1]`` column the same product takes ten times as long). Under ``torch.compile``, a
    product and a row sum (see ``row_dots``)."""
    if is_compiling():
        return (a * b).sum(dim=1, keepdim=True)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(1).transpose(1, 2)).view(a.shape[0], 1)


def row_dots(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``[B, k, j]``: every row dot product ``<lhs[i, b], rhs[l, b]>`` of stacked ``[k, B, C]`` and
    ``[j, B, C]`` tensors. Eager: one batched matmul that reads each operand once. Under
    ``torch.compile``: products and row sums, which Inductor fuses into one loop per row (it keeps a
    matmul as a library call, and the per-row loop is what compiling is for)."""
    if is_compiling():  # lhs, rhs may also be sequences of [B, C] tensors there
        rows = [torch.stack([(a * b).sum(dim=-1) for b in rhs], dim=-1) for a in lhs]
        return torch.stack(rows, dim=1)
    return torch.bmm(lhs.transpose(0, 1), rhs.permute(1, 2, 0))


def row_combine(coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, C]``: ``sum_i coef[b, i] * rows[i, b]`` for ``coef [B, k]`` and stacked ``rows [k, B, C]``.
    Eager: one batched ``[1, k] x [k, C]`` matmul per row (one read of each row instead of k
    multiply-adds); under ``torch.compile``, the multiply-adds, fused."""
    if is_compiling():
        out = coef[:, 0:1] * rows[0]
        for i in range(1, len(rows)):
            out = out + coef[:, i : i + 1] * rows[i]
        return out
    return torch.bmm(coef.unsqueeze(1), rows.transpose(0, 1)).view(coef.shape[0], -1)


def _column_numbers(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1, ..., C - 1]`` for the columns of ``x``, to compare with per-row column indices in a
    compiled row loop: float32 where exact (``C <= 2^24``), so each comparison is one vector of 16
    lanes (int64 takes two, plus conversions); int64 beyond."""
    dtype = torch.float32 if x.shape[1] <= 2**24 else torch.int64
    return torch.arange(x.shape[1], device=x.device, dtype=dtype)


def first_max_index_(d: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` int64: each row's first maximum (the index ``torch.max(dim)`` returns), from the
    shifted logits ``d = z - max z`` (exactly 0 at the maxima), with ``buf`` (``[B, C]``) as scratch.

    ``floor(d)`` is 0 at a maximum and ``<= -1`` elsewhere, so ``k - C floor(d_k)`` is the column
    number ``k`` at a maximum and ``>= C`` elsewhere, and its row minimum is the first maximum: three
    vectorized passes and a row ``min`` (0.26-0.28 ms on ``[256, 1000]``, one core), where
    ``max(dim)`` tracks the index element by element (0.56-0.64 ms there, docs/losses.md). Exact up to
    2^24 columns (float32 column numbers); a NaN row gives 0."""
    n = d.shape[1]
    if n > 2**24:
        return d.argmax(dim=1, keepdim=True)
    keys = torch.floor(d, out=buf).mul_(-float(n)).add_(_column_numbers(d))
    return keys.amin(dim=1, keepdim=True).long().clamp_(0, n - 1)


def first_argmax(z: torch.Tensor) -> torch.Tensor:
    """``z.argmax(dim=1)`` (``[B]``, the first maximum of each row), eagerly through
    ``first_max_index_`` in one scratch buffer (0.33-0.44 ms against 0.66-0.81 ms for ``argmax`` on
    ``[256, 1000]``, one core); under ``torch.compile``, ``argmax`` (Inductor's own loop)."""
    if is_compiling():
        return z.argmax(dim=1)
    buf = z - z.amax(dim=1, keepdim=True)
    return first_max_index_(buf, buf).squeeze(1)


def add_at_(out: torch.Tensor, idx: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``out[b, idx[b]] += value[b]`` for ``idx``, ``value`` of shape ``[B, 1]``: in place eager; under
    ``torch.compile`` a comparison with the column index, which fuses into the loop that writes ``out``
    (a scatter there copies the whole tensor)."""
    if is_compiling():
        cols = _column_numbers(out)
        return out + torch.where(cols == idx.to(cols.dtype), value, 0.0)
    return out.scatter_add_(1, idx, value)


def ce_target_grad_(grad: torch.Tensor, idx: torch.Tensor, soft: torch.Tensor | None, coef: torch.Tensor):
    """``grad - coef * target`` (``onehot(y)`` or the soft target), in place eager (use the returned
    tensor: compiled, it is a new one); ``coef`` is a scalar tensor."""
    if soft is None:
        return add_at_(grad, idx, (-coef).expand(grad.shape[0], 1))
    return grad.addcmul_(soft, -coef)


def _row_std(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(std, mean)``, ``[B, 1]`` each (ddof = 1), of shifted logits ``d = z - max z``.

    The variance comes from two row sums, ``(sum d^2 - (sum d)^2 / n) / (n - 1)``: two reading
    passes and no centred copy. ``d`` lies within the row's range below 0, so both sums are of the
    size of the spread (not of the squared mean, which raw logits could make large) and their
    difference keeps float32 precision."""
    n = d.shape[1]
    s = d.sum(dim=1, keepdim=True)
    var = (row_dot(d, d) - s * s / n).clamp_min_(0.0) / (n - 1)
    return var.sqrt_(), s / n


@torch.no_grad()
def tempered_target(
    logits: torch.Tensor, tau: float | torch.Tensor, standardize_eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, h)``: ``p = softmax(u / tau)`` ``[B, C]`` and ``h = <p, log p>`` ``[B]`` (minus the entropy).

    ``u`` is ``logits``, or with ``standardize_eps`` their z-scores ``(u - mean) / (std + eps)``
    (``standardize.py``), computed as a per-row temperature ``tau (std + eps)``.
    """
    if standardize_eps is None and not torch.is_tensor(tau):  # (u - max u) / tau in one pass
        u_max = logits.amax(dim=1, keepdim=True)
        return _target(torch.add(u_max * (-1.0 / tau), logits, alpha=1.0 / tau), 1.0)
    du = _shift(logits)
    temp = tau if standardize_eps is None else (_row_std(du)[0] + standardize_eps) * tau
    return _target(du, temp)


def _target(du: torch.Tensor, temp: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tempered_target`` from shifted logits ``du``, which it overwrites."""
    if torch.is_tensor(temp):
        u = du.div_(temp)
    else:
        u = du if temp == 1.0 else du.mul_(1.0 / temp)
    p = compiled_exp(u) if is_compiling() else u.exp()
    s = p.sum(dim=1, keepdim=True)
    p.mul_(1.0 / s)
    return p, (u.mul_(p).sum(dim=1) - s.log().squeeze(1))  # <p, u> - log S, in u's buffer


class _SoftTargetObjective(torch.autograd.Function):
    """``w_ce * mean_b CE_b + w_kd * T^2 * mean_b D_b``, with a closed-form backward.

    ``D`` is the soft cross-entropy of ``p`` and ``q = softmax(z / T)`` (ATS), or ``KL(p || q)`` when
    ``h = <p, log p>`` is given (KD). ``z`` is the student logits ``x``, or with ``standardize``
    their z-scores ``Z(x) = (x - mu) / (sigma + eps)``: the same as ``x`` at the per-row temperature
    ``T (sigma + eps)``, whose dependence on ``x`` (``dsigma/dx = c / ((n - 1) sigma)``,
    ``c = x - mu``) adds, with ``g = w_kd T^2 / B``::

        dL/dx += -g <q - p, d> / (T^2 (sigma + eps)^2) * T * c / ((n - 1) sigma)      (0 where sigma = 0)

    Passes over ``[B, C]`` are what costs on CPU, and writing another buffer costs about three
    in-place passes (docs/losses.md, "Speed"): the student's tempered ``exp`` overwrites the shifted
    logits when they are not needed afterwards (the saved tensors stay intact: a retained graph can
    run its backward twice).
    """

    @staticmethod
    def forward(ctx, x, idx, soft, p, h, tau, w_ce, w_kd, eps):
        d = _shift(x)
        if soft is None:
            sigma_t = None
            ce = -d.gather(1, idx)
        else:
            sigma_t = soft.sum(dim=1, keepdim=True)
            ce = -row_dot(soft, d)
        if is_compiling():  # the tempered exp first, exp(d) from it (unit_exp)
            e = compiled_exp(d, 1.0 / tau) if eps is None and tau != 1.0 else None
            e1 = compiled_exp(d) if e is None else unit_exp(d, e, tau)
        else:
            e, e1 = None, d.exp()
        s1 = e1.sum(dim=1, keepdim=True)
        log_s1 = s1.log()
        ce = ce + (log_s1 if sigma_t is None else sigma_t * log_s1)
        sigma = mean = qp_d = None
        if eps is not None:  # per-row temperature T (sigma + eps); d is kept for the backward
            sigma, mean = _row_std(d)
            temp = (sigma + eps) * tau
            e, s = _tempered_exp(d, temp)
            p_d = row_dot(p, d)
            qp_d = row_dot(e, d) / s - p_d  # <q - p, d> for the gradient through sigma (= <q - p, c>)
        elif tau == 1.0:
            temp, e, s = tau, e1, s1
            p_d = d.mul_(p).sum(dim=1, keepdim=True)  # d is free: in place
        else:
            temp = tau
            p_d = row_dot(p, d)
            if e is None:
                e = d.mul_(1.0 / tau).exp_()  # d is free: in place
            s = e.sum(dim=1, keepdim=True)
        dist = (log_s1 if e is e1 else s.log()) - p_d / temp
        if h is not None:
            dist = dist + h.unsqueeze(1)
        ce, kd = ce.mean(), dist.mean() * tau**2
        ctx.save_for_backward(
            e1, s1, e, s, p, idx, soft, sigma_t, qp_d, d if eps is not None else None, mean, sigma
        )
        ctx.consts = (tau, w_ce, w_kd, eps)
        ctx.mark_non_differentiable(ce, kd)
        return w_ce * ce + w_kd * kd, ce, kd

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_ce, _grad_kd):
        e1, s1, e, s, p, idx, soft, sigma_t, qp_d, d, mean, sigma = ctx.saved_tensors
        tau, w_ce, w_kd, eps = ctx.consts
        g = grad / e1.shape[0]
        c_ce = g * w_ce
        c_q1 = c_ce if sigma_t is None else c_ce * sigma_t
        temp = tau if eps is None else (sigma + eps) * tau
        c_kd = g * (w_kd * tau**2) / temp  # d(w_kd T^2 D)/dz = w_kd T^2 (q - p) / temp
        c_e1 = (c_q1 + c_kd) / s1 if e is e1 else c_q1 / s1
        if eps is None:
            out = e1 * c_e1
        else:  # the sigma term -coef * c = -coef * d + coef * mean(d): its constant goes in this pass
            n = d.shape[1]
            coef = torch.where(sigma > 0, c_kd * qp_d / (temp * (n - 1) * sigma.clamp_min(1e-30)), 0.0) * tau
            out = torch.addcmul(coef * mean, e1, c_e1)
            out.addcmul_(d, -coef)
        if e is not e1:
            out.addcmul_(e, c_kd / s)
        out.addcmul_(p, -c_kd)
        return ce_target_grad_(out, idx, soft, c_ce), None, None, None, None, None, None, None, None


def soft_target_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    soft_target: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    tau: float,
    ce_weight: float,
    kd_weight: float,
    teacher_neg_entropy: torch.Tensor | None = None,
    standardize_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)``: ``ce_weight * CE(x) + kd_weight * kd`` with ``kd = T^2 mean_b D``.

    ``D`` is the soft cross-entropy ``-sum p log q``, or ``KL(p || q)`` when ``teacher_neg_entropy``
    (``h = <p, log p>`` per row, ``[B]``, from ``tempered_target``) is given; ``q = softmax(z / T)``
    with ``z`` the student logits, or their z-scores (``standardize_logits``) when
    ``standardize_eps`` is given. ``labels`` are class indices ``[B]`` (used when ``soft_target``
    is None); ``teacher_probs`` ``[B, C]`` rows sum to 1 and get no gradient. ``ce`` and ``kd`` are
    detached batch means.
    """
    h = None if teacher_neg_entropy is None else teacher_neg_entropy.detach()
    return _SoftTargetObjective.apply(
        student_logits, labels.unsqueeze(1), soft_target, teacher_probs.detach(), h,
        float(tau), float(ce_weight), float(kd_weight), standardize_eps,
    )


class _TemperedKL(torch.autograd.Function):
    """Per-sample ``KL(softmax(t / T_t) || softmax(s / T_s))`` with gradients for ``s`` and for
    temperatures given as ``[B, 1]`` tensors (``dtkd``'s depend on the student); formulas in the
    module docstring."""

    @staticmethod
    def forward(ctx, s, t, temp_s, temp_t):
        ds, dt = _shift(s), _shift(t)
        eq, sq = _tempered_exp(ds, temp_s)
        p, sp = _tempered_exp(dt, temp_t)
        p.div_(sp)
        p_dt, p_ds = row_dot(p, dt), row_dot(p, ds)
        kl = p_dt / temp_t - sp.log() - p_ds / temp_s + sq.log()
        temp_t_grad = torch.is_tensor(temp_t) and temp_t.requires_grad
        ctx.temps = tuple(None if torch.is_tensor(v) else v for v in (temp_s, temp_t))  # the float ones
        ctx.save_for_backward(
            eq, sq, p, ds, dt if temp_t_grad else None, p_dt, p_ds,
            temp_s if torch.is_tensor(temp_s) else None, temp_t if torch.is_tensor(temp_t) else None,
        )
        return kl.squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        eq, sq, p, ds, dt, p_dt, p_ds, temp_s_saved, temp_t_saved = ctx.saved_tensors
        temp_s = temp_s_saved if temp_s_saved is not None else ctx.temps[0]
        temp_t = temp_t_saved if temp_t_saved is not None else ctx.temps[1]
        g = grad_kl.unsqueeze(1)
        grad_s = grad_temp_s = grad_temp_t = None
        if ctx.needs_input_grad[2]:
            grad_temp_s = -(row_dot(eq, ds) / sq - p_ds) * g / temp_s**2
        if ctx.needs_input_grad[3]:
            p_dt_vec = p * dt
            var = row_dot(p_dt_vec, dt) - p_dt * p_dt
            cov = row_dot(p_dt_vec, ds) - p_dt * p_ds
            grad_temp_t = -(var / temp_t - cov / temp_s) * g / temp_t**2
        if ctx.needs_input_grad[0]:
            c = g / temp_s
            grad_s = eq * (c / sq)
            grad_s.addcmul_(p, -c)
        return grad_s, None, grad_temp_s, grad_temp_t


def tempered_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temp_student: float | torch.Tensor,
    temp_teacher: float | torch.Tensor,
) -> torch.Tensor:
    """Per-sample ``KL(softmax(t / temp_teacher) || softmax(s / temp_student))``, ``[B]``.

    Temperatures are floats or ``[B, 1]`` tensors (which may require grad). No gradient flows
    into ``teacher_logits``.
    """
    return _TemperedKL.apply(student_logits, teacher_logits.detach(), temp_student, temp_teacher)


def _dtkd_rows(x, t, xs, t_max, tt, ts, tau):
    """``_DTKDObjective``'s rows as separate tensors, for ``torch.compile``: ``left`` = the five exps
    ``exp(d), exp(d/T), exp(d/T_s), exp(du/T), exp(du/T_t)`` and ``exp(du/T_t) du``, ``right`` =
    ``d, du, 1``. Eager code writes the same values into two stacked buffers; in a compiled graph,
    writes into slices of one buffer become whole-buffer copies, while fresh tensors fuse into
    Inductor's loop over rows. Four exps per element: ``exp(d)`` is ``unit_exp`` of ``exp(d/T)``
    at a whole ``T``."""
    d, du = x - xs, t - t_max
    e_k, f_d = compiled_exp(d, 1.0 / tau), compiled_exp(du, 1.0 / tt)
    left = (unit_exp(d, e_k, tau), e_k, compiled_exp(d, 1.0 / ts), compiled_exp(du, 1.0 / tau), f_d, f_d * du)
    return left, (d, du, torch.ones_like(d))


class _DTKDObjective(torch.autograd.Function):
    """DTKD's whole objective in one pass over the logits, with a closed-form backward.

    ``w_ce * mean_b CE_b + w_kd * T^2 * mean_b KL_T,b + w_dt * mean_b T_t T_s KL_D,b`` with
    ``KL_T = KL(softmax(t / T) || softmax(x / T))``, ``KL_D = KL(softmax(t / T_t) || softmax(x / T_s))``
    and ``(T_t, T_s)`` functions of the student maximum ``x_s = max_k x_k`` (``dtkd_temperatures``,
    which also gives their slope ``dT_s/dx_s = -dT_t/dx_s``: the not-detached temperatures send their
    gradient there). With ``L = T_t T_s KL_D`` and the module docstring's temperature derivatives::

        dL/dx   = T_t (q_D - p_D)                                       (temperatures held)
        dL/dT_s = T_t KL_D + T_t T_s dKL/dT_s,    dL/dT_t = T_s KL_D + T_t T_s dKL/dT_t
        dL/dx_s = (dL/dT_s - dL/dT_t) dT_s/dx_s                 (to the first argmax, as torch.max)

    One softmax pass per temperature and student/teacher side, shared shifted logits, and no
    ``[B, C]`` log-probabilities: eagerly, every row sum and dot product comes from one batched matmul,
    and the backward's five-term combination from one batched ``[1, 5] x [5, C]`` product per row
    (compiled, both are fused loops over rows: ``row_combine``, ``_dtkd_rows``). No nested autograd,
    so ``torch.compile`` traces it whole (``compile_loss``).

    Compiled, the forward also forms the gradient (for an upstream gradient of 1) and the backward
    only scales it: Inductor then puts the gradient's loop in the forward's kernel, after the row
    sums, and the backward is one multiply instead of a second graph that reads the logits again,
    finds the first argmax again and forms the four ``exp``s again (compiled
    DTKD took 0.905-0.924 of its previous time, docs/losses.md). Eagerly the exps are kept in their
    buffer for the backward, which only has to combine them.
    """

    @staticmethod
    def forward(ctx, x, t, idx, soft, tau, w_ce, w_kd, w_dt, xs, arg, tt, ts, slope, t_max):
        n, c = x.shape
        # rows of `right`: d = x - max x, du = t - max t, ones; rows of `left`: the five exps and
        # w = exp(du / T_t) * du. One batched matmul then gives every row sum and dot product.
        # [k, B, C] buffers: contiguous halves keep the elementwise writes fast (a strided
        # [B, k, C] slice takes about twice as long), the matmul reads them transposed
        compiling = is_compiling()
        if compiling:  # fresh tensors, see _dtkd_rows
            left, right = _dtkd_rows(x, t, xs, t_max, tt, ts, tau)
            d = right[0]
        else:
            right = x.new_empty(3, n, c)
            d, du = right[0], right[1]
            torch.sub(x, xs, out=d)
            torch.sub(t, t_max, out=du)
            right[2].fill_(1.0)
            left = x.new_empty(6, n, c)
            e1, e_k, e_d, f_k, f_d, w = left.unbind(0)
            if arg is None:  # the first argmax, in e1's rows before the exp
                arg = first_max_index_(d, e1)
            torch.exp(d, out=e1)
            torch.mul(d, 1.0 / tau, out=e_k).exp_()
            torch.div(d, ts, out=e_d).exp_()
            torch.mul(du, 1.0 / tau, out=f_k).exp_()
            torch.div(du, tt, out=f_d).exp_()
            torch.mul(f_d, du, out=w)
        # the twelve row sums and dot products read below, {(left row, right row): [B, 1]}: eagerly
        # from one batched matmul; compiled, each a product and a row sum (fused into one row loop)
        pairs = ((0, 2), (1, 2), (2, 2), (3, 2), (4, 2), (2, 0), (3, 0), (3, 1), (4, 0), (4, 1))
        pairs += ((5, 0), (5, 1))
        if compiling:
            m = {(i, j): (left[i] * right[j]).sum(dim=1, keepdim=True) for i, j in pairs}
        else:
            mm = row_dots(left, right)
            m = {(i, j): mm[:, i, j : j + 1] for i, j in pairs}
        s1, s_k, s_d, z_k, z_d = (m[i, 2] for i in range(5))
        if soft is None:
            sigma_t, ce = None, s1.log() - d.gather(1, idx)
        else:
            sigma_t = soft.sum(dim=1, keepdim=True)
            ce = sigma_t * s1.log() - row_dot(soft, d)
        pk_d, pk_du = m[3, 0] / z_k, m[3, 1] / z_k  # <p_K, d>, <p_K, du>
        pd_d, pd_du = m[4, 0] / z_d, m[4, 1] / z_d
        var = m[5, 1] / z_d - pd_du * pd_du  # Var_p(du), p = p_D
        cov = m[5, 0] / z_d - pd_du * pd_d  # Cov_p(du, d)
        q_d = m[2, 0] / s_d  # <q_D, d>
        kl_k = (pk_du - pk_d) / tau - z_k.log() + s_k.log()
        kl_d = pd_du / tt - z_d.log() - pd_d / ts + s_d.log()
        # dL/dx_s of L = T_t T_s KL_D through both temperatures: (dL/dT_s - dL/dT_t) dT_s/dx_s
        dl_ds = tt * kl_d - tt * (q_d - pd_d) / ts
        dl_dt = ts * kl_d - ts * (var / tt - cov / ts) / tt
        dl_dxs = (dl_ds - dl_dt) * slope
        ce, kd, dt = ce.mean(), kl_k.mean() * tau**2, (tt * ts * kl_d).mean()
        ctx.consts = (tau, w_ce, w_kd, w_dt)  # not n: a constant there would pin a compiled batch size
        stats = (s1, s_k, s_d, z_k, z_d, idx, soft, sigma_t, arg, tt, dl_dxs)
        if compiling:  # the gradient for grad = 1, formed now (see the docstring)
            unit = torch.ones((), dtype=x.dtype, device=x.device) / n
            ctx.save_for_backward(_DTKDObjective.gradient(unit, left, *stats, *ctx.consts))
        else:  # the exps are kept: the backward combines them
            ctx.save_for_backward(*stats, left)
        outs = (ce, kd, dt)
        ctx.mark_non_differentiable(*outs)
        return (w_ce * ce + w_kd * kd + w_dt * dt, *outs)

    @staticmethod
    def gradient(g, left, s1, s_k, s_d, z_k, z_d, idx, soft, sigma_t, arg, tt, dl_dxs, tau, w_ce, w_kd, w_dt):
        """``g * dL/dx`` from the forward's row sums and exps, ``g`` a 0-d tensor (the upstream
        gradient over the batch size)."""
        c_ce = g * w_ce
        c_q1 = c_ce if sigma_t is None else c_ce * sigma_t
        c_k = g * (w_kd * tau)  # d(T^2 KL_T)/dx = T (q - p)
        c_d = g * w_dt * tt  # dL/dx = T_t (q_D - p_D)
        # e1 c_q1 / s1 + e_k c_k / s_k + e_d c_d / s_d - f_k c_k / z_k - f_d c_d / z_d, as one batched
        # [1, 5] x [5, C] product per row (one read of each exp instead of five multiply-adds)
        coef = torch.cat([c_q1 / s1, c_k / s_k, c_d / s_d, -c_k / z_k, -c_d / z_d], dim=1)
        out = row_combine(coef, left[:5])
        out = add_at_(out, arg, dl_dxs * (g * w_dt))
        return ce_target_grad_(out, idx, soft, c_ce)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_unused):
        saved = ctx.saved_tensors
        if len(saved) == 1:  # compiled: the gradient was formed in the forward, for grad = 1
            return (grad * saved[0],) + (None,) * 13
        *stats, left = saved
        out = _DTKDObjective.gradient(grad / left.shape[1], left, *stats, *ctx.consts)
        return (out,) + (None,) * 13


def dtkd_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    soft_target: torch.Tensor | None,
    tau: float,
    ce_weight: float,
    kd_weight: float | torch.Tensor,
    dtkd_weight: float | torch.Tensor,
    temps_fn,
    teacher_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """``(loss, ce, kd, dtkd, T_t, T_s)`` of ``_DTKDObjective``: ``ce_weight * CE + kd_weight * KD_T +
    dtkd_weight * L_DTKD``; ``T_t``, ``T_s`` are ``[B]``, the rest scalars (all but ``loss`` detached).
    ``temps_fn(student_max [B, 1]) -> (T_t, T_s, dT_s/dx_s)`` holds the temperature rule, its guard
    and its slope (``dtkd_temperatures(..., slope=True)``); ``teacher_max`` (``[B, 1]``), when the
    caller has it, saves a pass."""
    x, t = student_logits.detach(), teacher_logits.detach()
    if teacher_max is None:
        teacher_max = t.amax(dim=1, keepdim=True)
    xs = x.amax(dim=1, keepdim=True)
    if is_compiling():  # the first argmax as a min reduction, fused with the max's loop (an
        # index-tracking max compiles to a slower loop of its own)
        cols = _column_numbers(x)
        arg = torch.where(x == xs, cols, x.shape[1]).amin(dim=1, keepdim=True)
    else:  # from the shifted logits, in the Function (first_max_index_)
        arg = None
    tt, ts, slope = temps_fn(xs)
    loss, ce, kd, dt = _DTKDObjective.apply(
        student_logits, t, labels.unsqueeze(1), soft_target,
        float(tau), float(ce_weight), kd_weight, dtkd_weight, xs, arg, tt, ts, slope, teacher_max,
    )
    return loss, ce, kd, dt, tt.squeeze(1), ts.squeeze(1)
