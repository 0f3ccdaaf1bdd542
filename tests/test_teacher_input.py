"""What the teacher sees: the batch as it is, unless something known says otherwise.

Each test is one way a teacher reaches the wrapper (a module, a checkpoint file, a checkpoint with
its config.json, a checkpoint folder, a ``local-dir:`` folder, a run folder, a pretrained config,
the engine's flags, a cache build). A forward pre-hook on the teacher network records the tensor
it receives, so "the teacher sees the batch" is checked exactly, not inferred from accuracy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from _engine_utils import TINY_CONFIG
from _wrapper_utils import IMAGENET_MEAN, IMAGENET_STD, batch, tiny
from safetensors.torch import save_file
from timm.data import resolve_data_config

import timm_kd
from timm_kd import DistillWrapper, engine
from timm_kd import cache as C
from timm_kd import data as D
from timm_kd.engine.setup import teacher_data_config
from timm_kd.models import resolve_model, weights_source

HALF = (0.5, 0.5, 0.5)
#: how the student's batches are normalized, and their size
STUDENT_CFG = {
    "input_size": (3, 32, 32),
    "mean": HALF,
    "std": HALF,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
}


def _spy(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors ``model`` is called on, recorded by a forward pre-hook."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def _step(wrapper: DistillWrapper, size: int = 32) -> tuple[list[str], dict]:
    """One training step on a ``size`` px batch; the teacher warnings it raised."""
    x, y = batch(size=size)
    wrapper.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wrapper(x, y)
    return [str(w.message) for w in caught if "teacher" in str(w.message)], {"x": x, **out}


def _checkpoint(
    tmp_path: Path, name: str = "resnet10t", config: dict | None = None, num_classes: int = 5
) -> tuple[Path, torch.nn.Module]:
    """A teacher's weights file, with a timm config.json beside it if given."""
    net = tiny(name, num_classes=num_classes)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.safetensors"
    save_file(net.state_dict(), str(path))
    if config is not None:
        cfg = {"architecture": name, "num_classes": num_classes, **config}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    return path, net.eval()


# ------------------------------------------------------------------------------------------------
# modules


def test_a_module_teacher_sees_the_batch_as_it_is_whatever_its_architecture_default_says():
    teacher = timm.create_model("resnet10t", num_classes=5)  # pretrained_cfg: 176 px, ImageNet mean/std
    assert resolve_data_config(model=teacher)["input_size"] == (3, 176, 176)
    seen = _spy(teacher)
    wrapper = DistillWrapper(tiny("test_resnet"), teacher, loss="kd", data_config=STUDENT_CFG)
    msgs, out = _step(wrapper)
    assert msgs == []  # no adapter, nothing to warn about
    assert torch.equal(seen[0], out["x"])  # exactly the batch: no resize, no re-normalization
    with torch.no_grad():
        torch.testing.assert_close(out["teacher_output"], teacher(out["x"]))
    first = repr(wrapper).splitlines()[1].strip()  # the adapter choice opens print(wrapper)
    assert first == "teacher 'ResNet' sees 32 x 32 as given, not re-normalized", first


def test_a_module_teacher_is_adapted_when_told_and_the_warning_says_what_it_sees_and_costs():
    teacher = timm.create_model("resnet10t", num_classes=5)
    seen = _spy(teacher)
    told = {**resolve_data_config(model=teacher), "input_size": (3, 64, 64)}  # "ImageNet's, at 64 px"
    wrapper = DistillWrapper(
        tiny("test_resnet"), teacher, loss="kd", data_config=STUDENT_CFG, teacher_data_config=told
    )
    msgs, _ = _step(wrapper)
    assert seen[0].shape[-2:] == (64, 64)
    assert len(msgs) == 1
    assert msgs[0].startswith(
        "teacher 'ResNet' sees 64 x 64, resized from 32 x 32 (bicubic), re-normalized to mean "
        "(0.485, 0.456, 0.406) std (0.229, 0.224, 0.225) from mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5) "
        "(as teacher_data_config says); its forward pass gets 4x the student's pixels per image."
    ), msgs[0]
    assert "sees 64 x 64, resized from 32 x 32" in repr(wrapper).splitlines()[1]
    assert _step(wrapper)[0] == []  # once per batch size


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_a_checkpoint_file_without_config_gives_the_teacher_the_batch(tmp_path):
    path, net = _checkpoint(tmp_path)
    wrapper = DistillWrapper(
        tiny("test_resnet"), "resnet10t", loss="kd", teacher_checkpoint=path, data_config=STUDENT_CFG
    )
    seen = _spy(wrapper.teacher.model)
    msgs, out = _step(wrapper)
    assert msgs == [] and torch.equal(seen[0], out["x"])
    with torch.no_grad():
        torch.testing.assert_close(out["teacher_output"], net(out["x"]))
    assert weights_source(wrapper.teacher.model).kind == "checkpoint"


def test_a_config_json_beside_the_checkpoint_says_what_its_weights_expect(tmp_path):
    same = {"pretrained_cfg": {"input_size": [3, 32, 32], "mean": list(HALF), "std": list(HALF)}}
    path, _ = _checkpoint(tmp_path / "same", config=same)
    wrapper = DistillWrapper(
        tiny("test_resnet"), "resnet10t", loss="kd", teacher_checkpoint=path, data_config=STUDENT_CFG
    )
    assert not wrapper.teacher.adapters_active((32, 32))

    other = {
        "pretrained_cfg": {"input_size": [3, 48, 48], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    }
    path, _ = _checkpoint(tmp_path / "other", config=other)
    wrapper = DistillWrapper(
        tiny("test_resnet"), "resnet10t", loss="kd", teacher_checkpoint=path, data_config=STUDENT_CFG
    )
    seen = _spy(wrapper.teacher.model)
    msgs, _ = _step(wrapper)
    assert seen[0].shape[-2:] == (48, 48)
    assert len(msgs) == 1 and "sees 48 x 48, resized from 32 x 32" in msgs[0]
    assert f"as config.json beside {path} says" in msgs[0] and "2.25x the student's pixels" in msgs[0]


def test_a_checkpoint_folder_is_named_as_a_folder_with_what_to_pass(tmp_path):
    path, _ = _checkpoint(tmp_path / "weights")
    student = tiny("test_resnet")
    with pytest.raises(
        IsADirectoryError,
        match=r"is a folder, not a weights file: pass the weights file inside it \(model.safetensors\)",
    ):
        DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=path.parent)
    (path.parent / "config.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match=f"pass --teacher local-dir:{path.parent}"):
        DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=path.parent)
    config = engine.TrainConfig(teacher="resnet10t", teacher_checkpoint=str(path.parent))
    with pytest.raises(IsADirectoryError, match="is a folder"):  # the recipe's check, before any data
        engine.check_config(config)


# ------------------------------------------------------------------------------------------------
# folders: local-dir:, a run folder, save_pretrained of a wrapper


def test_save_pretrained_of_a_wrapper_publishes_the_size_it_trained_at_and_local_dir_reads_it(tmp_path):
    student = timm.create_model("test_resnet", num_classes=5)  # architecture default: 160 px
    wrapper = DistillWrapper(student, tiny("resnet10t"), loss="kd", data_config=STUDENT_CFG)
    _step(wrapper)  # trained on 32 px batches
    folder = timm_kd.save_pretrained(wrapper, tmp_path / "run" / "student")
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == list(HALF) and cfg["crop_pct"] == 1.0

    # that folder as a teacher: its config.json says 32 px, mean 0.5: no adapter for 32 px batches
    other = DistillWrapper(tiny("test_resnet"), f"local-dir:{folder}", loss="kd", data_config=STUDENT_CFG)
    assert weights_source(other.teacher.model).kind == "local-dir"
    seen = _spy(other.teacher.model)
    msgs, out = _step(other)
    assert msgs == [] and torch.equal(seen[0], out["x"])
    # at 64 px the same teacher is resized to what it was trained on, and says so
    msgs, _ = _step(other, size=64)
    assert seen[-1].shape[-2:] == (32, 32) and "resized from 64 x 64" in msgs[0]


def test_a_run_folder_as_local_dir_points_at_its_student(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"timm-kd run folder.*local-dir:{run / 'student'}"):
        resolve_model(f"local-dir:{run}", pretrained=True, role="teacher")
    with pytest.raises(FileNotFoundError, match=f"local-dir:{run / 'student'}"):
        engine.check_config(engine.TrainConfig(teacher=f"local-dir:{run}"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model(f"local-dir:{run / 'student' / '..' / '..'}", role="teacher")


def test_pretrained_weights_bring_their_config_and_random_ones_none(tmp_path):
    path, _ = _checkpoint(tmp_path)
    overlay = {"file": str(path), "input_size": (3, 48, 48), "num_classes": 5}
    net = resolve_model("resnet10t", pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay)
    src = weights_source(net)
    assert src.kind == "pretrained" and src.data_config["input_size"] == (3, 48, 48)
    assert src.data_config["mean"] == IMAGENET_MEAN
    assert weights_source(resolve_model("resnet10t", num_classes=5)).data_config == {}
    assert weights_source(timm.create_model("resnet10t")) is None  # not created by resolve_model


# ------------------------------------------------------------------------------------------------
# the engine: flags, the run header, the broken-teacher error, the cache build


def _tiny_config(tmp_path: Path, **kw) -> engine.TrainConfig:
    return engine.TrainConfig(**{**TINY_CONFIG, "output_dir": str(tmp_path / "run"), **kw})


def test_teacher_flags_state_the_teachers_input():
    config = engine.TrainConfig(
        teacher_input_size=48, teacher_mean=IMAGENET_MEAN, teacher_interpolation="bilinear"
    )
    assert teacher_data_config(config) == {
        "input_size": (3, 48, 48),
        "mean": IMAGENET_MEAN,
        "interpolation": "bilinear",
    }
    assert teacher_data_config(engine.TrainConfig()) is None


@pytest.mark.slow
def test_the_run_header_and_a_warning_say_what_the_teacher_sees(tmp_path, capsys):
    config = _tiny_config(tmp_path, teacher_input_size=48, max_train_steps=1, max_eval_steps=1, method="kd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(config)
    out = capsys.readouterr().out
    assert "teacher 'test_resnet' sees 48 x 48, resized from 32 x 32 (bicubic), not re-normalized (as " in out
    assert "2.25x the student's pixels per image" in out
    assert any("sees 48 x 48, resized from 32 x 32" in str(w.message) for w in caught)


@pytest.mark.slow
def test_a_broken_teacher_error_names_resolution_and_normalization_with_their_flags(tmp_path):
    config = _tiny_config(tmp_path, teacher_check="error", method="kd", max_eval_steps=1)
    with pytest.raises(engine.BrokenTeacherError) as e:
        engine.fit(config)
    msg = str(e.value)
    assert "input resolution and normalization: teacher 'test_resnet' sees 32 x 32 as given" in msg
    assert "--teacher-input-size, --teacher-mean, --teacher-std" in msg


@pytest.mark.slow
def test_a_cache_build_stores_the_logits_of_the_batch_as_it_is(tmp_path):
    """A checkpoint teacher without a config: the cache holds its logits of the student's views,
    not of views resized to the architecture's default size (160 px for test_resnet)."""
    path, net = _checkpoint(tmp_path / "w", name="test_resnet", num_classes=100)
    small = {"num_train": 8, "num_test": 8}
    config = _tiny_config(
        tmp_path, embedded_kwargs=small, teacher_checkpoint=str(path), pretrained_teacher=True
    )
    engine.build_teacher_cache(config, tmp_path / "c", num_views=1, top_k=100)
    cache = C.TeacherCache(tmp_path / "c")
    dc = cache.manifest["data_config"]
    train = D.load_image_dataset("embedded", "train", embedded_kwargs=small)
    tf = D.create_timm_transform(dc, is_training=True, dataset_name="embedded")
    rows = C.collate_cached([cache.dataset(train, tf, seed=config.seed)[(i, 0)] for i in range(8)])
    images = rows["pixel_values"]
    assert images.shape[-2:] == (32, 32)
    cached = C.CachedTeacher(cache)(images, **{k: rows[k] for k in C.CachedTeacher(cache).input_keys})
    with torch.no_grad():
        torch.testing.assert_close(cached, net(images), atol=5e-3, rtol=0)  # fp16 storage
