"""DTKD (`dtkd`): the authors' formula where it is defined, the guard where it is not, a real run."""
import math

import pytest
import timm
import torch
from _losses_utils import (
    fixed_batch,
    positive_max_batch,
    random_batch,
    ref_dtkd,
    ref_dtkd_terms,
    ref_kd,
    student_grad,
)

from timm_kd.losses import create_loss, kd_term
from timm_kd.losses.dtkd import DTKDLoss, dtkd_temperatures, dtkd_term

# From the authors' formula (ref_dtkd in _losses_utils.py) on the fixed batch, float64. All three
# samples have positive maxima within a factor 4, so the default guard is inactive there.
GOLDEN_DTKD_TERM = 0.38361228735736175
GOLDEN_TEMP_TEACHER = [5.714285714285714, 5.882352941176471, 5.161290322580645]
GOLDEN_TEMP_STUDENT = [2.2857142857142856, 2.1176470588235294, 2.838709677419355]
GOLDEN_LOSS_EPOCH5 = 1.4016231444259915  # warm-up factor 5/20
GOLDEN_LOSS_EPOCH30 = 2.9143004064564524  # past the warm-up


def test_defaults_are_the_authors():
    loss = create_loss("dtkd")
    assert isinstance(loss, DTKDLoss)
    weights = (loss.tau, loss.dtkd_weight, loss.kd_weight, loss.ce_weight, loss.warmup_epochs)
    assert weights == (4, 3, 1, 1, 20)
    assert loss.max_temp_ratio == 4.0 and loss.logit_standardize is False


def test_golden_constants_come_from_the_reference():
    s, t, y = fixed_batch()
    term, temp_t, temp_s = ref_dtkd_terms(s, t, 4.0)
    assert term.item() == pytest.approx(GOLDEN_DTKD_TERM, abs=1e-12)
    assert temp_t.tolist() == pytest.approx(GOLDEN_TEMP_TEACHER, abs=1e-12)
    assert temp_s.tolist() == pytest.approx(GOLDEN_TEMP_STUDENT, abs=1e-12)
    assert ref_dtkd(s, t, y, 5.0).item() == pytest.approx(GOLDEN_LOSS_EPOCH5, abs=1e-12)
    assert ref_dtkd(s, t, y, 30.0).item() == pytest.approx(GOLDEN_LOSS_EPOCH30, abs=1e-12)


@pytest.mark.parametrize("max_temp_ratio", [4.0, None])
def test_golden_values(max_temp_ratio):
    s, t, y = fixed_batch(torch.float32)
    loss = create_loss("dtkd", max_temp_ratio=max_temp_ratio)
    out = loss(s, t, y, epoch=5)
    assert out["loss"].item() == pytest.approx(GOLDEN_LOSS_EPOCH5, abs=1e-5)
    assert out["dtkd"].item() == pytest.approx(GOLDEN_DTKD_TERM, rel=1e-5, abs=1e-6)
    assert out["warmup"].item() == pytest.approx(0.25)
    assert out["temp_teacher"].item() == pytest.approx(sum(GOLDEN_TEMP_TEACHER) / 3, rel=1e-5, abs=1e-6)
    assert out["temp_student"].item() == pytest.approx(sum(GOLDEN_TEMP_STUDENT) / 3, rel=1e-5, abs=1e-6)
    assert loss(s, t, y, epoch=30)["loss"].item() == pytest.approx(GOLDEN_LOSS_EPOCH30, abs=1e-5)
    _, temp_t, temp_s = dtkd_term(s, t, 4.0, max_temp_ratio)
    assert temp_t.tolist() == pytest.approx(GOLDEN_TEMP_TEACHER, rel=1e-5, abs=1e-6)
    assert temp_s.tolist() == pytest.approx(GOLDEN_TEMP_STUDENT, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_temp_ratio", [4.0, None])
def test_value_and_student_gradient_match_the_authors(seed, max_temp_ratio):
    """Positive maxima within a factor 2: default guard inactive, temperatures not detached."""
    s, t, y = positive_max_batch(16, 50, seed=seed)
    loss_fn = create_loss("dtkd", max_temp_ratio=max_temp_ratio)

    def ours(z):
        return loss_fn(z.float(), t.float(), y, epoch=12.5)["loss"]

    def ref(z):
        return ref_dtkd(z, t, y, 12.5)

    assert ours(s).item() == pytest.approx(ref(s).item(), abs=1e-5)
    torch.testing.assert_close(student_grad(ours, s).double(), student_grad(ref, s), atol=1e-5, rtol=1e-4)


def test_tied_maxima_send_the_temperature_gradient_to_the_first_one():
    """With tied student maxima the temperatures' gradient goes to the first maximum's column, as
    ``torch.max(dim)`` in the authors' code sends it; a row of equal logits (a zero-initialised head)
    included."""
    s, t, y = positive_max_batch(6, 12, seed=5)
    s[:, [2, 7, 9]] = s.amax(-1, keepdim=True) + 0.5  # three-way ties at the maximum
    s[5] = 2.0  # every logit tied
    loss_fn = create_loss("dtkd", max_temp_ratio=None)

    def ours(z):
        return loss_fn(z.float(), t.float(), y, epoch=30.0)["loss"]

    def ref(z):
        return ref_dtkd(z, t, y, 30.0)

    g, g_ref = student_grad(ours, s).double(), student_grad(ref, s)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    assert (g_ref[:5, 2] - g_ref[:5, 7]).abs().min() > 1e-3  # the first maximum's column differs


def test_temperatures_are_not_detached():
    """The gradient through x_s in both temperatures is part of the authors' gradient."""
    s, t, _ = positive_max_batch(8, 20, seed=3)
    full = student_grad(lambda z: dtkd_term(z, t, 4.0)[0], s)

    def detached(z):
        temp_t, temp_s = (v.detach() for v in dtkd_term(z, t, 4.0)[1:])
        kl = torch.softmax(t / temp_t[:, None], -1) * (
            torch.log_softmax(t / temp_t[:, None], -1) - torch.log_softmax(z / temp_s[:, None], -1)
        )
        return (kl.sum(-1) * temp_t * temp_s).mean()

    part = student_grad(detached, s)
    assert (full - part).abs().max() > 1e-3 * full.abs().max()


@pytest.mark.parametrize("max_temp_ratio", [4.0, None])
def test_gradcheck_float64(max_temp_ratio):
    s, t, _ = positive_max_batch(4, 6, seed=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: dtkd_term(z, t, 4.0, max_temp_ratio)[0], (s,))


def test_gradcheck_float64_where_the_guard_clamps():
    s, t, _ = positive_max_batch(4, 6, seed=5)
    s = (s - s.amax(-1, keepdim=True) + 0.2).requires_grad_(True)  # x_s = 0.2, far below x_t
    assert torch.autograd.gradcheck(lambda z: dtkd_term(z, t * 3, 4.0)[0], (s,))


def test_limit_temperatures_sum_to_2T_and_equal_sharpness():
    s, t, _ = positive_max_batch(32, 10, seed=6)
    temp_t, temp_s = dtkd_temperatures(s.amax(-1), t.amax(-1), 4.0)
    torch.testing.assert_close(temp_t + temp_s, torch.full_like(temp_t, 8.0))
    torch.testing.assert_close(t.amax(-1) / temp_t, s.amax(-1) / temp_s)  # equal sharpness
    torch.testing.assert_close(t.amax(-1) / temp_t, (t.amax(-1) + s.amax(-1)) / 8.0)
    # the guard keeps the sum 2T everywhere, whatever the signs of the maxima
    s, t, _ = random_batch(64, 10, scale=5.0, seed=7)
    for ratio in (4.0, None):
        temp_t, temp_s = dtkd_temperatures(s.amax(-1) - 3.0, t.amax(-1), 4.0, ratio)
        torch.testing.assert_close(temp_t + temp_s, torch.full_like(temp_t, 8.0))


def test_limit_equal_maxima_give_plain_kd():
    """x_s = x_t: both temperatures are T, so L_DTKD = T^2 KL = KD_T."""
    s, t, _ = positive_max_batch(8, 12, seed=8)
    s = s - s.amax(-1, keepdim=True) + t.amax(-1, keepdim=True)
    term, temp_t, temp_s = dtkd_term(s, t, 4.0)
    torch.testing.assert_close(temp_t, torch.full_like(temp_t, 4.0))
    torch.testing.assert_close(term, ref_kd(s, t, 4.0))


def test_kd_term_is_kd_py():
    s, t, y = positive_max_batch(8, 12, seed=9, dtype=torch.float32)
    out = create_loss("dtkd", warmup_epochs=0)(s, t, y)
    torch.testing.assert_close(out["kd"], kd_term(s, t, 4.0))


@pytest.mark.parametrize(
    "student_max, teacher_max",
    [(0.05, 10.0), (1e-9, 10.0), (0.0, 10.0), (-1.0, 10.0), (-2.0, 2.0), (3.0, -3.0), (40.0, 2.0)],
)
def test_guard_where_the_authors_formula_breaks(student_max, teacher_max):
    """Fresh students (x_s ~ 0+), non-positive maxima, x_t + x_s = 0: finite, bounded temperatures."""
    t = torch.tensor([[teacher_max, teacher_max - 1.0, teacher_max - 3.0, teacher_max - 0.5]])
    s = torch.tensor([[student_max, student_max - 0.2, student_max - 0.7, student_max - 0.4]])
    _, ref_t, ref_s = ref_dtkd_terms(s.double(), t.double(), 4.0)
    normal = student_max > 0 and teacher_max > 0 and 0.25 <= student_max / teacher_max <= 4
    assert not normal
    broken = not (0 < ref_s.item() < 8 and 0 < ref_t.item() < 8) or not (1.6 <= ref_s.item() <= 6.4)
    assert broken  # the authors' temperatures: negative, infinite, NaN, or T_s < 2T/5
    for ratio, lo in ((4.0, 1.6), (None, 0.0)):
        temp_t, temp_s = dtkd_temperatures(s.amax(-1), t.amax(-1), 4.0, ratio)
        for temp in (temp_s.item(), temp_t.item()):
            assert lo - 1e-6 <= temp <= 8.0 - lo + 1e-6
        sg = s.clone().requires_grad_(True)
        out = create_loss("dtkd", max_temp_ratio=ratio)(sg, t, torch.tensor([0]), epoch=30)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(sg.grad).all()


def test_guard_clamps_to_the_ratio_band():
    t = torch.tensor([[10.0, 2.0, 0.0]])
    s = torch.tensor([[0.05, 0.0, -0.3]])
    _, ref_s = ref_dtkd_terms(s.double(), t.double(), 4.0)[1:]
    assert ref_s.item() == pytest.approx(8 * 0.05 / 10.05)  # the authors': 0.04
    temp_t, temp_s = dtkd_temperatures(s.amax(-1), t.amax(-1), 4.0)  # default ratio 4
    assert (temp_t.item(), temp_s.item()) == pytest.approx((6.4, 1.6))
    temp_t, temp_s = dtkd_temperatures(s.amax(-1), t.amax(-1), 4.0, max_temp_ratio=2.0)
    assert (temp_t.item(), temp_s.item()) == pytest.approx((16 / 3, 8 / 3))
    temp_t, temp_s = dtkd_temperatures(t.amax(-1), s.amax(-1), 4.0)  # roles swapped
    assert (temp_t.item(), temp_s.item()) == pytest.approx((1.6, 6.4))


def test_zero_logit_student_authors_nan_ours_finite():
    """A zero-initialised classifier head: x_s = 0 makes the authors' student temperature 0 (0/0)."""
    s, t, y = torch.zeros(4, 10), torch.randn(4, 10) * 5 + 5, torch.tensor([0, 1, 2, 3])
    assert torch.isnan(ref_dtkd_terms(s.double(), t.double(), 4.0)[0])
    for ratio in (4.0, None):
        out = create_loss("dtkd", max_temp_ratio=ratio, warmup_epochs=0)(s, t, y)
        assert torch.isfinite(out["loss"])


def test_warmup_scales_both_kd_terms_not_ce():
    s, t, y = positive_max_batch(8, 10, seed=10, dtype=torch.float32)
    loss = create_loss("dtkd")
    a, b = loss(s, t, y, epoch=10), loss(s, t, y, epoch=40)
    assert a["warmup"].item() == 0.5 and b["warmup"].item() == 1.0
    kd_part = 3 * b["dtkd"] + 1 * b["kd"]
    torch.testing.assert_close(a["loss"], 0.5 * kd_part + a["ce"])
    torch.testing.assert_close(b["loss"], kd_part + b["ce"])
    fractional = loss(s, t, y, epoch=2.5)["loss"]
    torch.testing.assert_close(fractional, 0.125 * kd_part + a["ce"])
    out = create_loss("dtkd", warmup_epochs=0)(s, t, y)  # no warm-up: no epoch needed
    torch.testing.assert_close(out["loss"], kd_part + out["ce"])


def test_missing_epoch_names_the_fix():
    s, t, y = positive_max_batch(2, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"warm-up of 20 epochs.*epoch=epoch.*warmup_epochs=0"):
        create_loss("dtkd")(s, t, y)


def test_logit_standardize_option():
    s, t, y = random_batch(8, 20, seed=11)
    out = create_loss("dtkd", logit_standardize=True, warmup_epochs=0)(s.float(), t.float(), y)
    z = lambda v: (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-7)  # noqa: E731
    assert out["dtkd"].item() == pytest.approx(ref_dtkd_terms(z(s), z(t), 4.0)[0].item(), abs=1e-5)
    assert out["kd"].item() == pytest.approx(ref_kd(z(s), z(t), 4.0).item(), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 0.0}, "tau must be a finite number > 0"),
        ({"tau": -4.0}, "Temperatures divide the logits"),
        ({"dtkd_weight": -3.0}, "dtkd_weight must be a finite number >= 0"),
        ({"kd_weight": -1.0}, "kd_weight"),
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"max_temp_ratio": 0.5}, "max_temp_ratio must be a finite number >= 1.*None for the authors'"),
        ({"max_temp_ratio": math.inf}, "max_temp_ratio must be a finite number"),
        ({"max_temp_ratio": 0.0}, "max_temp_ratio"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loss("dtkd", **kwargs)


def test_bad_inputs_fail_with_the_fix():
    loss = create_loss("dtkd")
    s, t, _ = positive_max_batch(3, 5, dtype=torch.float32)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss(s, t[:2], y, epoch=1)
    with pytest.raises(ValueError, match=r"label -1 is outside \[0, 5\)"):
        loss(s, t, torch.tensor([0, -1, 2]), epoch=1)
    with pytest.raises(FloatingPointError, match="student_logits contain NaN"):
        loss(s.clone().fill_(float("nan")), t, y, epoch=1)
    with pytest.raises(ValueError, match="epoch must be a finite number"):
        loss(s, t, y, epoch=float("nan"))


def _templates_data(num_classes: int = 10, size: int = 8, seed: int = 0):
    """Learnable synthetic images: one random template per class plus unit Gaussian noise."""
    templates = torch.randn(num_classes, 3, size, size, generator=torch.Generator().manual_seed(seed))

    def batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        return templates[y] + torch.randn(n, 3, size, size, generator=gen), y

    return batch


def _train_student(teacher, batch, loss_fn, steps: int = 80, lr: float = 0.05):
    """SGD (the authors' CIFAR lr and momentum) from a zero-initialised head; losses per step."""
    torch.manual_seed(10)
    student = timm.create_model("test_resnet", num_classes=10)
    torch.nn.init.zeros_(student.get_classifier().weight)  # fine-tuning style head init: x_s = 0
    torch.nn.init.zeros_(student.get_classifier().bias)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    gen, losses = torch.Generator().manual_seed(3), []
    for _ in range(steps):
        x, y = batch(64, gen)
        with torch.no_grad():
            t = teacher(x)
        loss = loss_fn(student(x), t, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    return student.eval(), losses


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and do not fight the other tests for cores)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.mark.slow
def test_short_schedule_from_a_fresh_student_authors_form_fails_guard_trains(one_thread):
    """A real run: timm students, a confident teacher (max logits ~27, like ImageNet models), no warm-up.

    The authors' temperatures give NaN at the first step (x_s = 0); floored but unguarded
    (max_temp_ratio=None) the loss stalls near its start and the student stays poor; the default
    guard trains to a low loss and high accuracy.
    """
    batch = _templates_data()
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=10)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        x, y = batch(64, gen)
        loss = torch.nn.functional.cross_entropy(teacher(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():  # a confident teacher: scale the trained head's logits by 3
        teacher.get_classifier().weight.mul_(3.0)
        teacher.get_classifier().bias.mul_(3.0)
    x_val, y_val = batch(256, torch.Generator().manual_seed(2))
    with torch.no_grad():
        t_val = teacher(x_val)
    assert (t_val.argmax(1) == y_val).float().mean() > 0.9 and t_val.amax(1).mean() > 15

    def accuracy(model):
        with torch.no_grad():
            return (model(x_val).argmax(1) == y_val).float().mean().item()

    def quarter_means(losses):
        q = len(losses) // 4
        return sum(losses[:q]) / q, sum(losses[-q:]) / q

    # the authors' formula (reference implementation in _losses_utils.py), warm-up factor 1
    _, authors = _train_student(teacher, batch, lambda s, t, y: ref_dtkd(s, t, y, epoch=1, warmup=1), steps=3)
    assert not math.isfinite(authors[0])

    runs = {}
    for ratio in (None, 4.0):
        loss_fn = create_loss("dtkd", warmup_epochs=0, max_temp_ratio=ratio)
        student, losses = _train_student(teacher, batch, lambda s, t, y, f=loss_fn: f(s, t, y)["loss"])
        runs[ratio] = (accuracy(student), *quarter_means(losses))
        acc, first, last = runs[ratio]
        print(f"max_temp_ratio={ratio}: accuracy {acc:.3f}, loss {first:.2f} -> {last:.2f} (quarters)")
    acc_guard, first_guard, last_guard = runs[4.0]
    acc_none, _, last_none = runs[None]
    assert all(math.isfinite(v) for v in runs[4.0] + runs[None])
    assert last_guard < 0.5 * first_guard and acc_guard > 0.6  # trains; chance is 0.1
    assert last_none > 2 * last_guard and acc_none < acc_guard - 0.2  # unguarded stalls
