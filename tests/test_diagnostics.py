"""Teacher diagnostics: the ATS paper's wrong-class statistics, the Figure 7 sweep, τ suggestions."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from timm_kd import diagnostics as D
from timm_kd.losses import create_loss


def make_teacher(N, C, margin, noise, offset=0.0, seed=0):
    """Synthetic teacher logits: Gaussian wrong-class logits, the label's raised by ``margin``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (N,), generator=g)
    z = torch.randn(N, C, generator=g) * noise
    z[torch.arange(N), y] += margin
    return z + offset, y


def independent_stats(z, y, t1, t2):
    """Per-sample statistics with explicit per-class temperatures and masking, float64."""
    rows = {"derived_average": [], "derived_std": [], "derived_variance": [], "inherent_variance": []}
    for b in range(z.shape[0]):
        taus = torch.full((z.shape[1],), float(t2), dtype=torch.float64)
        taus[int(y[b])] = t1
        q = torch.softmax(z[b].double() / taus, dim=0)
        wrong = torch.cat([q[: int(y[b])], q[int(y[b]) + 1 :]])
        rows["derived_average"].append(wrong.mean())
        rows["derived_std"].append(wrong.std(unbiased=False))
        rows["derived_variance"].append(wrong.var(unbiased=False))
        rows["inherent_variance"].append((wrong / wrong.sum()).var(unbiased=False))
    return {k: torch.stack(v) for k, v in rows.items()}


@pytest.mark.parametrize("t1,t2", [(4.0, 2.0), (3.0, 3.0), (1.0, 5.0)])
def test_stats_match_independent_computation(t1, t2):
    z, y = make_teacher(40, 7, 4.0, 2.0)
    per = D.wrong_class_stats(z, y, t1, t2, reduction="none")
    ref = independent_stats(z, y, t1, t2)
    for k, v in ref.items():
        torch.testing.assert_close(per[k], v, rtol=1e-9, atol=1e-15)
    mean = D.wrong_class_stats(z, y, t1, t2)
    for k, v in ref.items():
        assert mean[k] == pytest.approx(float(v.mean()), rel=1e-9)
    assert (mean["num_samples"], mean["num_classes"]) == (40, 7)
    # e(q) = (1 - q_y) / (C - 1)
    torch.testing.assert_close(per["derived_average"], (1 - per["label_prob"]) / 6)


@pytest.mark.parametrize("t1,t2", [(4.0, 2.0), (2.0, 2.0), (6.0, 1.0), (0.5, 3.0)])
def test_variance_identity(t1, t2):
    """v(q) = (1 - q_y)^2 · v(q̃), q̃ the renormalised wrong-class probabilities (computed apart)."""
    z, y = make_teacher(300, 100, 8.0, 2.0)
    per = D.wrong_class_stats(z, y, t1, t2, reduction="none")
    lhs = per["derived_variance"]
    wrong_mass = per["derived_average"] * 99  # 1 - q_y, without the rounding of 1 - q_y near q_y = 1
    rhs = wrong_mass**2 * per["inherent_variance"]
    torch.testing.assert_close(lhs, rhs, rtol=1e-8, atol=1e-18)


def test_derived_average_rises_with_tau_correct_and_inherent_variance_depends_on_tau_wrong_only():
    z, y = make_teacher(200, 50, 10.0, 1.5)
    assert bool((z[torch.arange(200), y] > 0).all())  # positive label logits, the usual case
    per = [D.wrong_class_stats(z, y, t1, 2.0, reduction="none") for t1 in (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)]
    for lo, hi in zip(per, per[1:]):
        assert bool((hi["derived_average"] > lo["derived_average"]).all())
        # q̃ depends on τ2 only; the default float64 atol (1e-7) would hide values of order 1e-4
        torch.testing.assert_close(hi["inherent_variance"], lo["inherent_variance"], rtol=1e-12, atol=0)


def test_plain_ts_is_equal_temperatures():
    z, y = make_teacher(100, 20, 6.0, 2.0)
    tau = 3.0
    ts = D.wrong_class_stats(z, y, tau, tau, reduction="none")
    q = torch.softmax(z.double() / tau, dim=-1)
    mask = torch.ones_like(q, dtype=torch.bool)
    mask[torch.arange(100), y] = False
    wrong = q[mask].view(100, 19)
    torch.testing.assert_close(ts["derived_std"], wrong.std(dim=1, unbiased=False))
    torch.testing.assert_close(ts["label_prob"], q[torch.arange(100), y])
    assert float(ts["induced_flip"].sum()) == 0  # TS never reorders classes
    torch.testing.assert_close(ts["target_flip"], 1 - ts["teacher_correct"])


def test_soft_targets_use_argmax_and_inputs_are_checked():
    z, y = make_teacher(30, 10, 5.0, 1.0)
    soft = 0.8 * torch.nn.functional.one_hot(y, 10) + 0.2 / 10
    assert D.wrong_class_stats(z, soft, 4, 2) == D.wrong_class_stats(z, y, 4, 2)
    with pytest.raises(ValueError, match="tau_wrong"):
        D.wrong_class_stats(z, y, 4.0, 0.0)
    with pytest.raises(ValueError, match="tau_correct"):
        D.wrong_class_stats(z, y, -1.0, 2.0)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        D.wrong_class_stats(z, torch.full((30,), 10), 4.0, 2.0)
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contain NaN"):
        D.wrong_class_stats(bad, y, 4.0, 2.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        D.wrong_class_stats(z[0], y, 4.0, 2.0)
    with pytest.raises(ValueError, match="target has 29 labels"):
        D.wrong_class_stats(z, y[:29], 4.0, 2.0)
    # chunking does not change the result
    assert D.wrong_class_stats(z, y, 4, 2, chunk_size=7) == pytest.approx(D.wrong_class_stats(z, y, 4, 2))


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_sweep_table_and_png(tmp_path):
    small = make_teacher(400, 50, 4.0, 1.0, seed=1)
    large = make_teacher(400, 50, 14.0, 2.0, seed=2)
    taus = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    rows = D.temperature_sweep(*small, taus, name="small")
    png = tmp_path / "fig7.png"
    rows += D.temperature_sweep(*large, taus, name="large", plot_path=png)
    assert len(rows) == 4 * len(taus)
    for r in rows:
        if r["method"] == "TS":
            assert r["tau_correct"] == r["tau_wrong"] == r["tau"]
        else:
            assert (r["tau_correct"], r["tau_wrong"]) == pytest.approx((1.25 * r["tau"], 0.75 * r["tau"]))
    table = D.format_sweep_table(rows)
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2 and "derived_std" in lines[0] and "large" in table
    # the single-teacher plot written by temperature_sweep, then both teachers side by side
    assert png.stat().st_size > 10_000
    width, height = _png_size(png)
    assert width > 300 and height > 200
    both = D.plot_temperature_sweep(rows, tmp_path / "both.png", title="TS vs ATS")
    assert _png_size(both)[0] > 1.5 * width  # four panels instead of two


def test_ats_spreads_wrong_classes_more_than_ts_on_a_confident_teacher():
    """The paper's point (Figure 7): on a confident teacher, ATS gives a higher e(q) and σ(q) than
    TS at the same base temperature, without reordering classes at these temperatures."""
    rows = D.temperature_sweep(*make_teacher(400, 100, 16.0, 1.5), (1.0, 2.0, 4.0))
    ts = [r for r in rows if r["method"] == "TS"]
    ats = [r for r in rows if r["method"] == "ATS"]
    for a, t in zip(ats, ts):
        assert a["derived_std"] > t["derived_std"] and a["derived_average"] > t["derived_average"]
        assert a["induced_flip"] == 0


def test_suggestion_scales_with_the_teacher_logits():
    z, y = make_teacher(800, 100, 12.0, 1.0)
    s1 = D.suggest_ats_temperatures(z, y)
    s3 = D.suggest_ats_temperatures(3 * z, y)
    assert s1.label_prob == pytest.approx(0.5, abs=0.01)
    assert s3.tau_correct == pytest.approx(3 * s1.tau_correct, rel=0.01)
    assert s3.tau_wrong / s3.tau_correct == pytest.approx(s1.tau_wrong / s1.tau_correct, rel=0.01)
    # asymmetry helps this teacher and keeps its labels on top
    assert s1.tau_wrong < s1.tau_correct
    assert s1.induced_flip <= 0.01 and s1.derived_std_ats > s1.derived_std_ts
    tau_correct, tau_wrong = s1  # unpacks as a pair
    stats = D.wrong_class_stats(z, y, tau_correct, tau_wrong)
    assert stats["induced_flip"] == pytest.approx(s1.induced_flip)
    assert "tau_correct=" in s1.reason and "tau_wrong=" in s1.reason
    loss = create_loss("ats", **s1.as_kwargs())
    assert (loss.tau_correct, loss.tau_wrong) == (tau_correct, tau_wrong)


def test_sharp_teacher_gets_hotter_label_and_keeps_label_argmax():
    sharp = make_teacher(800, 100, 36.0, 3.0, seed=3)
    soft = make_teacher(800, 100, 3.0, 1.0, seed=4)
    s_sharp = D.suggest_ats_temperatures(*sharp)
    s_soft = D.suggest_ats_temperatures(*soft)
    assert s_sharp.tau_correct > 2 * s_soft.tau_correct
    for s, (z, y) in ((s_sharp, sharp), (s_soft, soft)):
        st = D.wrong_class_stats(z, y, s.tau_correct, s.tau_wrong)
        # among samples whose teacher logits rank the label first, the target does too
        assert st["induced_flip"] <= 0.01
    # the authors' fixed (4, 3) flips many of the soft teacher's targets; the suggestion falls back to TS
    assert D.wrong_class_stats(*soft, 4.0, 3.0)["induced_flip"] > 0.1
    assert s_soft.tau_wrong == s_soft.tau_correct and "plain TS" in s_soft.reason


def test_suggestion_adapts_to_a_logit_offset():
    """ATS is not shift-invariant: a large positive offset brings z_k / z_y near 1, and fixed
    (4, 3) then flips almost every target; the suggestion keeps flips under 1 %."""
    z, y = make_teacher(800, 100, 12.0, 1.0, offset=40.0)
    assert D.wrong_class_stats(z, y, 4.0, 3.0)["induced_flip"] > 0.5
    s = D.suggest_ats_temperatures(z, y)
    assert s.induced_flip <= 0.01
    assert D.wrong_class_stats(z, y, s.tau_correct, s.tau_wrong)["induced_flip"] <= 0.01
    assert s.tau_wrong / s.tau_correct > D.suggest_ats_temperatures(z - 40.0, y).tau_wrong / s.tau_correct


def test_suggestion_bad_input():
    z, y = make_teacher(50, 10, 5.0, 1.0)
    with pytest.raises(ValueError, match="label_prob"):
        D.suggest_ats_temperatures(z, y, label_prob=0.05)
    with pytest.raises(ValueError, match="tau_range"):
        D.suggest_ats_temperatures(z, y, tau_range=(8.0, 2.0))
    with pytest.raises(ValueError, match="min_ratio"):
        D.suggest_ats_temperatures(z, y, min_ratio=0.0)
    with pytest.raises(ValueError, match="max_flip_rate"):
        D.suggest_ats_temperatures(z, y, max_flip_rate=1.5)
    # a subsample is drawn reproducibly when N > max_samples
    a = D.suggest_ats_temperatures(z, y, max_samples=20, seed=1)
    b = D.suggest_ats_temperatures(z, y, max_samples=20, seed=1)
    assert (a.tau_correct, a.tau_wrong) == (b.tau_correct, b.tau_wrong)
    assert math.isfinite(a.label_prob)


def test_suggestion_refuses_a_teacher_at_chance():
    """A teacher whose logits ignore the labels (wrong class map, untrained weights) gets no
    suggestion: the error names the accuracy against chance; ``check_teacher=False`` overrides."""
    z, _ = make_teacher(2000, 100, 12.0, 1.0)
    shuffled = torch.randint(0, 100, (2000,), generator=torch.Generator().manual_seed(5))
    assert D.uninformative_teacher(z, shuffled) is not None
    with pytest.raises(D.TeacherAtChanceError, match=r"not clearly above chance \(1.00 %") as e:
        D.suggest_ats_temperatures(z, shuffled)
    assert isinstance(e.value, ValueError) and "check_teacher=False" in str(e.value)
    s = D.suggest_ats_temperatures(z, shuffled, check_teacher=False)
    assert math.isfinite(s.tau_correct)


def test_suggestion_refuses_near_uniform_logits():
    """Constant logits tie every class with the label (so ``teacher_correct`` is 1 everywhere) and
    tiny logits are all but flat: both are refused as carrying no information."""
    z, y = make_teacher(1000, 10, 5.0, 1.0)
    assert D.uninformative_teacher(z, y) is None  # a trained teacher passes both tests
    assert D.wrong_class_stats(torch.zeros_like(z), y, 4.0, 3.0)["teacher_correct"] == 1.0
    with pytest.raises(D.TeacherAtChanceError, match="chance"):
        D.suggest_ats_temperatures(torch.zeros_like(z), y)
    with pytest.raises(D.TeacherAtChanceError, match="near-uniform"):
        D.suggest_ats_temperatures(z * 1e-3, y)
    # the binary case keeps a usable bound (twice chance would be 100 %)
    z2, y2 = make_teacher(1000, 2, 2.0, 1.0)
    assert D.uninformative_teacher(z2, y2) is None
