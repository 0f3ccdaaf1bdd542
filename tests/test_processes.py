"""Processes of a run: one run per output folder, workers that stop with their launcher, --sync-bn,
the evaluation loader's workers, and an output folder that is a file.

In-process runs use a one-process ``Accelerator``; the launcher tests start a real ``accelerate
launch`` of a recipe (gloo on CPU) and kill the launcher only.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
from _engine_utils import RECIPES, TINY, TINY_CONFIG, descendants, launch, launch_cmd, output, subprocess_env
from safetensors.torch import load_file

from timm_kd import engine
from timm_kd.engine import TrainConfig
from timm_kd.engine.processes import (
    LOCK_FILE,
    OutputDirBusyError,
    RunStoppedError,
    StopMonitor,
    lock_output_dir,
)
from timm_kd.engine.sync_bn import PlainSyncBatchNorm, convert_sync_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_CONFIG, "method": "ce", "output_dir": str(out), **kw})


# --------------------------------------------------------------------------------------------------
# the output folder: a file, a folder another run holds


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "run.txt"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"is a file, not a folder.*Pass a folder path"):
        engine.fit(_tiny(blocker))
    with pytest.raises(NotADirectoryError, match=r"is inside '.*run.txt', which is a file"):
        engine.fit(_tiny(blocker / "sub"))
    with pytest.raises(ValueError, match="--eval-workers must be >= 0"):
        engine.fit(_tiny(tmp_path / "ok", eval_workers=-1))
    assert blocker.read_text() == "not a folder" and not (tmp_path / "ok").exists()


_HOLD = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_second_run_on_a_held_output_dir_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(OutputDirBusyError) as err:
            engine.fit(_tiny(out, epochs=1))
        assert time.time() - t0 < 10
        msg = str(err.value)
        assert str(out) in msg and f"process {holder.pid}" in msg and "--output-dir" in msg, msg
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock went with it, its file (and pid) stays and blocks nothing
    assert (out / LOCK_FILE).read_text().strip() == str(holder.pid)
    acc = SimpleNamespace(is_main_process=True, num_processes=1)
    lock = lock_output_dir(acc, out)
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(OutputDirBusyError, match=f"process {os.getpid()}"):  # held: even by us
        lock_output_dir(acc, out)
    lock.release()
    lock_output_dir(acc, out).release()


# --------------------------------------------------------------------------------------------------
# stopping: signals, a dead launcher


def test_stop_monitor_signals_and_orphan_detection(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with StopMonitor(1) as stop:
        parent = os.getppid()
        monkeypatch.setattr(os, "getppid", lambda: parent + 1)
        assert stop.should_stop() is None  # not started by a launcher: a new parent is not a reason
        stop.launched = True
        assert "launcher is gone" in stop.should_stop()
        monkeypatch.setattr(os, "getppid", lambda: parent)
        assert stop.should_stop() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() == "SIGTERM was received"
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_stops_at_the_next_step_without_a_partial_checkpoint(tmp_path):
    """SIGTERM in the middle of step 3: the step finishes, the run stops before logging or
    checkpointing it; the complete checkpoint of step 2 stays the last one, nothing else is written."""
    out = tmp_path / "run"
    student = timm.create_model("test_resnet", pretrained=False, num_classes=100)  # the embedded task's
    calls = []

    def send_sigterm(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    student.register_forward_pre_hook(send_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    config = _tiny(out, epochs=3, checkpoint_every=2, keep_checkpoints=5, log_every=1)
    with pytest.raises(RunStoppedError) as err:
        engine.fit(config, student=student)
    msg = str(err.value)
    assert "after optimizer step 3" in msg and "SIGTERM" in msg and "step_00000002" in msg, msg
    assert "--resume latest" in msg
    assert len(calls) == 3  # no further step began
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (out / "run_summary.json").exists() and not (out / "student").exists()
    assert signal.getsignal(signal.SIGTERM) is before
    # the lock went with the run: the same folder resumes at once
    res = engine.fit(dataclasses.replace(config, resume="latest"), student=student)
    assert res.global_step == 36


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killing_the_launcher_stops_the_workers(tmp_path, sig):
    """Only the launcher of 2 processes is signalled (the ranks run in their own sessions). SIGKILL:
    each rank sees its new parent at its next step; SIGTERM: the launcher passes it on to the
    ranks, which stop at a step boundary. Both ranks agree on the step, stop within seconds and
    write nothing more."""
    num_processes = 2
    out = tmp_path / "run"
    args = [*TINY, "--method", "ce", "--epochs", "500", "--max-eval-steps", "1", "--checkpoint-every", "2"]
    cmd = launch_cmd(tmp_path, RECIPES / "imagenet_ats.py", [*args, "--output-dir", str(out)], num_processes)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        start_new_session=True,
    )
    try:
        first = out / "checkpoints" / "step_00000002" / "trainer_state.json"
        deadline = time.time() + 120
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), "the run never wrote its first checkpoint"
        workers = [p for p in descendants(proc.pid) if _alive(p)]
        assert len(workers) >= num_processes, workers
        os.kill(proc.pid, sig)
        t0 = time.time()
        left = _wait_gone(workers, 30)
        took = time.time() - t0
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert not left, f"workers still running {took:.1f} s after the launcher got signal {sig}: {left}"
    assert took < 20, took
    before = _listing(out)
    time.sleep(1.0)
    assert _listing(out) == before  # nothing writes any more
    assert not (out / "run_summary.json").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint


# --------------------------------------------------------------------------------------------------
# --sync-bn


def test_sync_bn_conversion_keeps_the_weights_and_the_activation():
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    converted, n = convert_sync_batchnorm(model, torch.device("cpu"))
    assert n > 0
    layers = [m for m in converted.modules() if isinstance(m, PlainSyncBatchNorm)]
    assert len(layers) == n and not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert any(hasattr(m, "act") for m in layers)  # timm's BatchNormAct2d kept its activation
    assert converted.state_dict().keys() == sd.keys()
    converted.eval()
    model_ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    model_ref.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(x), model_ref.eval()(x))  # one process: plain BatchNorm


@pytest.mark.slow
def test_sync_bn_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """A BatchNorm student: 2 processes x batch 8 with --sync-bn end with the weights (and running
    statistics) of 1 process x batch 16, within float rounding."""
    common = [*TINY, "--method", "ce", "--lr", "0.05", "--max-train-steps", "3", "--max-eval-steps", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = launch(
        tmp_path,
        RECIPES / "imagenet_ats.py",
        [*common, "--batch-size", "16", "--output-dir", str(one)],
        num_processes=1,
    )
    assert res.returncode == 0, output(res)
    res = launch(
        tmp_path,
        RECIPES / "imagenet_ats.py",
        [*common, "--batch-size", "8", "--sync-bn", "--output-dir", str(two)],
        num_processes=2,
    )
    assert res.returncode == 0, output(res)
    a = load_file(str(one / "student" / "model.safetensors"))
    b = load_file(str(two / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and any("running_var" in k for k in a)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------------
# evaluation workers


def test_eval_workers_default_to_num_workers_and_can_differ(tmp_path):
    from timm_kd.engine.setup import build_accelerator, setup_run

    def val_workers(**kw) -> tuple[int, int]:
        config = _tiny(tmp_path / "run", **kw)
        run = setup_run(config, build_accelerator(config), None, None)
        return run.train_loader.base_dataloader.num_workers, run.val_loader.base_dataloader.num_workers

    assert val_workers(num_workers=1) == (1, 1)
    assert val_workers(num_workers=1, eval_workers=0) == (1, 0)
