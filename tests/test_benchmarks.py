"""benchmarks/distill_step.py runs end to end (``--quick``: tiny models, seconds) and prints its tables.

No timing is asserted: the numbers are the benchmark's output, not a test's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distill_step.py"
NUM = r"\d+\.\d"


@pytest.mark.slow
def test_distill_step_quick_prints_every_table(tmp_path):
    plot = tmp_path / "growth.png"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--losses", "kd", "--plot", str(plot)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "| workload | step ms | x student | images/s | x student | peak MB | x student |" in out
    for row in ("student alone", "teacher forward", "timm LogitDistillationTask", "online kd", "cached kd"):
        assert re.search(rf"^\| {row}[^|]*\| {NUM} \| {NUM}\d \| {NUM} \| {NUM}\d \|", out, re.M), (row, out)
    # --quick measures the memory of the student alone and of the first loss, as ratios to the student
    for row in ("student alone", "online kd", "cached kd"):
        assert re.search(rf"^\| {row}[^|]*\|.*\| \d+ \| {NUM}\d \|$", out, re.M), (row, out)
    target = rf"^\| kd \| {NUM}\d\d \| {NUM}\d\d \| {NUM}\d\d \| (met|\*\*missed\*\*) \|$"
    assert re.search(target, out, re.M), out
    assert "step ms vs batch size" in out and "step ms vs num classes" in out
    assert plot.stat().st_size > 1000  # the growth plot was drawn


def test_distill_step_help_names_the_targets(capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import distill_step
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as info:
        distill_step.parse_args(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "1.05" in text and "1.10" in text and "timm task" in text


@pytest.mark.slow
def test_losses_benchmark_times_eager_and_compiled_rows():
    """benchmarks/losses.py with --compile: an eager, an unchecked and a compiled row per loss, as
    ratios to the eager cross-entropy (tiny logits, two repeats: the table, not the numbers)."""
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "losses.py"), "--batch-size", "8", "--num-classes", "10",
        "--repeats", "2", "--warmup", "1", "--threads", "1", "--losses", "dtkd", "--compile",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = ("cross_entropy", "cross_entropy (compiled)", "dtkd", "dtkd (check_inputs=False)")
    rows += ("dtkd (compiled)",)
    for row in rows:
        pattern = rf"^\| {re.escape(row)} \| {NUM}+ \| {NUM}+ \|$"
        assert re.search(pattern, res.stdout, re.M), (row, res.stdout)


def test_losses_benchmark_counts_one_thread_under_the_cpu_clock():
    """The CPU clock adds up every thread's time (OpenMP's spin-waits included), so the default run
    times one thread; the wall clock keeps torch's choice, and an explicit --threads wins."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import losses as bench
    finally:
        sys.path.pop(0)
    assert bench.parse_args([]).threads == 1
    assert bench.parse_args(["--clock", "wall"]).threads is None
    assert bench.parse_args(["--threads", "2"]).threads == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "0"])
