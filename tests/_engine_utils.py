"""Helpers for the engine and recipe tests: tiny real runs, `accelerate launch` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _wrapper_utils import free_port, write_accelerate_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")

#: recipe flags for a tiny run on the embedded dataset with random timm test models
TINY = [
    "--dataset",
    "embedded",
    "--embedded-arg",
    "num_train=192",
    "--embedded-arg",
    "num_test=101",
    "--teacher",
    "test_resnet",
    "--student",
    "test_resnet",
    "--no-pretrained-teacher",
    "--input-size",
    "32",
    "--crop-pct",
    "1",
    "--batch-size",
    "8",
    "--num-workers",
    "0",
    "--no-progress",
]

#: TrainConfig fields of the same tiny run, for in-process ``engine.fit``
TINY_CONFIG = dict(
    dataset="embedded",
    embedded_kwargs={"num_train": 96, "num_test": 40},
    teacher="test_resnet",
    student="test_resnet",
    pretrained_teacher=False,
    teacher_check="warn",
    input_size=32,
    crop_pct=1.0,
    batch_size=8,
    num_workers=0,
    progress=False,
    epochs=1,
    lr=0.01,
)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test session's environment (offline, isolated HF_HOME) with one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def launch_cmd(tmp_path: Path, script: Path, args: list[str], num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``script`` with real gloo processes and no user config merged."""
    cfg = write_accelerate_config(tmp_path / f"accelerate_{num_processes}.yaml", num_processes=num_processes)
    cmd = [ACCELERATE, "launch", "--config_file", str(cfg), "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    return [*cmd, str(script), *args]


def launch(
    tmp_path: Path, script: Path, args: list[str], num_processes: int = 2, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    cmd = launch_cmd(tmp_path, script, args, num_processes)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts each rank in its own session, so
    killing the launcher's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sigkill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a launched run: the launcher and every rank at once, as a crashed node would."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.time() + 30
    alive = lambda pid: _state(pid) not in ("Z", "gone")  # noqa: E731 - zombies are dead
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    return pids


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def output(res: subprocess.CompletedProcess) -> str:
    return res.stdout[-6000:] + "\n--- stderr ---\n" + res.stderr[-6000:]
