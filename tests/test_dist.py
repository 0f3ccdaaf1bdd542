"""DIST (`dist`): the authors' Pearson-relation loss, golden values, limits, bad input."""
import pytest
import torch
from _losses_utils import fixed_batch, random_batch, ref_cross_entropy, ref_dist_terms, student_grad

from timm_kd.losses import create_loss
from timm_kd.losses.dist import DISTLoss, dist_terms, pearson_correlation

# From the authors' formula (ref_dist_terms in _losses_utils.py) on the fixed batch, float64.
GOLDEN_INTER_T1, GOLDEN_INTRA_T1 = 0.4310760293779117, 0.3089666607227104
GOLDEN_INTER_T4, GOLDEN_INTRA_T4 = 4.600788020785458, 6.424935991387393
GOLDEN_CE = 0.8973973904158378


def test_defaults_are_the_authors_imagenet_setting():
    loss = create_loss("dist")
    assert isinstance(loss, DISTLoss)
    assert (loss.beta, loss.gamma, loss.tau, loss.ce_weight, loss.kd_weight) == (1.0, 1.0, 1.0, 1.0, 2.0)


def test_golden_constants_come_from_the_reference():
    s, t, _ = fixed_batch()
    t1 = [v.item() for v in ref_dist_terms(s, t, 1.0)]
    t4 = [v.item() for v in ref_dist_terms(s, t, 4.0)]
    assert t1 == pytest.approx([GOLDEN_INTER_T1, GOLDEN_INTRA_T1], abs=1e-12)
    assert t4 == pytest.approx([GOLDEN_INTER_T4, GOLDEN_INTRA_T4], abs=1e-12)


def test_golden_values():
    s, t, y = fixed_batch(torch.float32)
    out = create_loss("dist")(s, t, y)
    terms = (out["inter"].item(), out["intra"].item())
    assert terms == pytest.approx((GOLDEN_INTER_T1, GOLDEN_INTRA_T1), rel=1e-5, abs=1e-6)
    expected = GOLDEN_CE + 2.0 * (GOLDEN_INTER_T1 + GOLDEN_INTRA_T1)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-5)
    out4 = create_loss("dist", tau=4.0, beta=2.0, gamma=0.5, kd_weight=1.0)(s, t, y)
    terms = (out4["inter"].item(), out4["intra"].item())
    assert terms == pytest.approx((GOLDEN_INTER_T4, GOLDEN_INTRA_T4), abs=1e-5)
    expected = GOLDEN_CE + 2.0 * GOLDEN_INTER_T4 + 0.5 * GOLDEN_INTRA_T4
    assert out4["loss"].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_value_and_student_gradient_match_the_authors(tau):
    s, t, y = random_batch(32, 100, scale=3.0, seed=1)
    loss_fn = create_loss("dist", tau=tau)

    def ours(z):
        return loss_fn(z.float(), t.float(), y)["loss"]

    def ref(z):
        inter, intra = ref_dist_terms(z, t, tau)
        return ref_cross_entropy(z, y) + 2.0 * (inter + intra)

    assert ours(s).item() == pytest.approx(ref(s).item(), abs=1e-5)
    torch.testing.assert_close(student_grad(ours, s).double(), student_grad(ref, s), atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    s, t, _ = random_batch(5, 6, seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sum(dist_terms(z, t, 2.0)), (s,))


def test_limit_identical_predictions_give_zero():
    s, _, _ = random_batch(8, 10, seed=3)
    inter, intra = dist_terms(s, s.clone(), 4.0)
    assert 0 <= inter.item() < 1e-4 and 0 <= intra.item() < 1e-4  # not exactly 0: the authors' eps of 1e-8


def test_limit_tau_squared_scaling():
    """The temperature enters only through softmax(z / tau) and the tau^2 factor."""
    s, t, _ = random_batch(8, 10, seed=4)
    for a, b in zip(dist_terms(s, t, 3.0), dist_terms(s / 3.0, t / 3.0, 1.0)):
        torch.testing.assert_close(a, 9.0 * b)


def test_pearson_is_shift_and_scale_invariant():
    a, b, _ = random_batch(4, 10, seed=5)
    torch.testing.assert_close(pearson_correlation(3.0 * a + 2.0, b), pearson_correlation(a, b))
    torch.testing.assert_close(pearson_correlation(a, -a), -torch.ones(4, dtype=a.dtype))


def test_batch_of_one_has_no_intra_class_signal():
    s, t, y = random_batch(1, 10, seed=6, dtype=torch.float32)
    s.requires_grad_(True)
    out = create_loss("dist", tau=2.0)(s, t, y)
    assert out["intra"].item() == pytest.approx(4.0)  # rho = 0 for columns without spread: tau^2 * (1 - 0)
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


def _degenerate_batch(case: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(1, 10, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([3])
    if case == "identical":  # 8 copies of one sample: no class column has spread either
        s, t, y = s.expand(8, 10).clone(), t.expand(8, 10).clone(), y.expand(8).clone()
    return s, t, y


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("case", ["one", "identical"])
def test_degenerate_batch_gradient_is_autograd_of_the_authors_formula(case, tau):
    """B = 1, or identical samples: the intra-class term has no spread in any column. Its gradient is
    exactly 0 under autograd through the authors' formula (Pearson with eps, ``a.norm()``), and ours
    is that autograd: equal in float64, and the float32 loss's gradient within float32 rounding."""
    s, t, y = _degenerate_batch(case, seed=0)
    assert student_grad(lambda z: ref_dist_terms(z, t, tau)[1], s).abs().max() == 0
    ours = student_grad(lambda z: sum(dist_terms(z, t, tau)), s)
    ref = student_grad(lambda z: sum(ref_dist_terms(z, t, tau)), s)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    loss_fn = create_loss("dist", tau=tau)
    ours32 = student_grad(lambda z: loss_fn(z.float(), t.float(), y)["loss"], s).double()
    ref = student_grad(lambda z: ref_cross_entropy(z, y) + 2.0 * sum(ref_dist_terms(z, t, tau)), s)
    torch.testing.assert_close(ours32, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "dist: tau must be a finite number > 0"),
        ({"beta": -1.0}, "beta must be a finite number >= 0"),
        ({"gamma": -1.0}, "gamma"),
        ({"ce_weight": -0.5}, "ce_weight"),
        ({"kd_weight": -2.0}, "kd_weight"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loss("dist", **kwargs)


def test_bad_inputs_fail_with_the_fix():
    loss = create_loss("dist")
    s, t, _ = random_batch(3, 5, seed=7, dtype=torch.float32)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss(s, t[:2], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 5\)"):
        loss(s, t, torch.tensor([0, 5, 2]))
    with pytest.raises(FloatingPointError, match="student_logits contain NaN"):
        loss(s.clone().fill_(float("nan")), t, torch.tensor([0, 1, 2]))
