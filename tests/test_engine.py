"""The training engine in-process: the shipped metric, checks before training, NaN handling.

Runs in the test process with a one-process ``Accelerator``, real timm test models and the real
embedded dataset. Multi-process runs, SIGKILL/resume and the recipes are in test_recipes.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_utils import write_image_folder, write_truncated_jpeg
from _engine_utils import TINY_CONFIG
from safetensors.torch import load_file

import timm_kd
from timm_kd import engine
from timm_kd.engine import TrainConfig, TrainingDivergedError
from timm_kd.losses import cross_entropy, register_loss
from timm_kd.metrics import TOPK_ACCURACY_PATH, load_topk_metric

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# the evaluate metric shipped in the package


def test_topk_metric_is_package_data_and_loads_by_path_offline():
    import evaluate

    assert os.environ["HF_EVALUATE_OFFLINE"] == "1"  # conftest: any download attempt would fail
    script = Path(TOPK_ACCURACY_PATH) / "topk_accuracy.py"
    assert script.is_file() and Path(timm_kd.__file__).parent in script.parents
    metric = evaluate.load(TOPK_ACCURACY_PATH, keep_in_memory=True)
    out = metric.compute(
        predictions=[[3, 7, 1, 0, 9], [2, 4, 5, 6, 8], [1, 2, 3, 4, 5]], references=[7, 2, 0]
    )
    assert out == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3), "num_samples": 3}


def test_topk_metric_matches_timm_accuracy_from_ids_and_from_logits():
    from timm.utils import accuracy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 20, generator=g)
    labels = torch.randint(0, 20, (257,), generator=g)
    logits[:50, :] = 0
    logits[torch.arange(50), labels[:50]] = 1  # some sure hits
    want1, want5 = (float(a) for a in accuracy(logits, labels, topk=(1, 5)))
    ranked = logits.topk(5, dim=-1).indices
    ids = load_topk_metric().compute(predictions=ranked.tolist(), references=labels.tolist())
    raw = load_topk_metric("logits").compute(predictions=logits.tolist(), references=labels.tolist())
    for out in (ids, raw):
        assert out["top1"] == pytest.approx(want1) and out["top5"] == pytest.approx(want5)
        assert out["num_samples"] == 257
    # incremental batches give the same; a k beyond the ranked ids is left out, not made up
    m = load_topk_metric()
    m.add_batch(predictions=ranked[:100, :2].tolist(), references=labels[:100].tolist())
    m.add_batch(predictions=ranked[100:, :2].tolist(), references=labels[100:].tolist())
    assert m.compute(k=(1, 2, 5)) == {
        "top1": pytest.approx(want1),
        "top2": pytest.approx(float(accuracy(logits, labels, topk=(2,))[0])),
        "num_samples": 257,
    }
    # one class id per sample: top-1 only
    assert load_topk_metric().compute(predictions=[1, 2], references=[1, 3]) == {
        "top1": 50.0,
        "num_samples": 2,
    }


def test_teacher_chance_threshold():
    assert engine.teacher_is_at_chance(1.0, 100, 2000)  # chance is 1 %
    assert engine.teacher_is_at_chance(1.9, 100, 2000)
    assert not engine.teacher_is_at_chance(3.0, 100, 2000)
    assert not engine.teacher_is_at_chance(0.5, 1000, 50000)  # 5x chance on ImageNet, 50k images
    assert engine.teacher_is_at_chance(0.12, 1000, 50000)  # a wrong class map
    assert engine.teacher_is_at_chance(4.0, 100, 64)  # 64 images: 4 % is within chance's noise


# --------------------------------------------------------------------------------------------------
# bad input stops before training, with the problem and the fix


def _tiny(tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY_CONFIG, "output_dir": str(tmp_path / "run"), **kw})


def _assert_nothing_trained(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "student").exists()


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    write_image_folder(str(root), {"cat": 6, "dog": 6}, splits=("train", "validation"))
    if corrupt:
        write_truncated_jpeg(str(root / "train" / "dog" / "broken.jpg"))
    return root


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("missing path", FileNotFoundError, ["does not exist", "/no/such/folder"]),
        ("empty split", ValueError, ["empty", "--val-split"]),
        ("labels outside classes", ValueError, ["100 classes", "10 outputs", "num_classes=100"]),
        ("corrupt image", ValueError, ["broken.jpg"]),
        ("unknown student", ValueError, ["unknown student model 'resnet_18'", "resnet18"]),
        ("unknown teacher", ValueError, ["unknown teacher model", "timm.list_models"]),
        ("unknown loss", ValueError, ["unknown loss 'atss'", "'ats'"]),
        ("resume path", FileNotFoundError, ["--resume", "not a checkpoint folder"]),
    ],
)
def test_bad_input_stops_before_training(tmp_path, case, error, words):
    kw: dict = {}
    if case == "missing path":
        kw = dict(dataset="/no/such/folder", embedded_kwargs={})
    elif case == "empty split":
        import datasets
        from PIL import Image

        empty = datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (4, 4))], "label": [0]},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
            ),
        )
        none = datasets.Dataset.from_dict({"image": [], "label": []}, features=empty.features)
        datasets.DatasetDict({"train": empty, "validation": none}).save_to_disk(
            str(tmp_path / "saved"), num_shards={"train": 1, "validation": 1}
        )
        kw = dict(dataset=str(tmp_path / "saved"), embedded_kwargs={})
    elif case == "labels outside classes":
        kw = dict(num_classes=10)
    elif case == "corrupt image":
        kw = dict(
            dataset=str(_image_folder(tmp_path / "images", corrupt=True)),
            embedded_kwargs={},
            on_corrupt="error",
        )
    elif case == "unknown student":
        kw = dict(student="resnet_18")
    elif case == "unknown teacher":
        kw = dict(teacher="no_such_teacher_net")
    elif case == "unknown loss":
        kw = dict(method="atss")
    elif case == "resume path":
        kw = dict(resume=str(tmp_path / "nowhere"))
    with pytest.raises(error) as info:
        engine.fit(_tiny(tmp_path, **kw))
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    _assert_nothing_trained(tmp_path)


@pytest.mark.slow
def test_corrupt_images_skipped_and_counted(tmp_path):
    root = _image_folder(tmp_path / "images", corrupt=True)
    result = engine.fit(
        _tiny(tmp_path, dataset=str(root), embedded_kwargs={}, on_corrupt="skip", batch_size=4, method="ce")
    )
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["run"]["num_corrupt_images"] == 1
    assert summary["label_names"] == ["cat", "dog"]
    assert result.metrics["num_samples"] == 12  # the validation split, all good


# --------------------------------------------------------------------------------------------------
# NaN: the run stops, naming the step and the last good checkpoint


@register_loss("test_nan_after_5", overwrite=True)
class _NaNAfter(torch.nn.Module):
    """Cross-entropy that turns NaN from its 5th call on (one call per optimizer step here)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, student_logits, teacher_logits, target, *, epoch=None):
        self.calls += 1
        loss = cross_entropy(student_logits.float(), target)
        if self.calls >= 5:
            loss = loss * float("nan")
        return {"loss": loss, "ce": loss.detach()}


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    config = _tiny(
        tmp_path, method="test_nan_after_5", checkpoint_every=2, log_every=3, epochs=3, keep_checkpoints=5
    )
    with pytest.raises(TrainingDivergedError) as info:
        engine.fit(config)
    msg = str(info.value)
    last_good = tmp_path / "run" / "checkpoints" / "step_00000004"
    # found at the step-6 log, reported as the step where it happened, with the checkpoint before it
    assert "optimizer step 5" in msg and str(last_good) in msg and "--resume" in msg, msg
    assert [p.name for p in engine.list_checkpoints(config.output_dir)] == ["step_00000002", "step_00000004"]
    state = json.loads((last_good / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    weights = load_file(str(last_good / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.slow
def test_divergence_of_a_real_loss_is_caught(tmp_path):
    """lr = 1e6 with ATS: the logits blow up; the loss's own check becomes a TrainingDivergedError."""
    config = _tiny(tmp_path, method="ats", lr=1e6, opt="sgd", log_every=100, epochs=2, teacher_check="off")
    with pytest.raises(TrainingDivergedError) as info:
        engine.fit(config)
    msg = str(info.value)
    assert "NaN/inf at optimizer step" in msg and "Last good checkpoint" in msg, msg


# --------------------------------------------------------------------------------------------------
# configuration plumbing


def test_recipe_flags_round_trip_into_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    engine.add_train_args(parser, **engine.IMAGENET_DEFAULTS, method="ats", loss_kwargs={"tau_correct": 4.0})
    args = parser.parse_args(
        [
            "--loss-arg",
            "tau_wrong=2",
            "--embedded-arg",
            "num_train=100",
            "--decay-milestones",
            "3,6",
            "--scale",
            "0.5,1",
            "--checkpoint-every",
            "0",
            "--mixed-precision",
            "bf16",
        ]
    )
    config = engine.config_from_args(args)
    assert config.loss_kwargs == {"tau_correct": 4.0, "tau_wrong": 2}
    assert config.embedded_kwargs == {"num_train": 100}
    assert config.decay_milestones == (3, 6) and config.scale == (0.5, 1.0)
    assert config.checkpoint_every is None and config.mixed_precision == "bf16"
    assert config.teacher == "resnet50.tv_in1k" and config.epochs == 100
    assert dataclasses.asdict(config)["dataset"] == "imagenet-1k"
    with pytest.raises(TypeError, match="unknown defaults"):
        engine.add_train_args(argparse.ArgumentParser(), no_such_field=1)


def test_resume_resolution_ignores_incomplete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [
        ("step_00000002", True),
        ("step_00000010", True),
        (".tmp-step_00000012", True),
        ("step_00000011", False),
    ]:
        (root / name).mkdir(parents=True)
        if complete:  # a manifest (written last) of no files
            manifest = {"format": "timm-kd-checkpoint", "version": 1, "unhealthy": None, "files": {}}
            (root / name / "manifest.json").write_text(json.dumps(manifest))
    assert [p.name for p in engine.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]
    assert engine.resolve_resume("latest", tmp_path)[0].name == "step_00000010"
    assert engine.resolve_resume("latest", tmp_path / "elsewhere") == (None, [])  # a fresh run
    with pytest.raises(engine.CheckpointError, match="cannot be used: no manifest.json"):
        engine.resolve_resume(str(root / "step_00000011"), tmp_path)
    assert np.all(np.diff([int(p.name[5:]) for p in engine.list_checkpoints(tmp_path)]) > 0)


@pytest.mark.slow
def test_streamed_training_split_with_steps_per_epoch(tmp_path):
    config = _tiny(tmp_path, streaming=True, steps_per_epoch=3, epochs=2, method="kd", batch_size=16)
    result = engine.fit(config)
    assert result.global_step == 6 and result.metrics["num_samples"] == 40
    assert [h["epoch"] for h in result.summary["run"]["history"]] == [1, 2]
    with pytest.raises(ValueError, match="--steps-per-epoch"):
        engine.fit(dataclasses.replace(config, steps_per_epoch=None, output_dir=str(tmp_path / "other")))


# ------------------------------------------------------------------------------------------------
# loader settings (timm-style): workers, pinned memory on CUDA, persistent workers, prefetching


def test_loader_settings_follow_the_flags_and_the_device():
    parser = engine.add_train_args(argparse.ArgumentParser())
    args = parser.parse_args(["--num-workers", "3", "--no-persistent-workers", "--prefetch-factor", "4"])
    config = engine.config_from_args(args)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    kw = engine.setup._loader_kwargs(config, cpu)
    assert kw == {"num_workers": 3, "pin_memory": False, "persistent_workers": False, "prefetch_factor": 4}
    assert engine.setup._loader_kwargs(config, cuda)["pin_memory"] is True  # auto: pinned on CUDA only
    forced = engine.config_from_args(parser.parse_args(["--no-pin-memory"]))
    assert engine.setup._loader_kwargs(forced, cuda)["pin_memory"] is False
    assert engine.setup._loader_kwargs(forced, cpu)["persistent_workers"] is True  # the default
    assert "prefetch_factor" not in engine.setup._loader_kwargs(forced, cpu)  # torch's default
    with pytest.raises(ValueError, match="--prefetch-factor must be >= 1"):
        engine.check_config(dataclasses.replace(config, prefetch_factor=0))
    with pytest.raises(ValueError, match="--num-workers must be >= 0"):
        engine.check_config(dataclasses.replace(config, num_workers=-1))


@pytest.mark.slow
def test_worker_processes_train_exactly_like_the_main_process(tmp_path):
    """A worker process, kept alive across epochs and prefetching, gives the same run as loading in
    the training process (the sample order and each sample's augmentation are seeded)."""
    kw = dict(method="kd", epochs=2, max_train_steps=6, embedded_kwargs={"num_train": 48, "num_test": 16})
    ref = engine.fit(_tiny(tmp_path / "a", **kw))
    got = engine.fit(
        _tiny(tmp_path / "b", num_workers=1, persistent_workers=True, prefetch_factor=3, **kw)
    )
    assert got.global_step == ref.global_step == 6
    for a, b in zip(ref.summary["run"]["history"], got.summary["run"]["history"]):
        assert a["train"] == pytest.approx(b["train"], rel=1e-5), (a, b)
    for k, v in ref.student.state_dict().items():
        torch.testing.assert_close(got.student.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_loss_trains_like_the_eager_loss(tmp_path):
    """--compile-loss: the same run as the eager loss (DKD, whose warm-up changes the factor every
    step), and the per-step epoch does not recompile it: one graph, plus one for the last, smaller
    batch of an epoch at most."""
    import torch._dynamo

    kw = dict(method="dkd", epochs=2, max_train_steps=6, embedded_kwargs={"num_train": 40, "num_test": 16})
    ref = engine.fit(_tiny(tmp_path / "a", **kw))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = engine.fit(_tiny(tmp_path / "b", compile_loss=True, **kw))
    assert got.global_step == ref.global_step == 6
    for a, b in zip(ref.summary["run"]["history"], got.summary["run"]["history"]):
        assert a["train"] == pytest.approx(b["train"], rel=1e-4), (a, b)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_ats_temperature_flip_warning_is_logged_once_and_names_the_fix():
    """ATS targets that rank a wrong class first where the teacher is right get one warning."""
    from types import SimpleNamespace

    lines = []
    run = SimpleNamespace(
        warned_flip=False,
        config=SimpleNamespace(method="ats", loss_kwargs={"tau_correct": 4.0, "tau_wrong": 3.0}),
        log=lines.append,
    )
    engine.loop._warn_target_flip(run, None)  # losses without the term (kd, dtkd, ...)
    engine.loop._warn_target_flip(run, engine.TARGET_FLIP_WARNING)  # at the threshold: fine
    assert lines == []
    engine.loop._warn_target_flip(run, 0.2)
    engine.loop._warn_target_flip(run, 0.3)
    assert len(lines) == 1
    assert "20.0 %" in lines[0] and "tau_wrong=3.0" in lines[0] and "suggest_ats_temperatures" in lines[0]
