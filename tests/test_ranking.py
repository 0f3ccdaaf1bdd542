"""Ranking candidate teachers (``timm_kd.ranking``, ``timm-kd rank-teachers``) and the engine's teacher
calibration check (``timm_kd.engine.teacher_check``).

Statistics against hand-computed cases, the score on synthetic teachers whose order is known, the
command end to end on tiny random models saved as folders (nothing is downloaded), and a tiny
``fit`` whose teacher check reports calibration and flags an over-confident teacher.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from _engine_utils import TINY_CONFIG
from _wrapper_utils import tiny
from safetensors.torch import save_file

import timm_kd
from timm_kd import cli, engine, ranking
from timm_kd.diagnostics import uninformative_teacher
from timm_kd.engine import teacher_check

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# expected calibration error


def _rows(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log-probabilities), float64."""
    return torch.tensor(probs, dtype=torch.float64).log()


#: five samples over 3 classes: top-1 confidences .9 (right), .8 (wrong), .45 (right), .6 (right),
#: .4 (wrong)
ECE_PROBS = [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.45, 0.35, 0.2], [0.6, 0.2, 0.2], [0.4, 0.35, 0.25]]
ECE_LABELS = torch.tensor([0, 1, 0, 0, 2])


@pytest.mark.parametrize(
    "num_bins, want",
    [
        # bins (1/3, 2/3] and (2/3, 1]: |2/3 - 1.45/3| * 3/5 + |1/2 - .85| * 2/5 = .11 + .14
        (3, 0.25),
        # bins (0, .5] and (.5, 1]: |1/2 - .425| * 2/5 + |2/3 - 2.3/3| * 3/5 = .03 + .06
        (2, 0.09),
        # one bin: |3/5 - 3.15/5|
        (1, 0.03),
    ],
)
def test_ece_matches_a_hand_computed_case(num_bins, want):
    got = ranking.expected_calibration_error(_rows(ECE_PROBS), ECE_LABELS, num_bins=num_bins)
    assert got == pytest.approx(want, abs=1e-12)
    # float32 logits give the same
    assert ranking.expected_calibration_error(
        _rows(ECE_PROBS).float(), ECE_LABELS, num_bins
    ) == pytest.approx(want, abs=1e-6)


def test_ece_of_a_perfectly_calibrated_teacher_is_zero():
    # confidence .75 everywhere, right on 3 of 4 samples: every bin's accuracy is its confidence
    logits = _rows([[0.75, 0.125, 0.125]] * 4)
    for bins in (1, 3, 15):
        assert ranking.expected_calibration_error(logits, torch.tensor([0, 0, 0, 1]), bins) == pytest.approx(
            0.0, abs=1e-12
        )
    with pytest.raises(ValueError, match="num_bins"):
        ranking.expected_calibration_error(logits, torch.tensor([0, 0, 0, 1]), 0)


# --------------------------------------------------------------------------------------------------
# dark knowledge


def _kl_to_label_smoothing(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(q || s)`` row by row in float64, ``s`` keeping ``q_y`` and spreading the rest evenly."""
    out = []
    for zi, yi in zip(z.double(), y.tolist()):
        q = torch.softmax(zi / tau, dim=0)
        s = torch.full_like(q, float(1 - q[yi]) / (len(q) - 1))
        s[yi] = q[yi]
        out.append((q * (q / s).log()).sum())
    return torch.stack(out)


def test_dark_knowledge_limits():
    C, N = 10, 6
    y = torch.arange(N) % C
    # near one-hot targets (a huge margin): no wrong-class mass, nothing beyond cross-entropy
    z = torch.randn(N, C)
    z[torch.arange(N), y] += 400.0
    assert float(ranking.dark_knowledge(z, y).max()) < 1e-9
    # label-smoothing-like (label high, every other class equal): no wrong-class structure
    z = torch.zeros(N, C)
    z[torch.arange(N), y] = 5.0
    assert float(ranking.dark_knowledge(z, y).abs().max()) < 1e-12
    # structure, but the teacher's argmax is not the label: counts zero
    z = torch.randn(N, C)
    z[torch.arange(N), (y + 1) % C] += 8.0
    assert torch.equal(ranking.dark_knowledge(z, y), torch.zeros(N, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 3 classes"):
        ranking.dark_knowledge(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="tau"):
        ranking.dark_knowledge(z, y, tau=0.0)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dark_knowledge_is_kl_to_the_label_smoothing_projection(tau):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40, 7, generator=g) * 3
    y = z.argmax(dim=-1)  # right everywhere: the formula applies to every row
    got = ranking.dark_knowledge(z, y, tau, chunk_size=16)  # chunks agree with the whole
    want = _kl_to_label_smoothing(z, y, tau)
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
    assert float(got.min()) > 0


# --------------------------------------------------------------------------------------------------
# the score on synthetic teachers whose order is known


def _structured(n: int = 600, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher that knows which classes look alike: each label's two neighbours get a high logit,
    the label a higher one (so it is right), small noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    z = torch.randn(n, num_classes, generator=g) * 0.3
    rows = torch.arange(n)
    z[rows, y] += 6.0
    z[rows, (y + 1) % num_classes] += 3.0
    z[rows, (y - 1) % num_classes] += 3.0
    return z, y


def _teacher(train_logits, train_target, heldout_logits=None, heldout_target=None) -> dict:
    return {
        "train_logits": train_logits,
        "train_target": train_target,
        "heldout_logits": train_logits if heldout_logits is None else heldout_logits,
        "heldout_target": train_target if heldout_target is None else heldout_target,
    }


def _score(candidate: dict) -> float:
    return ranking.teacher_statistics(
        candidate["train_logits"],
        candidate["train_target"],
        candidate["heldout_logits"],
        candidate["heldout_target"],
    )["score"]


def test_a_memorising_teacher_scores_below_a_moderate_one():
    """The same logits, scaled: near one-hot targets on the training images. Even with a better
    held-out top-1 (the naive rule's pick) the memorising teacher scores lower."""
    z, y = _structured()
    zh, yh = _structured(seed=1)
    zh_worse = zh.clone()
    zh_worse[:60] = zh_worse[:60].roll(1, dims=1)  # 10 % of the held-out images now wrong
    moderate = _teacher(z, y, zh_worse, yh)
    memorising = _teacher(z * 20, y, zh, yh)
    s_moderate, s_memorising = _score(moderate), _score(memorising)
    assert s_moderate > 0.02 and s_memorising < 1e-3 * s_moderate
    rows = ranking.rank_teachers({"memorising": memorising, "moderate": moderate})
    assert [r["name"] for r in rows] == ["moderate", "memorising"]
    assert rows[1]["heldout_top1"] > rows[0]["heldout_top1"]  # more accurate, ranked second


def test_a_label_smoothed_teacher_scores_below_a_structured_one_with_the_same_label_mass():
    tau = ranking.TEACHER_STATS_TAU
    z, y = _structured()
    q_y = torch.softmax(z.double() / tau, dim=-1)[torch.arange(len(y)), y]
    C = z.shape[1]
    smoothed = torch.zeros_like(z, dtype=torch.float64)
    # label logit L with e^(L/τ) / (e^(L/τ) + C - 1) = q_y: the same label mass, wrong classes uniform
    smoothed[torch.arange(len(y)), y] = tau * torch.log(q_y * (C - 1) / (1 - q_y))
    q_s = torch.softmax(smoothed / tau, dim=-1)[torch.arange(len(y)), y]
    assert torch.allclose(q_s, q_y, atol=1e-12)
    stats = ranking.teacher_statistics(smoothed, y, smoothed, y)
    assert stats["score"] == pytest.approx(0.0, abs=1e-12)
    assert _score(_teacher(z, y)) > 0.02


def test_a_teacher_wrong_on_held_out_images_scores_lower():
    z, y = _structured()
    zh, yh = _structured(seed=1)
    wrong = zh.clone()
    wrong[: len(yh) // 2] = wrong[: len(yh) // 2].roll(3, dims=1)  # half the held-out images wrong
    good, bad = _score(_teacher(z, y, zh, yh)), _score(_teacher(z, y, wrong, yh))
    assert bad == pytest.approx(good / 2, rel=0.05)
    assert [
        r["name"]
        for r in ranking.rank_teachers({"bad": _teacher(z, y, wrong, yh), "good": _teacher(z, y, zh, yh)})
    ] == [
        "good",
        "bad",
    ]


# --------------------------------------------------------------------------------------------------
# spearman, rank_teachers


def test_spearman_against_hand_values():
    assert ranking.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert ranking.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert ranking.spearman([10, 20, 30], [1, 5, 100]) == pytest.approx(1.0)  # ranks, not values
    # ties share their average rank: x ranks (1, 2.5, 2.5, 4), Pearson r with (1, 2, 3, 4) = sqrt(0.9)
    assert ranking.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert math.isnan(ranking.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        ranking.spearman([1, 2], [1, 2, 3])


def test_rank_teachers_rows_ranks_and_a_teacher_at_chance():
    z, y = _structured()
    g = torch.Generator().manual_seed(3)
    random_logits = torch.randn(len(y), z.shape[1], generator=g)
    # at tau 4 the structured teacher's neighbours hold little mass; sharper logits (x3) move more of it
    # onto them, and the score, which is not monotonic in the logit scale, rises
    candidates = {
        "random": _teacher(random_logits, y),
        "structured": _teacher(z, y),
        "sharper": _teacher(z * 3, y),
    }
    rows = ranking.rank_teachers(candidates)
    assert [r["name"] for r in rows] == ["sharper", "structured", "random"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    by_name = {r["name"]: r for r in rows}
    assert (
        by_name["random"]["method"] == "none" and "no class information" in by_name["random"]["method_reason"]
    )
    for r in rows[:2]:  # the method follows the dark knowledge (LOW_DARK_KNOWLEDGE nats)
        assert r["method"] == ("dtkd" if r["dark_knowledge"] >= ranking.LOW_DARK_KNOWLEDGE else "kd"), r
    # a label-smoothed teacher (the label high, every other class equal) has none: plain kd
    smoothed = torch.full((len(y), z.shape[1]), 0.0).scatter(1, y.unsqueeze(1), 5.0)
    assert ranking.suggest_method(smoothed, y, ranking.teacher_statistics(smoothed, y))["method"] == "kd"
    keys = {"heldout_ece", "heldout_nll", "dark_knowledge", "train_max_prob", "wrong_std", "method_kwargs"}
    assert keys <= set(rows[0])
    table = ranking.format_ranking_table(rows)
    assert table.splitlines()[0].startswith("| rank | teacher | score |") and len(table.splitlines()) == 5
    with pytest.raises(ValueError, match="missing"):
        ranking.rank_teachers({"x": {"train_logits": z, "train_target": y}})


# --------------------------------------------------------------------------------------------------
# timm-kd rank-teachers end to end

#: the embedded dataset, small
DATA = ["--dataset", "embedded", "--embedded-arg", "num_train=96", "--embedded-arg", "num_test=48"]
DATA += ["--input-size", "32", "--num-workers", "0", "--num-samples", "64", "--num-heldout", "40"]


def test_rank_teachers_end_to_end(tmp_path, capsys):
    """Three tiny random 100-class teachers given three ways: a local-dir: folder, a run folder (its
    student/) and ARCH=WEIGHTS. The table, one line per teacher with the flags to train with, the
    JSON record and the plot."""
    folder = timm_kd.save_pretrained(tiny("test_resnet", num_classes=100), tmp_path / "a")
    timm_kd.save_pretrained(tiny("test_efficientnet", num_classes=100), tmp_path / "run" / "student")
    weights = tmp_path / "c.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=100).state_dict(), str(weights))
    teachers = [f"local-dir:{folder}", str(tmp_path / "run"), f"test_resnet={weights}"]
    out = tmp_path / "rank"
    argv = ["rank-teachers", "--teachers", *teachers, *DATA, "--output-dir", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "| rank | teacher | score | held-out top-1 % | ECE |" in text
    lines = [line.split(". ", 1)[-1] for line in text.splitlines()]
    for name in teachers:  # random teachers: train the student alone
        assert any(line.startswith(f"{name}: none: the teacher carries no class") for line in lines)
    assert text.count("train with: --method ce") == 3
    assert f"plot: {out / 'rank_teachers.png'}" in text and f"record: {out / 'rank_teachers.json'}" in text
    record = json.loads((out / "rank_teachers.json").read_text())
    assert {"dataset", "split", "heldout_split", "num_samples", "num_heldout", "tau", "score", "rows"} <= set(
        record
    )
    assert record["split"] == "train" and record["heldout_split"] == "validation" and record["tau"] == 4.0
    assert "dark_knowledge" in record["score"] and record["teachers"] == teachers
    rows = {r["name"]: r for r in record["rows"]}
    assert sorted(r["rank"] for r in rows.values()) == [1, 2, 3]
    assert all(r["num_train"] == 64 and r["num_heldout"] == 40 for r in rows.values())
    assert rows[str(tmp_path / "run")]["teacher"] == f"local-dir:{tmp_path / 'run' / 'student'}"
    assert rows[teachers[2]]["teacher"] == "test_resnet" and rows[teachers[2]]["teacher_checkpoint"] == str(
        weights
    )
    assert (out / "rank_teachers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "teachers, words",
    [
        (["test_resnet", "resnet_999"], ["unknown teacher model 'resnet_999'"]),
        (["test_resnet=/no/such.safetensors"], ["/no/such.safetensors", "no such file"]),
        (["test_resnet", "test_resnet"], ["'test_resnet' is given twice"]),
    ],
)
def test_rank_teachers_bad_candidate_is_one_line_before_any_data(tmp_path, capsys, teachers, words):
    argv = ["rank-teachers", "--teachers", *teachers, "--dataset", "/no/such/dataset"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-kd rank-teachers: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_rank_teachers_refuses_teacher_and_a_shared_checkpoint(tmp_path, capsys):
    assert cli.main(["rank-teachers", "--teachers", "test_resnet", "--teacher", "test_resnet"]) == 2
    assert "drop --teacher" in capsys.readouterr().err
    argv = [
        "rank-teachers",
        "--teachers",
        "test_resnet",
        "--teacher-checkpoint",
        str(tmp_path / "w.safetensors"),
    ]
    assert cli.main(argv) == 2
    assert "ARCH=FILE" in capsys.readouterr().err


def test_rank_teachers_help_imports_no_torch():
    code = (
        "import sys\nfrom timm_kd.cli import build_parser\n"
        "try:\n    build_parser(['rank-teachers', '--help']).parse_args(['rank-teachers', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'timm', 'datasets') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--teachers TEACHER [TEACHER ...]" in res.stdout and "HEAVY []" in res.stdout


# --------------------------------------------------------------------------------------------------
# the engine's teacher check: calibration, dark knowledge


def test_teacher_calibration_and_the_poor_teacher_warning():
    logits, labels = _rows(ECE_PROBS), ECE_LABELS
    stats = teacher_check.teacher_sample_stats(logits, labels)
    cal = teacher_check.teacher_calibration(stats)
    conf, pred = logits.float().softmax(dim=-1).max(dim=-1)  # the engine's float32 (0.6 crosses an edge)
    assert cal["ece"] == pytest.approx(100 * ranking.calibration_error(conf, pred == labels), abs=1e-4)
    assert cal["mean_confidence"] == pytest.approx(100 * (0.9 + 0.8 + 0.45 + 0.6 + 0.4) / 5, abs=1e-4)
    assert cal["dark_knowledge"] == pytest.approx(
        float(ranking.dark_knowledge(logits, labels).mean()), rel=1e-6
    )
    nan = {"confidence": torch.full((2,), float("nan")), "correct": torch.ones(2)}
    assert teacher_check.teacher_calibration(nan) == {}
    assert "dark_knowledge" not in teacher_sample_two_classes()

    poor = {"top1": 80.0, "mean_confidence": 69.0, "ece": 11.0, "dark_knowledge": 0.03}
    for method in ("kd", "dist", "dkd", "ats", "isats", "dtkd", "lskd", "my_plugin_loss"):
        msg = teacher_check.poor_teacher_warning("t", poor, method)
        assert msg is not None and "dark knowledge" in msg and "timm-kd rank-teachers" in msg
        assert "docs/capacity_study.md" in msg and "0.030 nats" in msg
    assert teacher_check.poor_teacher_warning("t", poor, "ce") is None  # no teacher in the loss
    assert teacher_check.poor_teacher_warning("t", {**poor, "dark_knowledge": 0.4}, "kd") is None
    assert teacher_check.poor_teacher_warning("t", {"top1": 60.0}, "kd") is None  # a cached teacher


def teacher_sample_two_classes():
    return teacher_check.teacher_sample_stats(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))


def test_chance_bound_agrees_with_diagnostics():
    """The engine's chance test is diagnostics.uninformative_teacher's: 2 classes are no longer
    always at chance."""
    assert not engine.teacher_is_at_chance(90.0, 2, 1000)
    assert engine.teacher_is_at_chance(60.0, 2, 1000)
    g = torch.Generator().manual_seed(0)
    for C, N, k in [
        (2, 1000, 640),
        (2, 1000, 600),
        (3, 200, 110),
        (3, 200, 90),
        (100, 2000, 41),
        (100, 64, 3),
    ]:
        y = torch.randint(0, C, (N,), generator=g)
        z = torch.randn(N, C, generator=g)
        right = torch.arange(N) < k
        z[right, y[right]] += 100.0  # right on exactly k samples
        z[~right, (y[~right] + 1) % C] += 100.0
        at_chance = uninformative_teacher(z, y) is not None
        assert engine.teacher_is_at_chance(100 * k / N, C, N) == at_chance, (C, N, k)


class _Scaled(torch.nn.Module):
    """A teacher whose logits are multiplied: huge scale, confident everywhere."""

    def __init__(self, model: torch.nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


@pytest.mark.parametrize("scale, warns", [(1000.0, True)])
def test_fit_logs_teacher_calibration_and_flags_a_poor_teacher(tmp_path, capsys, monkeypatch, scale, warns):
    """The tiny random teacher is at chance, so the chance test is told otherwise here: what is
    checked is that the calibration and dark knowledge are measured, logged, recorded, and warned
    about (a one-hot teacher has none; the case without a warning is the unit test above)."""
    monkeypatch.setattr(teacher_check, "teacher_is_at_chance", lambda *a: False)
    teacher = _Scaled(timm.create_model("test_resnet", num_classes=100), scale)
    config = engine.TrainConfig(
        **{**TINY_CONFIG, "embedded_kwargs": {"num_train": 16, "num_test": 24}},
        method="kd",
        max_train_steps=1,
        output_dir=str(tmp_path / "run"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.fit(config, teacher=teacher)
    out = capsys.readouterr().out
    m = result.teacher_metrics
    assert {"top1", "ece", "mean_confidence", "dark_knowledge", "num_samples"} <= set(m) and m[
        "num_samples"
    ] == 24
    assert (
        f"ECE {m['ece']:.1f} % (mean confidence {m['mean_confidence']:.1f} %, accuracy {m['top1']:.1f} %)"
        in out
    )
    assert (
        json.loads((tmp_path / "run" / "run_summary.json").read_text())["teacher_metrics"]["ece"] == m["ece"]
    )
    assert f"dark knowledge {m['dark_knowledge']:.3f} nats at tau 4" in out
    flagged = [str(w.message) for w in caught if "little dark knowledge" in str(w.message)]
    assert len(flagged) == int(warns) and out.count("WARNING: teacher") == int(warns)
    if warns:
        assert m["mean_confidence"] > 99 and m["ece"] > 90
