"""Checkpoints in-process: nothing in one runs code, exact resume, NaN recovery, flags changed on
resume, a damaged newest checkpoint, a full disk.

Real tiny runs (timm test models, the embedded dataset, one process); the two-process kill and
resume is in test_recipes.py.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from _engine_utils import TINY_CONFIG
from safetensors.torch import load_file

from timm_kd import engine
from timm_kd.engine import CheckpointError, CheckpointWriteError, TrainConfig, TrainingDivergedError
from timm_kd.engine import checkpoint as ckpt
from timm_kd.files import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_CONFIG, "output_dir": str(out), "log_every": 100, **kw})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _rehash(folder: Path, name: str) -> None:
    """Make the manifest agree with a changed file (what someone planting a file would do too)."""
    manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    f = folder / name
    manifest["files"][name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------
# nothing in a checkpoint runs code


class _Payload:
    """Unpickling this writes a marker file: the stand-in for code planted in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.slow
def test_planted_payload_in_checkpoint_never_runs(tmp_path):
    out = tmp_path / "run"
    engine.fit(_config(out, method="kd", model_ema=True, checkpoint_every=4, max_train_steps=5))
    (good,) = engine.list_checkpoints(out)
    files = sorted(p.name for p in good.iterdir())
    assert files == [
        "ema.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.pt",
        "rng_state_0.json",
        "trainer_state.json",
    ]
    marker = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    for name in files:
        planted = tmp_path / f"planted_{name}"
        planted_dir = planted / "checkpoints" / good.name
        planted_dir.parent.mkdir(parents=True)
        shutil.copytree(good, planted_dir)
        target = planted_dir / name
        if name.endswith(".pt"):
            torch.save({"state": _Payload(marker), "param_groups": []}, target)  # a real torch zip file
        else:
            target.write_bytes(pickle.dumps(_Payload(marker)))
        if name != ckpt.MANIFEST_FILE:
            _rehash(planted_dir, name)  # the manifest agrees: the loader itself must refuse
        config = _config(out, method="kd", model_ema=True, resume=str(planted_dir))
        with pytest.raises(CheckpointError) as info:
            engine.fit(config)
        assert name in str(info.value), (name, str(info.value))
        assert not marker.exists(), f"a payload planted in {name} ran"
    # without the rehash, the manifest's SHA-256 already refuses the changed file
    data = pickle.dumps(_Payload(marker))  # padded to the file's size: only the hash tells
    (good / "optimizer.pt").write_bytes(data + b"\0" * ((good / "optimizer.pt").stat().st_size - len(data)))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt does not match its SHA-256"):
        engine.fit(_config(out, method="kd", model_ema=True, resume=str(good)))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.slow
def test_resume_in_process_ends_with_the_same_weights(tmp_path):
    """Stop after 5 steps (checkpoint at 3), resume latest: identical to an uninterrupted run, EMA too."""
    kw = dict(method="kd", checkpoint_every=3, epochs=1, model_ema=True, model_ema_decay=0.9)
    engine.fit(_config(tmp_path / "clean", **kw))
    engine.fit(_config(tmp_path / "cut", max_train_steps=5, **kw))
    assert [p.name for p in engine.list_checkpoints(tmp_path / "cut")] == ["step_00000003"]
    res = engine.fit(_config(tmp_path / "cut", resume="latest", **kw))
    clean, resumed = _weights(tmp_path / "clean"), _weights(tmp_path / "cut")
    assert clean.keys() == resumed.keys()
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    # --max-train-steps is how a run is watched, not what it learns: not a recorded change
    assert res.summary["run"]["config_changes"] == []


# --------------------------------------------------------------------------------------------------
# NaN recovery


@pytest.mark.slow
def test_nan_recovery_resume_with_lower_lr(tmp_path, capsys):
    """lr 100 diverges: checkpoints written with exploding weights are not 'good', the error names the
    last good one (kept despite --keep-checkpoints 2), and resuming it with a lower --lr trains on."""
    out = tmp_path / "run"
    kw = dict(method="ce", opt="sgd", checkpoint_every=1, keep_checkpoints=2, epochs=2, log_every=1)
    with pytest.raises(TrainingDivergedError) as info:
        engine.fit(_config(out, **{**kw, "lr": 100.0}))
    msg = str(info.value)
    named = re.search(r"--resume (\S+) and a lower --lr", msg)
    assert named, msg
    good = Path(named.group(1))
    kept = engine.list_checkpoints(out)
    assert good in kept and len(kept) == 3  # the last two, and the newest good one
    for p in kept:
        weights = load_file(str(p / "model.safetensors"))
        absmax = max(w.abs().max().item() for w in weights.values() if w.is_floating_point())
        unhealthy = json.loads((p / ckpt.MANIFEST_FILE).read_text())["unhealthy"]
        assert (unhealthy is None) == (p == good) and all(torch.isfinite(w).all() for w in weights.values())
        assert (absmax < 1000) == (p == good), (p, absmax)
    assert "is not counted as good" in capsys.readouterr().out
    # --resume latest passes over the diverging checkpoints to the good one, saying why
    latest, skipped = engine.resolve_resume("latest", out)
    assert latest == good and len(skipped) == 2 and all("training is diverging" in s for s in skipped)

    res = engine.fit(_config(out, **{**kw, "lr": 0.01, "resume": str(good)}))
    printed = capsys.readouterr().out
    step = int(good.name[5:])
    assert f"changed on resume, applied from step {step}: --lr 100.0 -> 0.01" in printed, printed
    assert "steps, lr 0.01" in printed  # the header shows the rate that runs
    assert res.global_step == 24 and all(torch.isfinite(w).all() for w in _weights(out).values())
    assert res.summary["run"]["config_changes"] == [
        {"step": step, "epoch": 1, "flag": "--lr", "old": 100.0, "new": 0.01}
    ]


# --------------------------------------------------------------------------------------------------
# resuming with other flags


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A kd run stopped after 5 steps, with a checkpoint at step 3 (copied by each test that resumes)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    engine.fit(_config(out, method="kd", checkpoint_every=3, epochs=2, max_train_steps=5))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.slow
def test_resume_refuses_what_cannot_work_listing_the_flags(stopped_run, tmp_path):
    out = _copy(stopped_run, tmp_path)
    (ck,) = engine.list_checkpoints(out)
    weights = (ck / "model.safetensors").read_bytes()
    config = _config(
        out,
        method="kd",
        checkpoint_every=3,
        epochs=2,
        resume="latest",
        student="test_efficientnet",
        opt="adamw",
    )
    with pytest.raises(ValueError) as info:
        engine.fit(config)
    msg = str(info.value)
    assert f"cannot resume {ck}" in msg and "--student 'test_resnet' -> 'test_efficientnet'" in msg, msg
    assert "--opt 'sgd' -> 'adamw'" in msg and "another optimizer" in msg and "--output-dir" in msg, msg
    # a global batch that moves the epoch position is refused too
    with pytest.raises(ValueError, match=r"global batch size 8 -> 16"):
        engine.fit(_config(out, method="kd", checkpoint_every=3, epochs=2, resume="latest", batch_size=16))
    assert (ck / "model.safetensors").read_bytes() == weights and engine.list_checkpoints(out) == [ck]


@pytest.mark.slow
def test_resume_applies_changed_lr_and_loss_args_and_records_them(stopped_run, tmp_path, capsys):
    out = _copy(stopped_run, tmp_path)
    capsys.readouterr()
    kw = dict(method="kd", checkpoint_every=3, epochs=3, lr=0.001, loss_kwargs={"tau": 2.0})
    res = engine.fit(_config(out, resume="latest", **kw))
    printed = capsys.readouterr().out
    assert "changed on resume, applied from step 3:" in printed, printed
    for change in ("--lr 0.01 -> 0.001", "--epochs 2 -> 3", "--loss-arg {} -> {'tau': 2.0}"):
        assert change in printed, (change, printed)
    # the cosine schedule of the new flags at step 3: lr 0.001 over 3 epochs of 12 steps
    import math

    want = 0.5 * 0.001 * (1 + math.cos(math.pi * 3 / 36))
    announced = float(re.search(r"\(epoch 1, step 3\), lr now (\S+)", printed).group(1))
    assert announced == pytest.approx(want, rel=1e-3)
    changes = res.summary["run"]["config_changes"]
    assert {c["flag"] for c in changes} == {"--lr", "--epochs", "--loss-arg"}
    assert all(c["step"] == 3 and c["epoch"] == 1 for c in changes)
    saved = json.loads((engine.list_checkpoints(out)[-1] / ckpt.STATE_FILE).read_text())
    assert saved["config_changes"] == changes and saved["config"]["config"]["lr"] == 0.001
    # the model card does not present the last values as if used from the start
    card = (out / "student" / "README.md").read_text()
    assert "**Changed on resume:**" in card and "`--loss-arg` {} -> {'tau': 2.0} from step 3" in card, card


# --------------------------------------------------------------------------------------------------
# a damaged newest checkpoint


@pytest.mark.slow
def test_resume_latest_skips_a_truncated_newest_checkpoint(stopped_run, tmp_path, capsys):
    out = _copy(stopped_run, tmp_path)
    (older,) = engine.list_checkpoints(out)
    newer = older.parent / "step_00000004"
    shutil.copytree(older, newer)
    state = json.loads((newer / ckpt.STATE_FILE).read_text())
    opt = newer / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    assert "truncated" in engine.verify_checkpoint(newer) and engine.verify_checkpoint(older) is None
    # named by path, it is refused, naming the file and the intact checkpoints
    with pytest.raises(CheckpointError, match=r"optimizer\.pt has \d+ bytes.*Intact checkpoints of this run"):
        engine.resolve_resume(str(newer), out)
    capsys.readouterr()
    res = engine.fit(_config(out, method="kd", checkpoint_every=3, epochs=2, resume="latest"))
    printed = capsys.readouterr().out
    assert f"--resume latest: skipped {newer}: optimizer.pt has" in printed, printed
    assert "(truncated or damaged)" in printed and f"resumed from {older} (epoch 1, step 3)" in printed
    assert res.global_step == 24 and state["global_step"] == 3


# --------------------------------------------------------------------------------------------------
# a full disk


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ENOSPC", "torch inline_container"])
def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_earlier_ones(tmp_path, monkeypatch, how):
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint's optimizer file
            if how == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9536 vs 9424")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as info:
        engine.fit(_config(out, method="kd", checkpoint_every=3, epochs=1))
    msg = str(info.value)
    root = out / "checkpoints"
    assert f"the disk is full: writing checkpoint step_00000006 into {root} failed" in msg, msg
    assert re.search(r"needs about \d+\.\d MB \(model \d+\.\d MB, optimizer \d+\.\d MB\)", msg), msg
    assert "Earlier checkpoints are intact: step_00000003" in msg and "--resume latest" in msg, msg
    (kept,) = engine.list_checkpoints(out)
    assert kept.name == "step_00000003" and engine.verify_checkpoint(kept) is None
    assert not list(root.glob(".tmp-*"))
