"""The processes of a run: one run per output folder, and workers that stop with their launcher.

One run per folder. ``lock_output_dir`` takes an exclusive ``fcntl.flock`` on
``<output_dir>/.lock`` in the main process before the run writes anything, and holds it until
``fit`` returns or raises. A second run on the same folder is refused on every rank, naming the
folder, the holder's pid (written into the lock file) and the fix. The lock belongs to the open
file: it is gone the moment its process dies, however it dies, so a lock file left behind by a
killed run never blocks the next one. (``flock`` is advisory and local: on a network file system
that does not support it, two machines are not kept apart.)

Stopping. ``StopMonitor`` turns SIGTERM and SIGINT into a request to stop, and, in a process
started by a launcher (``accelerate launch``, ``torchrun``), a changed parent pid into one too:
when the launcher dies, even by SIGKILL, its workers are re-parented and see it at their next
step. The loop asks ``should_stop`` after each optimizer step. With several processes the ranks
must stop at the same step, or one would wait forever in a collective the others left: each rank
contributes its request to an all-reduce (MAX, on a separate gloo group, host memory only, so no
device sync) started at one step boundary and read at the next, so every rank reads the same
value at the same step and stops one step after the first request. A second SIGINT interrupts at
once (``KeyboardInterrupt``). Nothing half-written is left by a stop: the loop raises before it
logs or checkpoints that step, and a checkpoint under way completes first.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list

from .config import TrainConfig

__all__ = [
    "LOCK_FILE",
    "OutputDirBusyError",
    "RunStoppedError",
    "StopMonitor",
    "check_processes",
    "lock_output_dir",
]

LOCK_FILE = ".lock"

#: reason codes of a stop request, larger wins when ranks disagree
_ORPHANED = 1
_REASONS = {
    _ORPHANED: "its launcher is gone (the parent process exited or was killed)",
    int(signal.SIGINT): "SIGINT (Ctrl-C) was received",
    int(signal.SIGTERM): "SIGTERM was received",
}

#: environment variables that only a launcher sets: accelerate launch (one process or many),
#: torchrun. A process started otherwise keeps running when its parent exits (nohup, a shell).
_LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_MIXED_PRECISION")


class OutputDirBusyError(RuntimeError):
    """Another run holds the output folder's lock."""


class RunStoppedError(RuntimeError):
    """The run stopped at a step boundary on a signal or because its launcher is gone."""


def check_processes(config: TrainConfig) -> None:
    """``--output-dir`` is a folder or can be made one; ``--eval-workers`` is not negative."""
    path = Path(config.output_dir)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is inside {str(p)!r}, which is a file"
            raise NotADirectoryError(
                f"--output-dir {config.output_dir!r} {what}, not a folder. Pass a folder path (it is "
                f"created if missing), or move the file away."
            )
        if p.exists():
            break
    workers = getattr(config, "eval_workers", None)
    if workers is not None and workers < 0:
        raise ValueError(f"--eval-workers must be >= 0 (0: load in the training process), got {workers}")


# --------------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------------


class _FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, with the holder's pid written into the file."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; return None, or why it cannot be taken (the error message)."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return f"cannot create the lock file {self.path}: {e.strerror}. Pass a writable --output-dir."
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            stop = f" (`kill {holder}` stops it)" if holder.isdigit() else ""
            return (
                f"output folder {str(folder)!r} is in use by another run ({who}, still running). "
                f"Two runs writing one folder overwrite each other's checkpoints. Wait for it to "
                f"finish or stop it{stop}, or pass another --output-dir."
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock; the file itself stays
            self.fd = None


def lock_output_dir(accelerator, output_dir: str | os.PathLike) -> _FolderLock | None:
    """Create ``output_dir`` and lock it from the main process; every rank raises
    ``OutputDirBusyError`` if another run holds it. Returns the lock (None on other ranks)."""
    lock, error = None, None
    if accelerator.is_main_process:
        lock = _FolderLock(Path(output_dir))
        error = lock.acquire()
    if accelerator.num_processes > 1:
        error = broadcast_object_list([error])[0]
    if error is not None:
        raise OutputDirBusyError(error)
    return lock


# --------------------------------------------------------------------------------------------------
# Stopping with the launcher
# --------------------------------------------------------------------------------------------------


class StopMonitor:
    """Requests to stop (signals, a dead launcher), agreed on by all ranks at a step boundary.

    Use as a context manager around the run (it installs the signal handlers, from the main
    thread only, and restores the previous ones on exit); call ``should_stop()`` on every rank at
    every step boundary.
    """

    def __init__(self, num_processes: int):
        self.world = num_processes
        self.parent = os.getppid()
        self.launched = any(k in os.environ for k in _LAUNCHER_ENV)
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._group = None
        self._work = None
        self._flag: torch.Tensor | None = None

    def __enter__(self) -> StopMonitor:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank, same point: a collective
        return self

    def __exit__(self, *exc) -> None:
        if self._work is not None:
            try:  # issued by every rank at the same step boundary, so it completes
                self._work.wait()
            except RuntimeError:
                pass  # a peer is gone: nothing left to agree on
            self._work = None
        if self._group is not None:
            # this rank's handle only, no collective; accelerate's end_training may have destroyed
            # every group already (the run then ends with report_to trackers)
            if dist.is_initialized():
                dist.destroy_process_group(self._group)
            self._group = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def local_reason(self) -> int:
        """This process' own request: a signal number, ``_ORPHANED``, or 0."""
        if self.signal is not None:
            return int(self.signal)
        if self.launched and os.getppid() != self.parent:
            return _ORPHANED
        return 0

    def should_stop(self) -> str | None:
        """Why the run stops now (the same answer on every rank at the same step), or None."""
        if self.world == 1 or self._group is None:
            code = self.local_reason()
            return _REASONS[code] if code else None
        agreed = 0
        if self._work is not None:
            self._work.wait()
            agreed = int(self._flag.item())
            self._work = None
        if agreed:
            return _REASONS.get(agreed, "another process was asked to stop")
        self._flag = torch.tensor([self.local_reason()], dtype=torch.int64)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return None
