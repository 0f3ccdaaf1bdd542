"""DKD (`dkd`): mdistiller's formula, the decoupling identity, stability, bad input."""
import pytest
import torch
from _losses_utils import (
    fixed_batch,
    random_batch,
    ref_dkd,
    ref_dkd_terms,
    ref_kd,
    ref_standardize,
    student_grad,
)

from timm_kd.losses import create_loss
from timm_kd.losses.dkd import DKDLoss, dkd_terms

# From the mdistiller-formula reference (ref_dkd in _losses_utils.py) on the fixed batch, float64.
GOLDEN_TCKD_T4 = 0.4506283636152337
GOLDEN_NCKD_T4 = 0.6736311647200482
GOLDEN_LOSS_EPOCH10 = 3.8172362311036476  # warm-up factor 10/20


def test_defaults_are_mdistillers():
    loss = create_loss("dkd")
    assert isinstance(loss, DKDLoss)
    assert (loss.alpha, loss.beta, loss.tau, loss.ce_weight, loss.warmup_epochs) == (1.0, 8.0, 4.0, 1.0, 20)


def test_golden_constants_come_from_the_reference():
    s, t, y = fixed_batch()
    tckd, nckd = ref_dkd_terms(s, t, y, 4.0)
    assert (tckd.item(), nckd.item()) == pytest.approx((GOLDEN_TCKD_T4, GOLDEN_NCKD_T4), abs=1e-12)
    assert ref_dkd(s, t, y, 10.0).item() == pytest.approx(GOLDEN_LOSS_EPOCH10, abs=1e-12)


def test_golden_values():
    s, t, y = fixed_batch(torch.float32)
    out = create_loss("dkd")(s, t, y, epoch=10)
    assert out["tckd"].item() == pytest.approx(GOLDEN_TCKD_T4, rel=1e-5, abs=1e-6)
    assert out["nckd"].item() == pytest.approx(GOLDEN_NCKD_T4, abs=1e-5)
    assert out["warmup"].item() == 0.5
    assert out["loss"].item() == pytest.approx(GOLDEN_LOSS_EPOCH10, abs=1e-5)


@pytest.mark.parametrize(
    "kw", [{}, {"alpha": 2.0, "beta": 0.5, "tau": 1.0, "ce_weight": 0.3, "warmup_epochs": 1}]
)
def test_value_and_student_gradient_match_mdistiller(kw):
    s, t, y = random_batch(16, 100, scale=3.0, seed=1)
    loss_fn = create_loss("dkd", **kw)
    ref_kw = {("warmup" if k == "warmup_epochs" else k): v for k, v in kw.items()}

    def ours(z):
        return loss_fn(z.float(), t.float(), y, epoch=7)["loss"]

    def ref(z):
        return ref_dkd(z, t, y, 7, **ref_kw)

    assert ours(s).item() == pytest.approx(ref(s).item(), abs=1e-5)
    torch.testing.assert_close(student_grad(ours, s).double(), student_grad(ref, s), atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    s, t, y = random_batch(4, 6, seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sum(dkd_terms(z, t, y, 2.0)), (s,))


def test_limit_decoupling_identity():
    """The paper's Eq. 1: KD = TCKD + (1 - p_t[y]) * NCKD, per sample."""
    s, t, y = random_batch(6, 12, seed=3)
    tau = 4.0
    for i in range(6):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_terms(si, ti, yi, tau)
        p_target = torch.softmax(ti / tau, -1)[0, yi].item()
        torch.testing.assert_close(tckd + (1 - p_target) * nckd, ref_kd(si, ti, tau))


def test_limit_nckd_ignores_the_target_logit_and_zero_weights_give_ce():
    s, t, y = random_batch(5, 8, seed=4)
    g = student_grad(lambda z: dkd_terms(z, t, y, 4.0)[1], s)
    assert g.gather(1, y[:, None]).abs().max() < 1e-12
    out = create_loss("dkd", alpha=0.0, beta=0.0, warmup_epochs=0)(s.float(), t.float(), y)
    torch.testing.assert_close(out["loss"], out["ce"])
    same = create_loss("dkd", warmup_epochs=0)(t.float(), t.float(), y)
    assert same["tckd"].item() < 1e-6 and same["nckd"].item() < 1e-6


def test_confident_logits_stay_finite_where_mdistillers_log_of_softmax_is_not():
    """q_y underflows in float32: mdistiller's torch.log(softmax) gives inf; the log-space form does not."""
    s = torch.tensor([[-200.0, 0.0, 1.0, 2.0], [300.0, 0.0, -1.0, 0.5]])
    t = torch.tensor([[3.0, 0.0, 1.0, 0.5], [2.0, 0.1, 0.0, -1.0]])
    y = torch.tensor([0, 0])
    assert not torch.isfinite(ref_dkd_terms(s, t, y, 1.0)[0])
    s.requires_grad_(True)
    out = create_loss("dkd", tau=1.0, warmup_epochs=0)(s, t, y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()
    # and where mdistiller's is finite (float64 here) the two agree
    tckd, nckd = dkd_terms(s.detach().double(), t.double(), y, 1.0)
    ref_tckd, ref_nckd = ref_dkd_terms(s.detach().double(), t.double(), y, 1.0)
    torch.testing.assert_close((tckd, nckd), (ref_tckd, ref_nckd))


def test_soft_targets_decouple_at_the_argmax():
    s, t, y = random_batch(6, 7, seed=5)
    soft = torch.full((6, 7), 0.02, dtype=torch.float64).scatter_(1, y[:, None], 0.88)
    loss = create_loss("dkd", warmup_epochs=0)
    hard, mixed = loss(s.float(), t.float(), y), loss(s.float(), t.float(), soft.float())
    torch.testing.assert_close(mixed["tckd"], hard["tckd"])
    torch.testing.assert_close(mixed["nckd"], hard["nckd"])
    assert mixed["ce"].item() > hard["ce"].item()  # soft cross-entropy against the smoothed target


def test_logit_standardize_option():
    s, t, y = random_batch(8, 20, seed=6)
    out = create_loss("dkd", logit_standardize=True, tau=2.0, warmup_epochs=0)(s.float(), t.float(), y)
    tckd, nckd = ref_dkd_terms(ref_standardize(s), ref_standardize(t), y, 2.0)
    assert (out["tckd"].item(), out["nckd"].item()) == pytest.approx((tckd.item(), nckd.item()), abs=1e-5)


def test_warmup_and_missing_epoch():
    s, t, y = random_batch(4, 6, seed=7, dtype=torch.float32)
    loss = create_loss("dkd")
    with pytest.raises(ValueError, match=r"dkd: this loss has a warm-up of 20 epochs.*epoch=epoch"):
        loss(s, t, y)
    a, b = loss(s, t, y, epoch=5), loss(s, t, y, epoch=25)
    torch.testing.assert_close(a["loss"] - a["ce"], 0.25 * (b["loss"] - b["ce"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "dkd: tau must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"beta": -8.0}, "beta must be a finite number >= 0"),
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"warmup_epochs": -5}, "warmup_epochs"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loss("dkd", **kwargs)


def test_bad_inputs_fail_with_the_fix():
    loss = create_loss("dkd", warmup_epochs=0)
    s, t, _ = random_batch(3, 5, seed=8, dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss(s, t[:, :3], y)
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 5\)"):
        loss(s, t, torch.tensor([0, 7, 2]))
    with pytest.raises(FloatingPointError, match="teacher_logits contain NaN or inf"):
        loss(s, t.clone().fill_(float("-inf")), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        loss(s[:, :1], t[:, :1], torch.tensor([0, 0, 0]))
