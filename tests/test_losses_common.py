"""Properties every registered loss shares: the calling convention, float32 math, robust inputs.

Parametrized over ``list_losses()``, so a loss added to the registry is checked without editing
this file. Losses with a warm-up get ``epoch=5``; the others ignore it.
"""
import pytest
import torch

from timm_kd.losses import create_loss, list_losses

# Losses that other test modules register for their own purposes (names starting with "test_")
# are not part of the product and are left out.
LOSSES = [name for name in list_losses() if not name.startswith(("test_", "_test"))]
EPOCH = 5.0


def _batch(b: int = 6, c: int = 10, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g) * scale
    t = torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


def test_all_builtin_losses_are_covered():
    assert {"kd", "dtkd", "dkd", "dist", "lskd"} <= set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_key_backward_and_detached_terms(name):
    s, t, y = _batch()
    s.requires_grad_(True)
    t.requires_grad_(True)  # a teacher output that still carries a graph must not get a gradient
    out = create_loss(name)(s, t, y, epoch=EPOCH)
    assert isinstance(out, dict) and "loss" in out
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        assert torch.is_tensor(value), key
        if key != "loss":
            assert not value.requires_grad, f"{name}: term {key!r} must be detached"
    out["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", LOSSES)
def test_batch_of_one(name):
    s, t, y = _batch(b=1)
    s.requires_grad_(True)
    out = create_loss(name)(s, t, y, epoch=EPOCH)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_autocast_large_logits_finite_float32(name):
    """Logits as large as +-1e4 in bfloat16 under autocast: finite float32 loss and gradient."""
    s, t, y = _batch(b=8, c=20, seed=1)
    s = (s / s.abs().amax() * 1e4).bfloat16().requires_grad_(True)
    t = (t / t.abs().amax() * 1e4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = create_loss(name)(s, t, y, epoch=EPOCH)
    for key, value in out.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, f"{name}: {key} is {value.dtype}"
            assert torch.isfinite(value).all(), f"{name}: {key} = {value}"
    out["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


@pytest.mark.parametrize("name", LOSSES)
def test_float32_output_under_autocast_with_normal_logits(name):
    s, t, y = _batch(seed=2)
    lin = torch.nn.Linear(10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(s)  # a bfloat16 activation, as a model under autocast produces
        assert logits.dtype == torch.bfloat16
        out = create_loss(name)(logits, t.bfloat16(), y, epoch=EPOCH)
    assert out["loss"].dtype == torch.float32
    ref = create_loss(name)(logits.float(), t.bfloat16().float(), y, epoch=EPOCH)
    torch.testing.assert_close(out["loss"], ref["loss"])  # the same math as float32 inputs


@pytest.mark.parametrize("name", LOSSES)
def test_soft_targets(name):
    s, t, y = _batch(seed=3)
    lam = 0.7
    soft = lam * torch.nn.functional.one_hot(y, 10).float() + (1 - lam) * torch.nn.functional.one_hot(
        y.roll(1), 10
    ).float()  # a mixup target
    s.requires_grad_(True)
    out = create_loss(name)(s, t, soft, epoch=EPOCH)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="soft target shape"):
        create_loss(name)(s, t, soft[:, :9], epoch=EPOCH)


@pytest.mark.parametrize("name", LOSSES)
def test_bad_labels_named_with_the_fix(name):
    s, t, y = _batch()
    y[2] = 10
    with pytest.raises(ValueError, match=r"label 10 is outside \[0, 10\).*num_classes"):
        create_loss(name)(s, t, y, epoch=EPOCH)
    y[2] = -100
    with pytest.raises(ValueError, match="label -100 is outside.*ignore-index"):
        create_loss(name)(s, t, y, epoch=EPOCH)


@pytest.mark.parametrize("name", LOSSES)
def test_nan_and_shape_mismatch_named(name):
    s, t, y = _batch()
    bad = s.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="student_logits contain NaN or inf"):
        create_loss(name)(bad, t, y, epoch=EPOCH)
    bad = t.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="teacher_logits contain NaN or inf"):
        create_loss(name)(s, bad, y, epoch=EPOCH)
    with pytest.raises(ValueError, match="does not match student_logits"):
        create_loss(name)(s, t[:, :7], y, epoch=EPOCH)
