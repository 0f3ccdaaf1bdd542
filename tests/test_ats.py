"""ATS and ISATS: golden values, the authors' formula, limits, soft targets, bf16, bad input.

The reference below is written from the authors' ``distill.py`` formula (lxcnju/ATS-LargeKD), not
from our code: a per-class-temperature softmax built with explicit loops in float64, and
``s^2 * mean_b sum_k -p_k log_softmax(z_s / s)_k`` as KD, ``(1 - λ) CE + λ KD`` as the objective.
"""
from __future__ import annotations

import math

import pytest
import torch

from timm_kd.losses import (
    ATSLoss,
    DistillLoss,
    ISATSLoss,
    ats_target_probs,
    create_loss,
    isats_candidates,
    isats_select_tau_wrong,
    list_losses,
    standardize_logits,
)


def ref_target(zt: torch.Tensor, y: torch.Tensor, t1: float, t2) -> torch.Tensor:
    """Authors' ATS target, one sample and one class at a time, float64."""
    B, C = zt.shape
    rows = []
    for b in range(B):
        tw = float(t2[b]) if torch.is_tensor(t2) else t2
        scaled = [float(zt[b, k]) / (t1 if k == int(y[b]) else tw) for k in range(C)]
        m = max(scaled)
        e = [math.exp(v - m) for v in scaled]
        Z = sum(e)
        rows.append([v / Z for v in e])
    return torch.tensor(rows, dtype=torch.float64)


def ref_loss(zs, zt, y, t1, t2, s, lam, soft=None):
    """Authors' objective in float64; differentiable in ``zs``. Returns (loss, ce, kd)."""
    p = ref_target(zt, y, t1, t2)

    def log_softmax(v):
        return v - v.logsumexp(dim=-1, keepdim=True)

    kd = s * s * (-(p * log_softmax(zs / s)).sum(dim=-1)).mean()
    ls = log_softmax(zs)
    if soft is None:
        ce = -ls[torch.arange(zs.shape[0]), y].mean()
    else:
        ce = -(soft.double() * ls).sum(dim=-1).mean()
    return (1 - lam) * ce + lam * kd, ce, kd


def ref_wrong_variance(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Population variance of the wrong-class probabilities, by masking (float64)."""
    out = []
    for b in range(p.shape[0]):
        keep = [k for k in range(p.shape[1]) if k != int(y[b])]
        out.append(p[b, keep].double().var(unbiased=False))
    return torch.stack(out)


# Fixed small input for golden values (sample 0: teacher right, ATS keeps it; sample 1: teacher
# right, but at τ2 = 2 the runner-up 4.5/2 beats the label 5/4: a flipped target).
ZS = torch.tensor([[1.0, -0.5, 2.0, 0.25], [0.3, 0.1, -1.2, 0.8]])
ZT = torch.tensor([[2.0, 1.0, 6.0, -1.0], [5.0, 4.5, -2.0, 1.5]])
Y = torch.tensor([2, 0])


def test_registered():
    assert {"ats", "isats"} <= set(list_losses())
    assert isinstance(create_loss("ats"), ATSLoss) and isinstance(create_loss("isats"), ISATSLoss)
    assert issubclass(ATSLoss, DistillLoss) and issubclass(ISATSLoss, DistillLoss)
    ats = create_loss("ats")
    assert (ats.tau_correct, ats.tau_wrong, ats.student_tau, ats.kd_weight) == (4.0, 3.0, 1.0, 0.5)


def test_golden_target_probs():
    p = ats_target_probs(ZT, Y, 4.0, 2.0)
    golden = torch.tensor(
        [
            [0.287489980676, 0.174371487640, 0.473990846254, 0.064147685429],
            [0.225722846862, 0.613578312893, 0.023791013025, 0.136907827219],
        ]
    )
    torch.testing.assert_close(p, golden, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(p.double(), ref_target(ZT, Y, 4.0, 2.0), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "t1,t2,s,lam,loss,ce,kd",
    [
        (4.0, 2.0, 1.0, 0.5, 1.1266640303076414, 0.895257673906825, 1.3580703867084578),
        (3.0, 1.5, 2.0, 0.7, 3.823492866625433, 0.895257673906825, 5.07845080636198),
    ],
)
def test_golden_loss(t1, t2, s, lam, loss, ce, kd):
    out = create_loss("ats", tau_correct=t1, tau_wrong=t2, student_tau=s, kd_weight=lam)(ZS, ZT, Y)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-6)
    assert out["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)
    # sample 1's target puts class 1 above its label 0
    assert out["target_flip"].item() == pytest.approx(0.5)
    # ... and the teacher's own logits rank label 0 first there, so the temperatures made that flip
    assert out["induced_flip"].item() == pytest.approx(0.5)
    assert set(out) == {"loss", "ce", "kd", "target_flip", "induced_flip"}
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")


@pytest.mark.parametrize(
    "t1,t2,s,lam,C",
    [(4.0, 3.0, 1.0, 0.5, 10), (4.0, 2.0, 1.0, 0.5, 100), (2.0, 5.0, 3.0, 0.9, 10), (6.0, 1.0, 1.5, 0.2, 37)],
)
def test_matches_authors_formula_value_and_grad(t1, t2, s, lam, C):
    B = 16
    zs = (torch.randn(B, C) * 3).requires_grad_()
    zt = torch.randn(B, C) * 5
    y = torch.randint(0, C, (B,))
    out = create_loss("ats", tau_correct=t1, tau_wrong=t2, student_tau=s, kd_weight=lam)(zs, zt, y)
    out["loss"].backward()
    zs64 = zs.detach().double().requires_grad_()
    ref, ref_ce, ref_kd = ref_loss(zs64, zt, y, t1, t2, s, lam)
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert out["kd"].item() == pytest.approx(ref_kd.item(), abs=1e-5)
    assert out["ce"].item() == pytest.approx(ref_ce.item(), abs=1e-5)
    torch.testing.assert_close(zs.grad.double(), zs64.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_equal_temperatures_give_kd_gradient(tau):
    """τ1 = τ2 = s = τ: same student gradient as Hinton KD at τ (``kd`` with the same weights);
    the values differ by exactly τ² times the teacher entropy (soft CE = KL + H(p))."""
    B, C = 8, 20
    zt = torch.randn(B, C) * 4
    y = torch.randint(0, C, (B,))
    zs1 = (torch.randn(B, C) * 2).requires_grad_()
    zs2 = zs1.detach().clone().requires_grad_()
    ats = create_loss("ats", tau_correct=tau, tau_wrong=tau, student_tau=tau, kd_weight=0.5)(zs1, zt, y)
    kd = create_loss("kd", tau=tau, ce_weight=0.5, kd_weight=0.5)(zs2, zt, y)
    ats["loss"].backward()
    kd["loss"].backward()
    torch.testing.assert_close(zs1.grad, zs2.grad, atol=1e-6, rtol=1e-5)
    p = torch.softmax(zt / tau, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert (ats["kd"] - kd["kd"]).item() == pytest.approx(tau**2 * entropy.item(), abs=1e-4)


def test_teacher_gets_no_gradient():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10, requires_grad=True)
    create_loss("ats")(zs, zt, torch.randint(0, 10, (4,)))["loss"].backward()
    assert zt.grad is None and zs.grad is not None


def test_soft_targets_use_argmax_column_and_soft_ce():
    B, C = 6, 12
    zs = (torch.randn(B, C) * 2).requires_grad_()
    zt = torch.randn(B, C) * 4
    a, b = torch.randint(0, C, (B,)), torch.randint(0, C, (B,))
    soft = 0.7 * torch.nn.functional.one_hot(a, C).float() + 0.3 * torch.nn.functional.one_hot(b, C).float()
    loss = create_loss("ats", tau_correct=4.0, tau_wrong=2.0)
    out = loss(zs, zt, soft)
    out["loss"].backward()
    zs64 = zs.detach().double().requires_grad_()
    ref, ref_ce, _ = ref_loss(zs64, zt, soft.argmax(-1), 4.0, 2.0, 1.0, 0.5, soft=soft)
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert out["ce"].item() == pytest.approx(ref_ce.item(), abs=1e-5)
    torch.testing.assert_close(zs.grad.double(), zs64.grad, atol=1e-5, rtol=0)
    # one-hot soft targets give exactly the hard-label result
    hard = loss(zs, zt, a)["loss"]
    one_hot = loss(zs, zt, torch.nn.functional.one_hot(a, C).float())["loss"]
    assert one_hot.item() == pytest.approx(hard.item(), rel=1e-5, abs=1e-6)


def test_batch_size_one():
    zs = torch.randn(1, 10, requires_grad=True)
    zt = torch.randn(1, 10) * 3
    y = torch.tensor([7])
    out = create_loss("ats", tau_correct=4.0, tau_wrong=2.0)(zs, zt, y)
    ref, _, _ = ref_loss(zs.detach().double(), zt, y, 4.0, 2.0, 1.0, 0.5)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    out["loss"].backward()
    assert torch.isfinite(zs.grad).all()
    out = create_loss("isats")(zs, zt, y)
    assert any(out["tau_wrong_mean"].item() == pytest.approx(c) for c in isats_candidates(1.0, 4.0, 5))


@pytest.mark.parametrize("name", ["ats", "isats"])
@pytest.mark.parametrize("standardize", [False, True])
def test_bf16_autocast_huge_logits_finite(name, standardize):
    B, C, D = 8, 50, 16
    head_s, head_t = torch.nn.Linear(D, C), torch.nn.Linear(D, C)
    with torch.no_grad():  # logits up to about ±1e4
        head_s.weight.mul_(3e3)
        head_t.weight.mul_(3e3)
    x = torch.randn(B, D)
    y = torch.randint(0, C, (B,))
    loss = create_loss(name, logit_standardize=standardize)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs, zt = head_s(x), head_t(x)
        assert zs.dtype == torch.bfloat16 and zs.abs().max() > 1e3
        out = loss(zs, zt, y)
    assert out["loss"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in out.values())
    out["loss"].backward()
    assert torch.isfinite(head_s.weight.grad).all()


def test_logit_standardize_applies_to_both_before_temperatures():
    B, C = 5, 9
    zs = torch.randn(B, C) * 3 + 2
    zt = torch.randn(B, C) * 6 - 1
    y = torch.randint(0, C, (B,))
    out = create_loss("ats", tau_correct=2.0, tau_wrong=1.0, logit_standardize=True)(zs, zt, y)
    _, ce, _ = ref_loss(zs.double(), zt, y, 2.0, 1.0, 1.0, 0.5)
    zs_std, zt_std = standardize_logits(zs.double()), standardize_logits(zt.double())
    _, _, kd = ref_loss(zs_std, zt_std, y, 2.0, 1.0, 1.0, 0.5)
    assert out["ce"].item() == pytest.approx(ce.item(), abs=1e-5)  # CE on raw logits
    assert out["kd"].item() == pytest.approx(kd.item(), abs=1e-5)


def test_target_probs_per_sample_tau_wrong():
    zt = torch.randn(6, 8) * 3
    y = torch.randint(0, 8, (6,))
    taus = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 8.0])
    p = ats_target_probs(zt, y, 4.0, taus)
    for b in range(6):
        row = ats_target_probs(zt[b : b + 1], y[b : b + 1], 4.0, float(taus[b]))
        torch.testing.assert_close(p[b : b + 1], row)
    torch.testing.assert_close(p.double(), ref_target(zt, y, 4.0, taus), atol=1e-6, rtol=0)
    # τ1 = τ2 is plain temperature scaling
    torch.testing.assert_close(ats_target_probs(zt, y, 2.5, 2.5), torch.softmax(zt / 2.5, dim=-1))


# --------------------------------------------------------------------------------------------- isats


def test_isats_golden_choice():
    # sample 0: τ2 = 1 would put logit 2/1 above the label's 6/4, so 1.41 (the next) is the smallest
    # admissible; sample 1: only τ2 = 4 keeps 4.5/τ2 below the label's 5/4.
    chosen = isats_select_tau_wrong(ZT, Y, 4.0, isats_candidates(1.0, 4.0, 5))
    torch.testing.assert_close(chosen, torch.tensor([math.sqrt(2.0), 4.0]))


@pytest.mark.parametrize("keep_label_argmax", [True, False])
def test_isats_chosen_tau_wrong_is_best_candidate(keep_label_argmax):
    B, C = 64, 30
    y = torch.randint(0, C, (B,))
    zt = torch.randn(B, C) * 2
    zt[torch.arange(B), y] += torch.rand(B) * 10  # teachers from unsure to confident
    cands = isats_candidates(0.5, 4.0, 7)
    chosen = isats_select_tau_wrong(zt, y, 4.0, cands, keep_label_argmax=keep_label_argmax)
    assert chosen.shape == (B,)
    # independent check: every candidate's target, its wrong-class variance (masking, float64) and
    # the gap between the label and the top class (0 where the label stays the argmax)
    targets = [ref_target(zt, y, 4.0, c) for c in cands]
    var = torch.stack([ref_wrong_variance(p, y) for p in targets])  # [K, B]
    gap = torch.stack([p[torch.arange(B), y] - p.max(-1).values for p in targets])  # [K, B]
    n_chosen_lower = 0
    for b in range(B):
        k = min(range(len(cands)), key=lambda i: abs(cands[i] - chosen[b].item()))
        assert chosen[b].item() == pytest.approx(cands[k], rel=1e-6)
        keeps = gap[:, b] >= 0
        if keep_label_argmax and not keeps.any():
            # no candidate keeps the label on top: the least contradicting target
            assert gap[k, b] >= gap[:, b].max() - 1e-9
            continue
        allowed = keeps if keep_label_argmax else torch.ones(len(cands), dtype=torch.bool)
        assert allowed[k]
        best = var[allowed, b].max()
        assert var[k, b] >= best * (1 - 1e-6), (b, chosen[b], var[:, b])
        n_chosen_lower += chosen[b].item() < 4.0
    assert n_chosen_lower > 0  # the choice is not always the trivial τ2 = τ1


def test_isats_loss_is_ats_with_chosen_per_sample_tau():
    B, C = 16, 20
    zs = (torch.randn(B, C) * 2).requires_grad_()
    zt = torch.randn(B, C) * 4
    y = torch.randint(0, C, (B,))
    out = create_loss("isats", tau_correct=4.0)(zs, zt, y)
    chosen = isats_select_tau_wrong(zt, y, 4.0, isats_candidates(1.0, 4.0, 5))
    assert out["tau_wrong_mean"].item() == pytest.approx(chosen.mean().item())
    out["loss"].backward()
    zs64 = zs.detach().double().requires_grad_()
    ref, _, ref_kd = ref_loss(zs64, zt, y, 4.0, chosen, 1.0, 0.5)
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert out["kd"].item() == pytest.approx(ref_kd.item(), abs=1e-5)
    torch.testing.assert_close(zs.grad.double(), zs64.grad, atol=1e-5, rtol=0)
    # one candidate: isats is ats
    one = create_loss("isats", tau_correct=4.0, tau_wrong_candidates=[2.0])(zs, zt, y)
    ats = create_loss("ats", tau_wrong=2.0)(zs, zt, y)
    assert one["loss"].item() == pytest.approx(ats["loss"].item(), rel=1e-5)


def test_isats_candidate_grid():
    assert isats_candidates(1.0, 4.0, 5) == pytest.approx((4.0, 2 * math.sqrt(2), 2.0, math.sqrt(2), 1.0))
    assert create_loss("isats", tau_correct=4.0).tau_wrong_candidates == pytest.approx(
        isats_candidates(1.0, 4.0, 5)
    )
    assert create_loss("isats", tau_wrong_candidates=[1, 3, 2]).tau_wrong_candidates == (3.0, 2.0, 1.0)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "name,kwargs,param",
    [
        ("ats", {"tau_correct": 0}, "tau_correct"),
        ("ats", {"tau_correct": -1.0}, "tau_correct"),
        ("ats", {"tau_correct": float("nan")}, "tau_correct"),
        ("ats", {"tau_wrong": 0.0}, "tau_wrong"),
        ("ats", {"tau_wrong": float("inf")}, "tau_wrong"),
        ("ats", {"student_tau": 0}, "student_tau"),
        ("ats", {"kd_weight": -0.1}, "kd_weight"),
        ("ats", {"kd_weight": 1.5}, "kd_weight"),
        ("isats", {"tau_correct": -2}, "tau_correct"),
        ("isats", {"tau_wrong_min": 0}, "tau_wrong_min"),
        ("isats", {"tau_wrong_min": 5.0}, "tau_wrong_min"),
        ("isats", {"num_candidates": 0}, "num_candidates"),
        ("isats", {"tau_wrong_candidates": []}, "tau_wrong_candidates"),
        ("isats", {"tau_wrong_candidates": [2.0, -1.0]}, "tau_wrong_candidates"),
        ("isats", {"kd_weight": -1}, "kd_weight"),
        ("isats", {"student_tau": float("nan")}, "student_tau"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(name, kwargs, param):
    with pytest.raises(ValueError, match=param):
        create_loss(name, **kwargs)


@pytest.mark.parametrize("name", ["ats", "isats"])
def test_bad_inputs_raise_with_the_fix(name):
    loss = create_loss(name)
    zs, zt, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="teacher_logits shape .* does not match"):
        loss(zs, torch.randn(4, 11), y)
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\)"):
        loss(zs, zt, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="label -1 is outside"):
        loss(zs, zt, torch.tensor([0, -1, 2, 3]))
    bad = zs.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="student_logits contain NaN"):
        loss(bad, zt, y)
    with pytest.raises(FloatingPointError, match="teacher_logits contain NaN"):
        loss(zs, bad, y)
    with pytest.raises(ValueError, match="integer class indices"):
        loss(zs, zt, y.float())


def test_target_probs_bad_arguments():
    zt, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="tau_wrong"):
        ats_target_probs(zt, y, 4.0, torch.ones(4))
    with pytest.raises(ValueError, match="tau_correct"):
        ats_target_probs(zt, y, 0.0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        ats_target_probs(zt, torch.tensor([0, 1]), 4.0, 2.0)
