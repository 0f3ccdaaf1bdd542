"""``create_loss(name, compile=True)``: every registered loss traces whole under ``torch.compile`` and
gives the eager values and gradients; the epoch (a float that changes every step) compiles nothing new.

Each case compiles once or twice (a few seconds each on CPU, Inductor's C++ backend), so the cases
are few: hard labels over several epochs, then soft targets.
"""
import pytest
import torch
import torch._dynamo

from timm_kd.losses import CompiledLoss, compile_loss, create_loss, list_losses

LOSSES = [name for name in list_losses() if not name.startswith(("test_", "_test"))]


def _batch(b: int, c: int, seed: int, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g) * 3
    t = torch.randn(b, c, generator=g) * 3 + 1.0
    y = torch.softmax(torch.randn(b, c, generator=g), -1) if soft else torch.randint(0, c, (b,), generator=g)
    return s, t, y


def _value_and_grad(loss_fn, s, t, y, epoch):
    s = s.clone().requires_grad_(True)
    out = loss_fn(s, t, y, epoch=epoch)
    (1.5 * out["loss"]).backward()  # an upstream gradient other than 1 (as a loss scaler's)
    return {k: v.detach() for k, v in out.items()}, s.grad


@pytest.mark.parametrize("name", LOSSES)
def test_compiled_loss_matches_eager_without_recompiling_per_epoch(name):
    torch._dynamo.reset()
    eager = create_loss(name, check_inputs=False)
    compiled = create_loss(name, check_inputs=False, compile={"fullgraph": True})  # a graph break fails
    assert isinstance(compiled, CompiledLoss) and compiled.name == name
    counters = torch._dynamo.utils.counters
    counters.clear()
    # epochs inside and past the 20-epoch warm-ups of dkd and dtkd
    for i, epoch in enumerate((1.0, 2.5, 7.25, 40.0)):
        s, t, y = _batch(16, 12, seed=i)
        ref, ref_grad = _value_and_grad(eager, s, t, y, epoch)
        out, grad = _value_and_grad(compiled, s, t, y, epoch)
        assert out.keys() == ref.keys()
        for key in ref:
            msg = f"{name}: {key} at epoch {epoch}"
            torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6, msg=msg)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 1, f"{name}: the epoch recompiled the loss"
    s, t, y = _batch(16, 12, seed=9, soft=True)  # mixup targets: a second graph, same results
    ref, ref_grad = _value_and_grad(eager, s, t, y, 3.0)
    out, grad = _value_and_grad(compiled, s, t, y, 3.0)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_compiled_loss_keeps_the_eager_errors():
    """The epoch is checked before the graph, with the eager loss's message; a plug-in-style callable
    gets its epoch untouched; the original loss stays reachable for repr, state and attributes."""
    loss = compile_loss(create_loss("dkd", check_inputs=False))
    s, t, y = _batch(4, 5, seed=0)
    with pytest.raises(ValueError, match="dkd: epoch must be a finite number >= 0"):
        loss(s, t, y, epoch=float("nan"))
    assert loss.beta == 8.0 and "DKDLoss" in repr(loss) and loss.state_dict() == {}

    seen = []

    def plain(student_logits, teacher_logits, target, *, epoch=None):
        seen.append(epoch)
        return {"loss": student_logits.sum() * 0.0}

    wrapped = compile_loss(plain)
    wrapped(s, t, y, epoch=2.5)
    assert seen == [2.5] and wrapped.name == "plain" and not hasattr(wrapped, "beta")
