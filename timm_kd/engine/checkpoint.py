"""Checkpoints: atomic, verified, loaded without running code, resumable to the exact weights of an
uninterrupted run.

A checkpoint is ``<output_dir>/checkpoints/step_N`` (N: optimizer steps, zero-padded) holding:

- ``model.safetensors``: the student's weights; ``ema.safetensors``: the EMA's (with ``model_ema``);
- ``optimizer.pt``: the optimizer's state dict, read back with ``torch.load(weights_only=True)``
  (tensors and plain values only: a file holding any other object is refused, nothing in it runs);
- ``scaler.json`` (fp16 loss scaling), ``rng_state_<rank>.json`` (each rank's Python, NumPy and
  torch generators), ``trainer_state.json`` (the loop's counters and history, and the run's
  resolved configuration, which a resume compares with its own before loading anything else);
- ``manifest.json``, written last: each file's size and SHA-256.

No file is ever unpickled as an object, so nothing in a checkpoint folder can run code when it is
loaded. The learning-rate scheduler is not stored: it is a pure function of the configuration and
the optimizer step, rebuilt from this run's flags (that is what lets ``--lr`` change on resume).

Written into ``checkpoints/.tmp-step_N`` and renamed once the manifest is in, a checkpoint is
either complete or absent. Only finite weights and optimizer states are saved (``nonfinite``
names the first bad tensors otherwise). ``resume="latest"`` takes the newest checkpoint whose
files match its manifest, saying which newer ones were skipped and why; the main process chooses
and broadcasts the choice, so every rank loads the same one.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import file_sha256
from ..models import unwrap_model
from .config import CHECKPOINT_DIR

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "list_checkpoints",
    "verify_checkpoint",
    "resolve_resume",
    "choose_resume",
    "read_state",
    "nonfinite",
    "nonfinite_state",
    "weights_absmax",
    "WEIGHT_GROWTH_LIMIT",
    "save_checkpoint",
    "load_checkpoint",
    "STATE_FILE",
    "MANIFEST_FILE",
]

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.json"
FORMAT = "timm-kd-checkpoint"
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^step_(\d+)$")
#: a checkpoint whose largest weight exceeds this multiple of the largest weight at the start of
#: the run is diverging (finite, but no lower learning rate recovers it): not counted as good.
#: Healthy training moves the largest weight by small factors (norm layers start it at 1).
WEIGHT_GROWTH_LIMIT = 1000.0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, incomplete, unsafe, or from another setup."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a lost mount); earlier checkpoints are intact."""


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


# --------------------------------------------------------------------------------------------------
# Finding and verifying checkpoints
# --------------------------------------------------------------------------------------------------


def _step_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` folder in ``output_dir/checkpoints``, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir/checkpoints`` (``step_N`` with a manifest), oldest first.

    Complete means written to the end; ``verify_checkpoint`` checks the files against the manifest.
    """
    return [p for p in _step_folders(output_dir) if (p / MANIFEST_FILE).is_file()]


def _read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; anything else (a damaged or planted file) is a ``CheckpointError``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}): the checkpoint is damaged or was modified. "
            f"Resume from another checkpoint (--resume PATH) or delete {path.parent}."
        ) from None


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (None when every file matches its manifest)."""
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return (
            f"no {MANIFEST_FILE} (a write that did not finish, or a checkpoint of an older timm-kd, "
            "whose pickled files are not loaded)"
        )
    try:
        manifest = _read_json(path / MANIFEST_FILE)
    except CheckpointError:
        return f"{MANIFEST_FILE} is not valid JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        return f"{MANIFEST_FILE} is not a timm-kd checkpoint manifest"
    if manifest.get("version") != FORMAT_VERSION:
        return f"checkpoint format version {manifest.get('version')}, this timm-kd reads {FORMAT_VERSION}"
    for name, want in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} (truncated or damaged)"
        if file_sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (damaged or modified)"
    return None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The checkpoint ``resume`` names, verified, and a note for each newer checkpoint skipped.

    ``"latest"``: the newest checkpoint whose files match its manifest (None when the run has no
    checkpoint yet). A path: that checkpoint, verified. Raises ``CheckpointError`` for a damaged
    checkpoint named by path, or when ``latest`` finds checkpoints but none intact (starting over
    would overwrite them).
    """
    if not resume:
        return None, []
    if resume != "latest":
        path = Path(resume)
        why = verify_checkpoint(path) if path.is_dir() else "not a folder"
        if why is not None:
            valid = [str(p) for p in list_checkpoints(output_dir) if verify_checkpoint(p) is None]
            raise CheckpointError(
                f"--resume {resume!r} cannot be used: {why}. "
                f"Intact checkpoints of this run: {valid or 'none'}."
            )
        note = _unhealthy(path)
        return path, [f"WARNING: --resume {path}: written while training diverged: {note}"] if note else []
    skipped, diverging = [], []
    for path in reversed(_step_folders(output_dir)):
        why = verify_checkpoint(path)
        if why is None and _unhealthy(path) is None:
            return path, skipped
        if why is None:
            diverging.append(path)
            why = f"not a good checkpoint: {_unhealthy(path)} (resume it by path to use it anyway)"
        skipped.append(f"--resume latest: skipped {path}: {why}")
    if diverging and len(diverging) == len(skipped):
        raise CheckpointError(
            f"--resume latest: every checkpoint in {Path(output_dir) / CHECKPOINT_DIR} was written while "
            f"training diverged ({'; '.join(skipped)}). Start over with a lower --lr (or --clip-grad "
            "1.0), or resume one of them by path."
        )
    if skipped:
        raise CheckpointError(
            f"--resume latest: no intact checkpoint in {Path(output_dir) / CHECKPOINT_DIR}; "
            + "; ".join(skipped)
            + ". Resume from a copy elsewhere with --resume PATH, or delete the checkpoints folder "
            "to start over."
        )
    return None, []


def choose_resume(
    accelerator, resume: str | None, output_dir: str | os.PathLike
) -> tuple[Path | None, list[str]]:
    """``resolve_resume`` on the main process, its answer (or its error) broadcast to every rank.

    Ranks never pick different checkpoints, and a refusal is raised on all of them (none is left
    waiting in a collective).
    """
    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            path, notes = resolve_resume(resume, output_dir)
            answer = [("ok", None if path is None else str(path), notes)]
        except (CheckpointError, OSError) as e:
            answer = [("error", str(e), [])]
    if accelerator.num_processes > 1:
        answer = broadcast_object_list(answer, from_process=0)
    kind, value, notes = answer[0]
    if kind == "error":
        raise CheckpointError(value)
    return (None if value is None else Path(value)), notes


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (JSON: counters, history, the run's configuration)."""
    state = _read_json(Path(path) / STATE_FILE)
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{Path(path) / STATE_FILE} is not a timm-kd trainer state.")
    return state


# --------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if torch.is_tensor(o) and o.numel() == 1:
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


# --------------------------------------------------------------------------------------------------
# What a checkpoint holds
# --------------------------------------------------------------------------------------------------


def _tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor in a nested dict/list (an optimizer state dict), with a dotted name."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite(parts: dict[str, Any], limit: int = 3) -> list[str]:
    """The names (``part:tensor``) of up to ``limit`` floating-point tensors holding NaN or inf.

    One host sync for all of them: the per-tensor flags are stacked on the device first.
    """
    named = [
        (f"{part}:{name}", t)
        for part, obj in parts.items()
        for name, t in _tensors(obj)
        if t.is_floating_point() and t.numel()
    ]
    if not named:
        return []
    flags = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).cpu()
    return [name for (name, _), ok in zip(named, flags.tolist()) if not ok][:limit]


def _rng_state() -> dict[str, Any]:
    """This process' generators as JSON values (no pickle)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *(v.item() if hasattr(v, "item") else v for v in np_state[2:]),
        ],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _parts(model, optimizer, model_ema) -> dict[str, Any]:
    """The tensors to save: the student's weights, the EMA's, the optimizer's state dict."""
    parts = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict()}
    if model_ema is not None:
        parts["ema"] = unwrap_model(model_ema).state_dict()
    return parts


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (tensors sharing storage counted once)."""
    seen, total = set(), 0
    for _, t in _tensors(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: contiguous CPU copies (tied tensors written once per name)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return any(
        s in text for s in ("No space left", "unexpected pos", "StorageFull", "Disk quota", "code: 28")
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_error(
    e: BaseException, tmp: Path, final: Path, parts: dict[str, Any], output_dir
) -> CheckpointWriteError:
    """The message of a failed write: what, where, how much space it needs, what survived."""
    try:
        free = _mb(shutil.disk_usage(tmp.parent).free)
    except OSError:
        free = "unknown"
    kept = [p.name for p in list_checkpoints(output_dir)]
    survived = (
        f"Earlier checkpoints are intact: {', '.join(kept)}." if kept else "No earlier checkpoint exists."
    )
    if _is_disk_full(e):
        head = f"the disk is full: writing checkpoint {final.name} into {tmp.parent} failed ({e})."
    else:
        head = f"writing checkpoint {final.name} into {tmp.parent} failed: {e}."
    sizes = {k: _nbytes(v) for k, v in parts.items()}
    detail = ", ".join(f"{k} {_mb(n)}" for k, n in sizes.items())
    return CheckpointWriteError(
        f"{head} A checkpoint of this run needs about {_mb(sum(sizes.values()))} ({detail}); "
        f"{free} free there now. {survived} Free space (or lower "
        "--keep-checkpoints, or point --output-dir at a larger disk), then continue with --resume latest."
    )


def _write_parts(accelerator, tmp: Path, parts: dict[str, Any], state: dict[str, Any]) -> None:
    """This rank's files: the main process writes tensors, scaler and state; every rank its RNG."""
    if accelerator.is_main_process:
        save_file(_contiguous(parts["model"]), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if "ema" in parts:
            save_file(_contiguous(parts["ema"]), str(tmp / EMA_FILE), metadata={"format": "pt"})
        torch.save(parts["optimizer"], tmp / OPTIMIZER_FILE)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            write_json_atomic(tmp / SCALER_FILE, scaler.state_dict())
        write_json_atomic(tmp / STATE_FILE, state)
    write_json_atomic(tmp / _rng_file(accelerator.process_index), _rng_state())


def _write_manifest(tmp: Path, unhealthy: str | None) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "unhealthy": unhealthy, "files": files}
    write_json_atomic(tmp / MANIFEST_FILE, manifest)


def _unhealthy(path: Path) -> str | None:
    """The manifest's note on why a checkpoint is not a good one to resume from (None: it is)."""
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get("unhealthy")
    except (OSError, ValueError, AttributeError):
        return None


def _prune(output_dir, keep: int) -> None:
    """Drop all but the last ``keep`` checkpoints, never the newest healthy one."""
    ckpts = list_checkpoints(output_dir)
    healthy = [p for p in ckpts if _unhealthy(p) is None]
    for old in ckpts[:-keep]:
        if not healthy or old != healthy[-1]:
            shutil.rmtree(old, ignore_errors=True)


def weights_absmax(model) -> float:
    """The largest absolute parameter value of ``model`` (one host sync): the measure of divergence."""
    params = [p.detach() for p in unwrap_model(model).parameters() if p.numel()]
    return float(torch.stack([p.abs().max().float() for p in params]).max()) if params else 0.0


def _all_ok(accelerator, ok: bool) -> bool:
    """Whether every rank succeeded (a collective every rank reaches, failed or not)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.gather(flag).min().item() > 0)


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    state: dict[str, Any],
    keep: int,
    *,
    model,
    optimizer,
    model_ema=None,
    unhealthy: str | None = None,
) -> Path:
    """Write ``checkpoints/step_{global_step}`` atomically and keep the last ``keep``; returns its path.

    ``unhealthy``: why this checkpoint, though finite, is not a good one to resume from (the
    weights are diverging); recorded in its manifest, so ``resume="latest"`` passes over it and
    pruning keeps the newest healthy checkpoint beyond the last ``keep``.

    Every rank writes its part into ``checkpoints/.tmp-step_N``; once all have (a collective), the
    main process writes the manifest, renames the folder and drops old checkpoints. A write error
    on any rank (a full disk) removes the temporary folder and raises ``CheckpointWriteError`` on
    every rank, naming the folder, the space the checkpoint needs and the checkpoints that survive.
    The caller checks the tensors are finite first (``nonfinite``). All ranks must call this
    together.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    name = f"step_{int(state['global_step']):08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    parts = _parts(model, optimizer, model_ema)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        _write_parts(accelerator, tmp, parts, state)
    except (OSError, RuntimeError, SafetensorError) as e:
        error = e
    if not _all_ok(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        if error is None:
            raise CheckpointWriteError(f"writing checkpoint {name} failed on another process; see its error.")
        raise _write_error(error, tmp, final, parts, output_dir) from error
    if accelerator.is_main_process:
        try:
            _write_manifest(tmp, unhealthy)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
        if error is None:
            _prune(output_dir, keep)
            for stale in root.glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
    if not _all_ok(accelerator, error is None):
        accelerator.wait_for_everyone()
        if error is None:
            raise CheckpointWriteError(
                f"writing checkpoint {name} failed on the main process; see its error."
            )
        raise _write_error(error, tmp, final, parts, output_dir) from error
    return final


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _refused(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"refused to load {path}: {type(e).__name__}: {e}. timm-kd checkpoints hold only tensors and "
        "plain values; this file is damaged, or was modified or written by something else (a pickled "
        "object, which could run code, is never loaded). Resume from another checkpoint "
        f"(--resume PATH) or delete {path.parent}."
    )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise _refused(path, e) from None


def _load_weights(module, path: Path) -> None:
    sd = _load_tensors(path)
    bad = nonfinite({path.name: sd})
    if bad:
        raise CheckpointError(
            f"{path} holds NaN/inf values ({', '.join(bad)}): these weights cannot be trained on. "
            "Resume from an earlier checkpoint (--resume PATH)."
        )
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit this run's model: {e}") from None


def _load_optimizer(optimizer, path: Path) -> None:
    """The optimizer's state from the checkpoint, its hyperparameters (lr, weight decay, momentum,
    betas, ...) from this run's configuration: those in each fresh parameter group are put back
    after loading, so flags changed on resume apply."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as e:
        raise _refused(path, e) from None
    if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
        raise CheckpointError(f"{path} is not an optimizer state dict.")
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if len(sd["param_groups"]) != len(fresh):
        raise CheckpointError(
            f"{path} has {len(sd['param_groups'])} parameter groups, this run's optimizer {len(fresh)}: "
            "another optimizer or model. Resume with the checkpoint's --opt and --student."
        )
    bad = nonfinite({path.name: sd["state"]})
    if bad:
        raise CheckpointError(
            f"{path} holds NaN/inf values ({', '.join(bad)}). Resume from an earlier checkpoint."
        )
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this run's optimizer: {e}") from None
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)


def load_checkpoint(
    accelerator, path: str | os.PathLike, *, model, optimizer, model_ema=None
) -> dict[str, Any]:
    """Load a checkpoint (verified by ``resolve_resume``) into the prepared objects; returns its
    ``trainer_state.json``.

    Weights come from safetensors files, the optimizer's state through ``torch.load`` with
    ``weights_only=True``, everything else from JSON: nothing in the folder can run code. A file
    that is not what it should be raises ``CheckpointError`` naming it. The optimizer keeps this
    run's hyperparameters; the caller steps the scheduler to the checkpoint's step.
    """
    path = Path(path)
    state = read_state(path)
    _load_weights(unwrap_model(model), path / MODEL_FILE)
    if model_ema is not None:
        _load_weights(unwrap_model(model_ema), path / EMA_FILE)
    _load_optimizer(optimizer, path / OPTIMIZER_FILE)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(_read_json(path / SCALER_FILE))
    rng = path / _rng_file(accelerator.process_index)
    if rng.is_file():
        try:
            _set_rng_state(_read_json(rng))
        except (KeyError, TypeError, ValueError) as e:
            raise _refused(rng, e) from None
    return state


def nonfinite_state(model, optimizer, model_ema=None) -> list[str]:
    """``nonfinite`` over what ``save_checkpoint`` would write (weights, optimizer state, EMA)."""
    return nonfinite(_parts(model, optimizer, model_ema))
