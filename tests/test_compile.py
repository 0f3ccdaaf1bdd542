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


def test_compiled_exps_equal_exp():
    """The compiled row loops' exps: ``compiled_exp`` (exp2 with log2 e folded into the scale) and
    ``unit_exp`` (exp(d) as exp(d / T) ** T for whole T <= 8, else compiled_exp) equal ``exp`` on
    ``d <= 0`` down to float32's smallest normal numbers, and give 0 (not inf or NaN) far below."""
    from timm_kd.losses._fused import compiled_exp, unit_exp

    taus = (1.0, 2.0, 3.0, 4.0, 8.0, 2.5, 9.0)

    def exps(d):
        return torch.stack([unit_exp(d, compiled_exp(d, 1.0 / tau), tau) for tau in taus])

    d = -torch.linspace(0.0, 80.0, 4000).reshape(2, -1)
    out = torch.compile(exps, fullgraph=True)(d)
    # error: ~T ulp from the powers, |x| 2^-24 from the scaled argument (5e-6 at T = 8, d = -80)
    torch.testing.assert_close(out, d.exp().expand_as(out), rtol=1e-5, atol=0.0)
    far = torch.compile(exps, fullgraph=True)(torch.full((1, 16), -200.0))
    assert torch.all(far >= 0) and torch.all(far < 1e-37)


@pytest.mark.parametrize(
    ("name", "kwargs"), [("kd", {"tau": 2.5}), ("dtkd", {"tau": 3.5, "warmup_epochs": 0})]
)
def test_compiled_loss_matches_eager_at_a_fractional_temperature(name, kwargs):
    """At a non-integer temperature the compiled losses take exp(d) without the power shortcut."""
    torch._dynamo.reset()
    eager = create_loss(name, check_inputs=False, **kwargs)
    compiled = create_loss(name, check_inputs=False, compile={"fullgraph": True}, **kwargs)
    s, t, y = _batch(16, 12, seed=3)
    ref, ref_grad = _value_and_grad(eager, s, t, y, None)
    out, grad = _value_and_grad(compiled, s, t, y, None)
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_cpu_compile_options_reach_torch_compile_only_where_they_apply():
    """A loss's ``cpu_compile_options`` (DTKD's Inductor realization threshold) go to
    ``torch.compile`` for CPU logits only, under the caller's own options, and not at all with a
    ``mode`` or another backend (torch.compile refuses options with a mode); options this torch's
    Inductor does not have are dropped instead of failing the compile."""
    loss = create_loss("dtkd", compile=True)
    assert loss.compile_kwargs_for("cpu") == {"options": {"realize_reads_threshold": 2}}
    assert loss.compile_kwargs_for("cuda") == {}
    mine = create_loss("dtkd", compile={"options": {"realize_reads_threshold": 3, "trace.enabled": False}})
    assert mine.compile_kwargs_for("cpu")["options"] == {"realize_reads_threshold": 3, "trace.enabled": False}
    for other in ({"mode": "max-autotune-no-cudagraphs"}, {"backend": "aot_eager"}):
        assert create_loss("dtkd", compile=other).compile_kwargs_for("cpu") == other
    assert create_loss("kd", compile=True).compile_kwargs_for("cpu") == {}  # no options of its own
    loss.loss_fn.cpu_compile_options = {"no_such_inductor_option": 1}  # an option a later torch dropped
    assert loss.compile_kwargs_for("cpu") == {}
    s, t, y = _batch(4, 6, seed=3)
    loss(s.requires_grad_(True), t, y, epoch=30.0)["loss"].backward()  # and it compiles and runs
    assert s.grad is not None and torch.isfinite(s.grad).all()
