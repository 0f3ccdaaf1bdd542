"""recipes/capacity_study.py --quick under two real gloo processes: outputs, caching, resume."""

from __future__ import annotations

import csv
import json

import pytest
import timm
from _engine_utils import RECIPES, launch, output

STUDY = RECIPES / "capacity_study.py"
METHODS = ["kd", "ats", "ats_suggested", "dtkd", "isats"]


@pytest.mark.slow
def test_quick_study_writes_its_table_and_plots_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "study"
    res = launch(tmp_path, STUDY, ["--quick", "--output-dir", str(out)], timeout=300)
    assert res.returncode == 0, output(res)

    # one row per teacher, every method's mean/std over the quick study's one seed, in CSV and Markdown
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["teacher"] for r in rows] == ["test_resnet", "resnet10t"]  # sorted by parameters
    for r in rows:
        assert int(r["params"]) == sum(
            p.numel() for p in timm.create_model(r["teacher"], num_classes=100).parameters()
        )
        assert 0.0 <= float(r["teacher_test_top1"]) <= 100.0
        assert float(r["ats_suggested_tau_correct"]) > 0 and float(r["ats_suggested_tau_wrong"]) > 0
        for m in METHODS:
            assert r[f"{m}_n"] == "1" and 0.0 <= float(r[f"{m}_mean"]) <= 100.0
    md = (out / "results.md").read_text()
    sweep = (out / "teacher_diagnostics.md").read_text()
    assert "test_resnet" in sweep and "resnet10t" in sweep and "ATS" in sweep
    assert "| teacher | params (M) |" in md and "ats_suggested top-1" in md and "alone:" in md
    for name in ("student_vs_teacher_size.png", "teacher_diagnostics.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # both ranks trained cells (the work is split), each cell once; teachers saved in timm's format
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 1 + 2 * len(METHODS)
    log = output(res)
    assert "[rank 0]" in log and "[rank 1]" in log
    teacher_dirs = list((out / "teachers").iterdir())
    assert len(teacher_dirs) == 2
    for d in teacher_dirs:
        model = timm.create_model(f"local-dir:{d / 'timm'}", pretrained=True)
        assert model.num_classes == 100

    # the ats_suggested cells used the temperatures the table reports
    for r in rows:
        cell = next(c for c in cells if f"__{r['teacher']}__ats_suggested__" in c.name)
        kwargs = json.loads(cell.read_text())["loss_kwargs"]
        assert kwargs == {
            "tau_correct": float(r["ats_suggested_tau_correct"]),
            "tau_wrong": float(r["ats_suggested_tau_wrong"]),
        }

    # an interrupted study resumes: drop one cell, rerun, only that cell (and no teacher) is trained
    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    cells[0].unlink()
    res = launch(tmp_path, STUDY, ["--quick", "--output-dir", str(out)], num_processes=1, timeout=300)
    assert res.returncode == 0, output(res)
    assert output(res).count("cached in") == 2
    after = {c.name: c.stat().st_mtime_ns for c in (out / "cells").glob("*.json")}
    assert after.keys() == stamps.keys()
    changed = [n for n in after if after[n] != stamps[n]]
    assert changed == [cells[0].name]


def test_help_and_bad_arguments(tmp_path):
    import subprocess
    import sys

    from _engine_utils import subprocess_env

    res = subprocess.run(
        [sys.executable, str(STUDY), "--help"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert res.returncode == 0 and "--quick" in res.stdout and "capacity" in res.stdout
    res = subprocess.run(
        [sys.executable, str(STUDY), "--methods", "kd", "fitnet", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert res.returncode == 2 and "unknown methods ['fitnet']" in res.stderr
