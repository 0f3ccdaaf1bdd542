"""Logit standardization (`standardize_logits`, `lskd`): the authors' normalize, defaults, invariances."""
import pytest
import torch
from _losses_utils import fixed_batch, random_batch, ref_cross_entropy, ref_kd, ref_standardize, student_grad

from timm_kd.losses import KDLoss, create_loss, standardize_logits
from timm_kd.losses.lskd import LSKDLoss

# From the references in _losses_utils.py on the fixed batch (float64): 0.1 CE + 9 KD_2(Z(s), Z(t)).
GOLDEN_KD_T2_STANDARDIZED = 0.25432352687114484
GOLDEN_LOSS = 2.3786514808818873


def test_standardize_matches_the_authors_normalize():
    """Unbiased std (ddof = 1), eps 1e-7 added to the std."""
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, std = 3.0, (((1 - 3) ** 2 + 1 + 0 + 9) / 3) ** 0.5  # ddof = 1
    expected = (z - mean) / (std + 1e-7)
    torch.testing.assert_close(standardize_logits(z), expected)
    s, _, _ = random_batch(8, 100, seed=1)
    torch.testing.assert_close(standardize_logits(s), ref_standardize(s))
    z = standardize_logits(s)
    torch.testing.assert_close(z.mean(-1), torch.zeros(8, dtype=s.dtype))
    torch.testing.assert_close(z.std(-1), torch.ones(8, dtype=s.dtype))


def test_defaults_are_the_papers():
    loss = create_loss("lskd")
    assert isinstance(loss, LSKDLoss) and isinstance(loss, KDLoss)
    assert (loss.tau, loss.ce_weight, loss.kd_weight, loss.logit_standardize) == (2.0, 0.1, 9.0, True)


def test_golden_values():
    s, t, y = fixed_batch()
    expected = ref_kd(ref_standardize(s), ref_standardize(t), 2.0)
    assert expected.item() == pytest.approx(GOLDEN_KD_T2_STANDARDIZED)
    out = create_loss("lskd")(s.float(), t.float(), y)
    assert out["kd"].item() == pytest.approx(GOLDEN_KD_T2_STANDARDIZED, rel=1e-5, abs=1e-6)
    assert out["loss"].item() == pytest.approx(GOLDEN_LOSS, abs=1e-5)


def test_is_kd_with_logit_standardize():
    s, t, y = random_batch(16, 50, seed=2, dtype=torch.float32)
    a = create_loss("lskd")(s, t, y)
    b = create_loss("kd", tau=2.0, ce_weight=0.1, kd_weight=9.0, logit_standardize=True)(s, t, y)
    for k in ("loss", "ce", "kd"):  # the same code on the same inputs in one process: bit-identical
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_value_and_student_gradient_match_reference():
    s, t, y = random_batch(16, 100, scale=4.0, seed=3)
    loss_fn = create_loss("lskd")

    def ours(z):
        return loss_fn(z.float(), t.float(), y)["loss"]

    def ref(z):
        return 0.1 * ref_cross_entropy(z, y) + 9.0 * ref_kd(ref_standardize(z), ref_standardize(t), 2.0)

    assert ours(s).item() == pytest.approx(ref(s).item(), abs=1e-5)
    torch.testing.assert_close(student_grad(ours, s).double(), student_grad(ref, s), atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    s, _, _ = random_batch(3, 7, seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(standardize_logits, (s,))


def test_kd_term_ignores_logit_shift_and_scale():
    """The paper's point: only the teacher's logit relations matter, not their range or offset."""
    s, t, y = random_batch(8, 20, seed=5, dtype=torch.float32)
    loss = create_loss("lskd")
    base = loss(s, t, y)["kd"]
    torch.testing.assert_close(loss(2.5 * s - 4.0, 0.3 * t + 7.0, y)["kd"], base, atol=1e-5, rtol=1e-5)
    plain = create_loss("kd", tau=2.0)
    assert abs(plain(2.5 * s, t, y)["kd"].item() - plain(s, t, y)["kd"].item()) > 1e-2


@pytest.mark.parametrize("kwargs", [{"tau": 0.0}, {"ce_weight": -0.1}, {"kd_weight": -9.0}])
def test_bad_arguments_fail_at_construction(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"lskd: {name} must be a finite number"):
        create_loss("lskd", **kwargs)


def test_logit_standardize_is_not_a_parameter():
    with pytest.raises(TypeError):
        create_loss("lskd", logit_standardize=False)
