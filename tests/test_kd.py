"""Hinton KD (`kd`): golden values, gradients, timm's LogitDistillationTask, bad input."""
import math

import pytest
import timm
import torch
from _losses_utils import fixed_batch, random_batch, ref_cross_entropy, ref_kd, ref_standardize, student_grad
from timm.task import LogitDistillationTask

from timm_kd.losses import KDLoss, create_loss, kd_term

# From the references in _losses_utils.py on the fixed batch (float64).
GOLDEN_CE = 0.8973973904158378
GOLDEN_KD_T4 = 0.8660661539685295
GOLDEN_KD_T1 = 0.370229253554103


def test_defaults_are_mdistillers_cifar100_kd():
    loss = create_loss("kd")
    assert isinstance(loss, KDLoss)
    assert (loss.tau, loss.ce_weight, loss.kd_weight, loss.logit_standardize) == (4.0, 0.1, 0.9, False)


def test_golden_values():
    s, t, y = fixed_batch(torch.float32)
    out = create_loss("kd")(s, t, y)
    assert out["ce"].item() == pytest.approx(GOLDEN_CE, rel=1e-5, abs=1e-6)
    assert out["kd"].item() == pytest.approx(GOLDEN_KD_T4, rel=1e-5, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * GOLDEN_CE + 0.9 * GOLDEN_KD_T4, rel=1e-5, abs=1e-6)
    out1 = create_loss("kd", tau=1.0, ce_weight=0.5, kd_weight=0.5)(s, t, y)
    assert out1["loss"].item() == pytest.approx(0.5 * GOLDEN_CE + 0.5 * GOLDEN_KD_T1, rel=1e-5, abs=1e-6)


def test_golden_constants_come_from_the_reference():
    s, t, y = fixed_batch()
    assert ref_cross_entropy(s, y).item() == pytest.approx(GOLDEN_CE, abs=1e-12)
    assert ref_kd(s, t, 4.0).item() == pytest.approx(GOLDEN_KD_T4, abs=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0, 8.0])
def test_value_and_student_gradient_match_reference(tau):
    s, t, y = random_batch(16, 100, scale=4.0, seed=1)
    loss_fn = create_loss("kd", tau=tau)

    def ours(z):
        return loss_fn(z.float(), t.float(), y)["loss"]

    def ref(z):
        return 0.1 * ref_cross_entropy(z, y) + 0.9 * ref_kd(z, t, tau)

    assert ours(s).item() == pytest.approx(ref(s).item(), abs=1e-5)
    torch.testing.assert_close(student_grad(ours, s).double(), student_grad(ref, s), atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    s, t, _ = random_batch(4, 6, seed=2)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: kd_term(z, t, 3.0), (s,))


def test_gradient_is_tau_times_probability_gap():
    """d(T^2 KL)/dz_s = T (q - p) / B: the T^2 factor keeps the soft-target gradient independent of T."""
    s, t, _ = random_batch(5, 7, seed=3)
    tau = 4.0
    g = student_grad(lambda z: kd_term(z, t, tau), s)
    p, q = torch.softmax(t / tau, -1), torch.softmax(s / tau, -1)
    torch.testing.assert_close(g, tau * (q - p) / s.shape[0])


def test_kd_term_is_zero_when_student_equals_teacher():
    s, _, y = random_batch(4, 9, seed=4)
    out = create_loss("kd")(s.float(), s.float(), y)
    assert abs(out["kd"].item()) < 1e-6


def test_equals_timm_logit_distillation_task():
    """Same logits, same number as timm's own KD (timm.task.LogitDistillationTask)."""
    student = timm.create_model("test_resnet", num_classes=10)
    teacher = timm.create_model("test_resnet", num_classes=10).eval()
    task = LogitDistillationTask(
        student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.1,
        distill_loss_weight=0.9, temperature=4.0, verbose=False,
    )
    seen = {}
    student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", o))
    teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", o))
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    timm_out = task(x, y)
    ours = create_loss("kd", tau=4.0, ce_weight=0.1, kd_weight=0.9)(seen["student"], seen["teacher"], y)
    # two float32 computations by different kernels: float32 tolerance
    assert ours["kd"].item() == pytest.approx(timm_out["kd_loss"].item(), rel=1e-5, abs=1e-7)
    assert ours["loss"].item() == pytest.approx(timm_out["loss"].item(), rel=1e-5, abs=1e-7)


def test_logit_standardize_option_is_kd_on_zscored_logits():
    s, t, y = random_batch(8, 20, seed=5)
    out = create_loss("kd", tau=2.0, logit_standardize=True)(s.float(), t.float(), y)
    expected = ref_kd(ref_standardize(s), ref_standardize(t), 2.0)
    assert out["kd"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out["ce"].item() == pytest.approx(ref_cross_entropy(s, y).item(), abs=1e-5)  # CE on raw logits


def test_soft_targets_use_soft_cross_entropy():
    s, t, y = random_batch(6, 5, seed=6)
    soft = torch.full((6, 5), 0.05, dtype=torch.float64).scatter_(1, y[:, None], 0.8)
    out = create_loss("kd")(s.float(), t.float(), soft.float())
    expected_ce = -(soft * torch.log_softmax(s, -1)).sum(-1).mean()
    assert out["ce"].item() == pytest.approx(expected_ce.item(), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "tau must be a finite number > 0"),
        ({"tau": -2.0}, "tau must be a finite number > 0"),
        ({"tau": math.nan}, "tau"),
        ({"ce_weight": -0.1}, "ce_weight must be a finite number >= 0"),
        ({"kd_weight": -1.0}, "use 0 to switch the term off"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loss("kd", **kwargs)


def test_bad_inputs_fail_with_the_fix():
    loss = create_loss("kd")
    s, t, _ = random_batch(4, 5, seed=7, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="teacher_logits shape.*class_map"):
        loss(s, t[:, :4], y)
    with pytest.raises(ValueError, match=r"label 5 is outside \[0, 5\).*num_classes"):
        loss(s, t, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(FloatingPointError, match="student_logits contain NaN.*learning rate"):
        loss(s.clone().index_fill_(0, torch.tensor([1]), float("nan")), t, y)
    with pytest.raises(FloatingPointError, match="teacher_logits contain NaN or inf"):
        loss(s, t.clone().index_fill_(0, torch.tensor([2]), float("inf")), y)
