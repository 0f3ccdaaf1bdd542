"""Checkpoints: atomic, the last K kept, resumable to the exact weights of an uninterrupted run.

A checkpoint is ``<output_dir>/checkpoints/step_N`` (N: optimizer steps, zero-padded), written by
``accelerator.save_state`` (weights, optimizer, scheduler, EMA, every rank's RNG states) plus
``trainer_state.json`` (the loop's counters and history). It is complete once it holds the state
file: a folder without one (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .config import CHECKPOINT_DIR

__all__ = ["list_checkpoints", "resolve_resume", "save_checkpoint", "load_checkpoint"]

STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir/checkpoints`` (``step_N`` with a state file), oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder ``resume`` names (``"latest"``: the newest complete one, or None)."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume!r} is not a complete timm-kd checkpoint (no {STATE_FILE}). "
            f"Complete checkpoints of this run: {[str(p) for p in list_checkpoints(output_dir)] or 'none'}."
        )
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def state_json(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as plain JSON values (a copy: later changes to ``state`` do not reach it)."""
    return json.loads(json.dumps(state, default=_json_default))


def save_checkpoint(accelerator, output_dir: str | os.PathLike, state: dict[str, Any], keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step_{global_step}``, atomically; keep the last ``keep``.

    Every rank writes its own part (the main process the weights, optimizer and scheduler; each
    rank its RNG state) into ``checkpoints/.tmp-step_N``; after a barrier the main process adds
    ``trainer_state.json`` and renames the folder; a second barrier makes the result visible to all
    ranks. A run killed while saving leaves only a ``.tmp-`` folder, which is never resumed from.
    All ranks must call this together (it holds barriers) and none of them waits on work only
    another rank could skip.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    name = f"step_{int(state['global_step']):08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """``accelerator.load_state(path)`` (weights via safetensors, the rest with ``weights_only``);
    returns the saved counters (``trainer_state.json``)."""
    path = Path(path)
    with open(path / STATE_FILE) as f:
        state = json.load(f)
    accelerator.load_state(str(path))
    return state
