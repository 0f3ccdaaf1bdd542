"""recipes/capacity_study.py --quick under two real gloo processes: ladders, statistics, tuning on
held-out images only, paired report, the ranking check, caching and resume."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import timm
from _engine_utils import RECIPES, launch, output, subprocess_env

STUDY = RECIPES / "capacity_study.py"
METHODS = ["kd", "dtkd"]
PNG = b"\x89PNG\r\n\x1a\n"


def _recipe():
    spec = importlib.util.spec_from_file_location("capacity_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_study_reports_ladders_tuning_pairs_and_ranking_and_resumes(tmp_path):
    out = tmp_path / "study"
    argv = [
        "--quick",
        "--ladders",
        "schedule",
        "size",
        "--methods",
        "alone",
        *METHODS,
        "--output-dir",
        str(out),
    ]
    res = launch(tmp_path, STUDY, argv, timeout=300)
    assert res.returncode == 0, output(res)
    log = res.stdout + res.stderr
    assert "estimate:" in log and "[rank 0]" in log and "[rank 1]" in log  # both processes trained cells
    assert "ladder schedule: test top-1" in log and "ladder size: test top-1" in log

    record = json.loads((out / "results.json").read_text())
    # the schedule ladder (1, 2, 3 epochs) and the size ladder at 3 epochs share test_resnet@3ep
    teachers = record["teachers"]
    assert sorted(teachers) == [
        "test_efficientnet@3ep",
        "test_resnet@1ep",
        "test_resnet@2ep",
        "test_resnet@3ep",
    ]
    for name, t in teachers.items():
        for key in (
            "train_top1",
            "train_max_prob",
            "wrong_std",
            "wrong_entropy",
            "ats_induced_flip",
            "dark_knowledge",
            "heldout_top1",
            "heldout_ece",
            "heldout_nll",
            "score",
            "test_top1",
        ):
            assert t[key] is not None, (name, key)
        # saved in timm's format with the normalization it was trained with
        model = timm.create_model(f"local-dir:{t['folder']}", pretrained=True)
        assert model.num_classes == 100 and tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert set(record["monotone"]) == {"schedule", "size"}

    # tuning read the held-out accuracy of the seed-0 runs only: the chosen setting is their argmax,
    # the default (listed first) winning ties; tuned cells exist for seed 1 only when not the default
    cells = {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    for key, choice in record["chosen"].items():
        teacher, method = key.split("|")
        grid = [
            c for c in cells.values() if c["teacher"] == teacher and c["method"] == method and c["seed"] == 0
        ]
        assert len(grid) == 3  # the default and the two grid points of GRIDS[method]
        best = max(c["heldout_top1"] for c in grid)
        assert choice["kwargs"] == next(
            c["loss_kwargs"]
            for c in sorted(grid, key=lambda c: bool(c["loss_kwargs"]))
            if c["heldout_top1"] == best
        )
        tuned_seed1 = [
            c
            for c in cells.values()
            if (c["teacher"], c["method"], c["seed"]) == (teacher, method, 1)
            and c["loss_kwargs"] == choice["kwargs"]
        ]
        assert len(tuned_seed1) == 1
    expected = 2 + 4 * len(METHODS) * (2 + 2) + sum(bool(c["kwargs"]) for c in record["chosen"].values())
    assert len(cells) == expected

    md = (out / "results.md").read_text()
    for part in (
        "## Teachers",
        "ladder **schedule**",
        "## Students, authors’ defaults",
        "## Students, tuned on held-out images",
        "## Paired differences",
        "dtkd − kd",
        "kd − alone",
        "## Ranking teachers before training",
        "naive rule",
    ):
        assert part in md, part
    check = record["ranking_check"]
    assert set(check["spearman"]) >= {"score", "test_top1"} and len(check["kd_student_mean"]) == 4
    for name in ("student_vs_teacher_accuracy.png", "ranking_check.png", "rank_teachers.png"):
        assert (out / name).read_bytes()[:8] == PNG, name

    # an interrupted study resumes: drop one cell, rerun on one process: that cell alone is trained
    victim = sorted((out / "cells").glob("*.json"))[0]
    stamps = {c.name: c.stat().st_mtime_ns for c in (out / "cells").glob("*.json")}
    victim.unlink()
    res = launch(tmp_path, STUDY, argv, num_processes=1, timeout=300)
    assert res.returncode == 0, output(res)
    assert res.stdout.count("cached in") == 4
    after = {c.name: c.stat().st_mtime_ns for c in (out / "cells").glob("*.json")}
    assert after.keys() == stamps.keys()
    assert [n for n in after if after[n] != stamps[n]] == [victim.name]


def test_monotonicity_check_and_tie_break():
    study = _recipe()
    ladders = {"a": [("x", 1, 0.0), ("x", 2, 0.0)], "b": [("y", 3, 0.0), ("z", 3, 0.0)]}
    teachers = {
        "x@1ep": {"test_top1": 50.0},
        "x@2ep": {"test_top1": 51.0},
        "y@3ep": {"test_top1": 60.0},
        "z@3ep": {"test_top1": 60.0},
    }
    assert study.check_monotone(ladders, teachers) == {"a": (True, [50.0, 51.0]), "b": (False, [60.0, 60.0])}
    assert study.teacher_name(("resnet10t", 12, 0.1)) == "resnet10t@12ep+ls0.1"
    # the greedy split gives both processes the same load for E, 2E, 3E
    jobs = study.assign([("a", 1), ("a", 2), ("a", 3)], 2, lambda j: j[1])
    assert sorted(sum(j[1] for j in r) for r in jobs) == [3, 3]


def test_help_and_bad_arguments(tmp_path):
    def run(*argv):
        return subprocess.run(
            [sys.executable, str(STUDY), *argv],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
        )

    res = run("--help")
    assert (
        res.returncode == 0
        and "--quick" in res.stdout
        and "--ladders" in res.stdout
        and "--gpu" in res.stdout
    )
    res = run("--methods", "kd", "fitnet", "--output-dir", str(tmp_path))
    assert res.returncode == 2 and "fitnet" in res.stderr
    res = run("--quick", "--gpu")
    assert res.returncode == 2 and "pick one" in res.stderr
