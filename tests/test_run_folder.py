"""The run folder says how the run was made (``run_config.json``) and what really taught the student.

In-process ``engine.fit`` runs with real timm test models on the embedded dataset; the teacher's
weights come from a checkpoint file, the case whose card used to credit the architecture's public
pretrained weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from _engine_utils import TINY_CONFIG
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import timm_kd
from timm_kd import engine
from timm_kd.engine import TrainConfig
from timm_kd.engine import loop as engine_loop
from timm_kd.engine.summary import RUN_CONFIG_FILE

SECRET = "hf_doNotWriteThisTokenAnywhere0123"
N_PARAMS = sum(p.numel() for p in timm.create_model("test_resnet", num_classes=100).parameters())
VERSIONS = ("python", "timm-kd", "timm", "torch", "accelerate", "datasets")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(out: Path, **kw) -> TrainConfig:
    fast = dict(max_train_steps=1, max_eval_steps=1, embedded_kwargs={"num_train": 64, "num_test": 16})
    return TrainConfig(**{**TINY_CONFIG, **fast, "output_dir": str(out), **kw})


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_run_config_is_written_before_anything_loads(tmp_path, monkeypatch):
    """A run that fails in setup still leaves every option, the versions and the command line."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    argv = ["train.py", "--lr", "0.01", "--hub-token", SECRET, f"--token={SECRET}"]
    monkeypatch.setattr(sys, "argv", argv)

    def crash(*args, **kwargs):
        raise RuntimeError("setup failed")

    monkeypatch.setattr(engine_loop, "setup_run", crash)
    config = _tiny(tmp_path / "run", loss_kwargs={"tau_correct": 4.0}, decay_milestones=(3, 6))
    with pytest.raises(RuntimeError, match="setup failed"):
        engine.fit(config)
    path = tmp_path / "run" / RUN_CONFIG_FILE
    record = _read(path)
    assert record["config"] == json.loads(json.dumps(dataclasses.asdict(config)))  # every field, as JSON
    assert set(record["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert record["config"]["decay_milestones"] == [3, 6] and record["config"]["lr"] == 0.01
    versions = record["versions"]
    assert versions["timm-kd"] == timm_kd.__version__ and versions["timm"] == timm.__version__
    assert all(record["versions"][k] for k in VERSIONS)
    assert record["command"][1:] == ["train.py", "--lr", "0.01", "--hub-token", "***", "--token=***"]
    assert record["world_size"] == 1 and record["resolved"] is None  # setup never finished
    assert SECRET not in path.read_text()
    assert not (tmp_path / "run" / "config.json").exists()  # that name is the student's timm config


@pytest.mark.filterwarnings("ignore:broken teacher")
def test_checkpoint_teacher_is_recorded_in_the_run_folder_and_the_card(tmp_path):
    """--teacher-checkpoint: the card names the file and its SHA-256, never the public weights."""
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=100)
    ckpt = tmp_path / "teacher.safetensors"
    save_file(teacher.state_dict(), str(ckpt))
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    run = tmp_path / "run"
    result = engine.fit(_tiny(run, teacher_checkpoint=str(ckpt), pretrained_teacher=True, method="kd"))

    n_params = sum(p.numel() for p in teacher.parameters())
    expected = {"architecture": "test_resnet", "num_params": n_params, "source": "checkpoint",
                "name": "teacher.safetensors", "hub_id": None, "sha256": sha}
    info = result.summary["teacher_info"]
    assert {k: info[k] for k in expected} == expected
    assert _read(run / "run_summary.json")["teacher_info"] == info
    record = _read(run / RUN_CONFIG_FILE)
    assert record["resolved"]["teacher"] == info and record["resolved"]["lr"] == pytest.approx(0.01)
    assert record["resolved"]["total_updates"] == 1 and record["config"]["teacher_checkpoint"] == str(ckpt)

    card = ModelCard.load(run / "student" / "README.md")
    dist = card.data["distillation"]
    assert (dist["teacher_weights"], dist["teacher_sha256"]) == ("checkpoint teacher.safetensors", sha)
    assert "huggingface.co/timm/test_resnet" not in card.content and str(tmp_path) not in card.content
    top1 = result.teacher_metrics["top1"]
    assert f"SHA-256 `{sha}`); measured top-1 {top1:.2f} % on the `validation` split" in card.text


def test_cross_entropy_run_has_no_teacher_anywhere(tmp_path):
    """--method ce: the run folder and the card describe plain training (a named teacher is unused)."""
    run = tmp_path / "run"
    result = engine.fit(_tiny(run, method="ce"))
    assert result.summary["teacher_info"] is None and result.summary["teacher"] is None
    assert _read(run / RUN_CONFIG_FILE)["resolved"]["teacher"] is None
    card = ModelCard.load(run / "student" / "README.md")
    assert "knowledge-distillation" not in card.data.tags and card.data.to_dict().get("distillation") is None
    assert "without a teacher" in card.text and "distilled" not in card.text


@pytest.mark.filterwarnings("ignore:broken teacher")
def test_cached_teacher_is_recorded_with_its_cache(tmp_path):
    """--teacher-cache: the record is the teacher the cache was built with, and the cache's name."""
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=100).state_dict(), str(ckpt))
    config = _tiny(tmp_path / "run", teacher_checkpoint=str(ckpt), pretrained_teacher=True, method="kd")
    manifest = engine.build_teacher_cache(config, tmp_path / "cache-kd", num_views=1, top_k=5, shard_size=64)
    result = engine.fit(dataclasses.replace(config, teacher_cache=str(tmp_path / "cache-kd")))
    info = result.summary["teacher_info"]
    assert (info["source"], info["name"]) == ("checkpoint", "teacher.safetensors")
    assert info["architecture"] == "test_resnet" and info["num_params"] == N_PARAMS
    assert info["sha256"] == manifest["teacher_checkpoint_sha256"] and info["cache"] == "cache-kd"
    assert info["cache_top1"] == manifest["teacher_view_top1"]
    card = ModelCard.load(tmp_path / "run" / "student" / "README.md")
    assert "its logits were read from a teacher cache (`cache-kd`)" in card.text
