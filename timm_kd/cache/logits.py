"""Top-k compression of teacher logits and their expansion back to ``[B, C]`` (FKD-style cache).

FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022,
arXiv 2112.01528) stores a few teacher logits per augmented view instead of running the teacher.

Compression keeps, per sample, the ``k`` largest logits (fp16), their class indices, and two fp32
log-sum-exps: of the full logit vector and of the ``C - k`` dropped logits. Expansion rebuilds a full
``[B, C]`` logit vector whose softmax at temperature 1 equals the teacher's on the top-k classes and
puts the exact remaining probability mass on the other ``C - k`` classes, shaped by the cache's *tail
prior* (the teacher's mean log-probabilities over the training views it ranked first in the same
class; one ``[C, C]`` table per cache, nothing per view) or, without one, spread uniformly. The error
this leaves per loss is measured in ``docs/cache.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "TAIL_PRIOR_MAX_CLASSES",
    "TAIL_MODES",
    "NO_LSE_MARGIN",
    "index_dtype",
    "check_top_k",
    "compress_logits",
    "expand_logits",
    "TailPrior",
    "topk_error",
]

#: Largest number of classes for which a build stores a tail prior (``[C, C]`` float32); above it
#: (ImageNet-21k) the cache has none and the tail is rebuilt flat.
TAIL_PRIOR_MAX_CLASSES = 4096
#: how ``expand_logits`` shapes the dropped logits: the cache's prior, or one flat value
TAIL_MODES = ("prior", "flat")

# Fill used by ``expand_logits`` when no log-sum-exp is stored: missing logits sit this far below the
# smallest kept logit (a softmax ratio of exp(-8) ~ 3.4e-4 per missing class at T = 1).
NO_LSE_MARGIN = 8.0


def index_dtype(num_classes: int) -> torch.dtype:
    """Smallest signed integer dtype that holds class indices ``0 .. num_classes - 1``.

    ``int16`` when ``num_classes <= 32767`` (ImageNet-1k, CIFAR), else ``int32`` (ImageNet-21k).
    Signed because ``datasets``/Arrow and ``torch.gather`` handle signed types everywhere.
    """
    return torch.int16 if num_classes <= 32767 else torch.int32


def check_top_k(k: int, num_classes: int) -> None:
    """Raise unless ``k`` is an int with ``1 <= k <= num_classes``, naming the valid range."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"top-k must be an int, got {type(k).__name__} ({k!r}).")
    if k <= 0 or k > num_classes:
        raise ValueError(
            f"top-k must satisfy 1 <= k <= num_classes ({num_classes}), got k={k}. "
            f"Pick a k in that range, e.g. k=10 (FKD's default) or k={num_classes} to store every logit."
        )


def compress_logits(logits: Tensor, k: int) -> dict[str, Tensor]:
    """Keep the top-k logits of each row, plus the log-sum-exp needed to rebuild the softmax.

    For a row ``z`` of ``C`` logits::

        idx      = argtopk(z, k)                       # int16 if C <= 32767 else int32, [B, k]
        values   = fp16(z[idx])                         # [B, k], sorted descending
        lse      = log(sum_c exp(z_c))          (fp32)  # [B]
        tail_lse = log(sum_{c not in idx} exp(z_c)) (fp32, -inf when k == C)  # [B]

    Both are computed from the full fp32 logits: ``exp(values - lse)`` are the teacher's probabilities
    of the kept classes (up to fp16 rounding of ``values``) and ``exp(tail_lse - lse)`` is the exact
    probability mass of the ``C - k`` dropped classes. ``tail_lse`` matters when that mass is small:
    ``1 - sum exp(values - lse)`` then loses most of its digits to the fp16 rounding of ``values``
    (a top logit of 9 is rounded by up to 0.004, which moves its probability by 0.4 %).

    Args:
        logits: ``[B, C]`` float logits (any float dtype; computed in fp32).
        k: number of logits kept per row, ``1 <= k <= C``.

    Returns:
        ``{"values": fp16 [B, k], "indices": int [B, k], "lse": fp32 [B], "tail_lse": fp32 [B]}`` on the
        input's device.
    """
    if logits.dim() != 2:
        raise ValueError(f"compress_logits expects [B, C] logits, got shape {tuple(logits.shape)}.")
    num_classes = logits.shape[1]
    check_top_k(k, num_classes)
    z = logits.detach().float()
    values, indices = torch.topk(z, k, dim=1, largest=True, sorted=True)
    lse = torch.logsumexp(z, dim=1)
    if k < num_classes:
        tail_lse = torch.logsumexp(z.scatter(1, indices, float("-inf")), dim=1)
    else:
        tail_lse = torch.full_like(lse, float("-inf"))
    return {
        "values": values.to(torch.float16),
        "indices": indices.to(index_dtype(num_classes)),
        "lse": lse,
        "tail_lse": tail_lse,
    }


#: water-filling rounds of ``_fill_tail`` (fixed: no host sync; 4 gave the exact mass on the parity teacher)
_FILL_ROUNDS = 8


def _fill_tail(shape: Tensor, tail_lse: Tensor, cap: Tensor) -> Tensor:
    """Shift each row of ``shape`` (``-inf`` at the kept classes) so that its log-sum-exp is ``tail_lse``
    with no entry above ``cap`` (``[B, 1]`` each): water-filling. With ``H`` the entries held at the
    cap and ``F`` the free ones::

        f_j = shape_j + a,   a = log(exp(tail_lse) - |H| exp(cap)) - logsumexp_{j in F} shape_j

    and every free entry that ends above the cap joins ``H``; repeated ``_FILL_ROUNDS`` times (``H``
    only grows, so this converges; the true tail satisfies the constraint, so a solution exists). A
    last ``min`` keeps the cap even if the rounds ran out (then the tail's mass is slightly low).
    """
    held = torch.zeros_like(shape, dtype=torch.bool)
    out = shape + (tail_lse - shape.logsumexp(dim=1, keepdim=True))
    for _ in range(_FILL_ROUNDS):
        held |= out > cap
        n_held = held.sum(dim=1, keepdim=True).to(shape.dtype)
        rest = tail_lse + torch.log1p(-(n_held * (cap - tail_lse).exp()).clamp(max=1.0 - 1e-6))
        free = shape.masked_fill(held, float("-inf"))
        # (clamp: a row whose every entry is held has no free mass; keeps -inf + inf out of it)
        out = torch.where(held, cap, free + (rest - free.logsumexp(dim=1, keepdim=True).clamp_min(-1e30)))
    return torch.minimum(out, cap)


class TailPrior:
    """Running sums for a cache's tail prior: the teacher's mean log-softmax, grouped by its top-1 class.

    For every view ``b`` with teacher logits ``z_b`` and top-1 class ``c_b = argmax z_b``::

        prior[c, :] = mean over {b : c_b = c} of log softmax(z_b)            [C, C]

    (float64 sums; a class the teacher never ranks first gets the mean over all views). Row ``c`` is
    what this teacher, on average, thinks of every other class when it says "c": which wrong classes
    look like ``c``. ``expand_logits`` uses it to shape the dropped logits of a view whose top-1 is
    ``c``. It is a property of the teacher and the training views, stored once per cache
    (``tail_prior.safetensors``), so the per-view cost stays k values, k indices and two numbers.
    """

    def __init__(self, num_classes: int):
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def add(self, logits: Tensor) -> None:
        """Accumulate a batch of ``[B, C]`` teacher logits (any device and float dtype)."""
        z = logits.detach().float()
        lp = z.log_softmax(dim=1).double().cpu()
        top1 = z.argmax(dim=1).cpu()
        self.sums.index_add_(0, top1, lp)
        self.counts += torch.bincount(top1, minlength=self.counts.numel()).double()

    def merge(self, other: TailPrior) -> TailPrior:
        self.sums += other.sums
        self.counts += other.counts
        return self

    def state(self) -> dict[str, Tensor]:
        return {"sums": self.sums, "counts": self.counts}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> TailPrior:
        out = cls(state["counts"].numel())
        out.sums, out.counts = state["sums"].double(), state["counts"].double()
        return out

    def table(self) -> Tensor:
        """The ``[C, C]`` float32 prior (mean log-probabilities per top-1 class)."""
        seen = self.counts > 0
        if not bool(seen.any()):
            raise ValueError("tail prior: no views were added.")
        overall = self.sums[seen].sum(dim=0) / self.counts.sum()
        mean = self.sums / self.counts.clamp_min(1.0)[:, None]
        return torch.where(seen[:, None], mean, overall).float()


def expand_logits(
    values: Tensor,
    indices: Tensor,
    num_classes: int,
    lse: Tensor | None = None,
    tail_lse: Tensor | None = None,
    tail_prior: Tensor | None = None,
) -> Tensor:
    """Rebuild ``[B, C]`` float32 logits from top-k values/indices (inverse of ``compress_logits``).

    The kept entries are written back exactly (``out[b, idx[b, j]] = values[b, j]``). The others are
    filled so that the softmax at T = 1 keeps the dropped probability mass exactly.

    With a tail prior ``P`` (``[C, C]``, ``TailPrior.table()``) and ``tail_lse`` ``T_b``, the dropped
    entries take the prior's shape for the view's top-1 class ``c = idx[b, 0]``, shifted to the stored
    mass::

        out[b, j] = P[c, j] + T_b - logsumexp_{j' dropped} P[c, j']     (j dropped; <= min_j v_j)

    so the tail keeps its mass *and* the teacher's typical ranking of the wrong classes (what a
    tempered softmax at T > 1 brings forward). No dropped logit may exceed the smallest kept one (the
    teacher's own order): entries the shift would lift above it are held there and the rest shifted
    up to keep the mass (``_fill_tail``). Without a prior, every dropped entry gets one fill
    value ``f_b`` per row and the mass is spread uniformly. With ``tail_lse``::

        f = T - log(C - k)                          (clamped to <= min_j v_j)
        => sum over the dropped classes of exp(f) = exp(T): their mass is the teacher's, exactly.

    With only the full log-sum-exp ``L`` (``lse``), the dropped mass is recovered as a difference::

        m = 1 - sum_j exp(v_j - L)                  (clamped to >= 1e-12)
        f = L + log(m / (C - k))                    (clamped to <= min_j v_j)

    which is exact in exact arithmetic but, when ``m`` is small, mostly fp16 rounding of ``v``
    (``tail_lse`` avoids this; ``compress_logits`` returns both). Either way ``softmax(out)_c`` is
    ``exp(v_c - L)`` on the kept classes and ``m / (C - k)`` on each dropped one. The clamp only acts
    under rounding: the average dropped probability can never exceed the smallest kept one. With
    neither, the fill is ``min_j v_j - NO_LSE_MARGIN`` (8.0): each dropped class is treated as
    exp(8) ~ 3000x less likely than the smallest kept one.

    Approximation: the T = 1 distribution's top-k entries and tail mass are preserved; the tail's
    shape is the prior's (this view's own deviations from its class's average are lost) or flat. A
    tempered softmax ``softmax(out / T)`` at ``T != 1`` is therefore not exactly the teacher's, and
    losses that use the logits themselves (standardization, logit moments) see the rebuilt tail. The
    error per registered loss, prior and flat, is measured in ``docs/cache.md`` and bounded in
    ``tests/test_cache.py``. With ``k == C`` the result equals the fp16-rounded input.

    Args:
        values: ``[B, k]`` top-k logits (any float dtype).
        indices: ``[B, k]`` integer class indices.
        num_classes: ``C``, the full number of classes.
        lse: optional ``[B]`` fp32 log-sum-exp of the full logits.
        tail_lse: optional ``[B]`` fp32 log-sum-exp of the dropped logits (preferred over ``lse``).
        tail_prior: optional ``[C, C]`` tail prior (used with ``tail_lse``; else ignored).

    Returns:
        ``[B, C]`` float32 logits on ``values``' device.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"values and indices must both be [B, k]; got {tuple(values.shape)} and {tuple(indices.shape)}."
        )
    k = values.shape[1]
    check_top_k(k, num_classes)
    v = values.float()
    idx = indices.long()
    vmin = v.min(dim=1).values
    if k < num_classes and tail_lse is not None and tail_prior is not None:
        if tail_prior.shape != (num_classes, num_classes):
            raise ValueError(
                f"tail_prior must be [C, C] = [{num_classes}, {num_classes}], got {tuple(tail_prior.shape)}; "
                f"it belongs to a cache of another number of classes."
            )
        shape = tail_prior.to(device=v.device, dtype=torch.float32).index_select(0, idx[:, 0])
        shape.scatter_(1, idx, float("-inf"))  # the kept classes take no part in the tail's mass
        tail = tail_lse.to(device=v.device, dtype=torch.float32).reshape(-1, 1)
        out = _fill_tail(shape, tail, vmin[:, None])
        return out.scatter_(1, idx, v)
    if k == num_classes:
        fill = vmin  # nothing to fill; any value is overwritten by the scatter below
    elif tail_lse is not None:
        fill = tail_lse.to(device=v.device, dtype=torch.float32).reshape(-1) - math.log(num_classes - k)
        fill = torch.minimum(fill, vmin)
    elif lse is not None:
        lse = lse.to(device=v.device, dtype=torch.float32).reshape(-1)
        kept = torch.exp(v - lse[:, None]).sum(dim=1)
        missing = (1.0 - kept).clamp_min(1e-12)
        fill = lse + torch.log(missing) - math.log(num_classes - k)
        fill = torch.minimum(fill, vmin)
    else:
        fill = vmin - NO_LSE_MARGIN
    out = fill[:, None].expand(v.shape[0], num_classes).contiguous()
    out.scatter_(1, idx, v)
    return out


def topk_error(
    loss_fn: Callable,
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    k: int,
    *,
    epoch: float | None = None,
    use_lse: bool = True,
    tail_prior: Tensor | None = None,
) -> dict[str, float]:
    """How much distilling from top-k teacher logits changes a loss and its gradient.

    Computes ``L = loss_fn(z_s, z_t, y)["loss"]`` with the full teacher logits and ``L_k`` with
    ``expand_logits(compress_logits(z_t, k), tail_prior=...)``, and their gradients ``g``, ``g_k`` with
    respect to the student logits ``z_s``::

        loss_rel_err = |L_k - L| / |L|
        grad_rel_err = ||g_k - g||_F / ||g||_F
        grad_cos     = <g_k, g> / (||g_k|| ||g||)

    The gradient is what training sees: ``grad_rel_err`` of 0.05 means the update direction moves by
    about 3 degrees. Measured per registered loss in ``docs/cache.md``.
    """
    packed = compress_logits(teacher_logits, k)
    lse = (packed["lse"], packed["tail_lse"]) if use_lse else (None, None)
    approx = expand_logits(packed["values"], packed["indices"], teacher_logits.shape[1], *lse, tail_prior)
    out = {}
    grads = []
    for z_t in (teacher_logits.detach().float(), approx):
        z_s = student_logits.detach().float().clone().requires_grad_(True)
        loss = loss_fn(z_s, z_t, target, epoch=epoch)["loss"]
        (g,) = torch.autograd.grad(loss, z_s)
        grads.append(g)
        out.setdefault("losses", []).append(float(loss.detach()))
    full, topk = out.pop("losses")
    g, gk = grads
    return {
        "loss": full,
        "loss_topk": topk,
        "loss_rel_err": abs(topk - full) / max(abs(full), 1e-12),
        "grad_rel_err": float((gk - g).norm() / g.norm().clamp_min(1e-12)),
        "grad_cos": float((gk * g).sum() / (gk.norm() * g.norm()).clamp_min(1e-12)),
    }
