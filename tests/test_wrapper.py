"""DistillWrapper and the frozen Teacher, on real timm models (random weights, no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import timm
import torch
from _wrapper_utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    assert_same_state,
    batch,
    free_port,
    make_image,
    state_copy,
    tiny,
    write_accelerate_config,
)
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from timm.task import TrainingTask

from timm_kd import DistillWrapper, create_loss, list_losses

ROOT = Path(__file__).resolve().parents[1]
HALF = (0.5, 0.5, 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# training behaviour on several families


@pytest.mark.parametrize(
    "student_name, teacher_name",
    [
        ("test_vit", "resnet10t"),  # ViT student, BatchNorm CNN teacher, different mean/std
        ("test_resnet", "test_vit"),  # CNN student, ViT teacher
        ("test_convnext", "test_efficientnet"),  # ConvNeXt student, BN EfficientNet teacher
    ],
)
def test_training_steps_lower_loss_and_leave_teacher_untouched(student_name, teacher_name):
    student, teacher = tiny(student_name), tiny(teacher_name, size=48)  # teacher at 48 px: resize adapter on
    wrapper = DistillWrapper(
        student, teacher, loss="kd", tau=2.0, ce_weight=0.5, kd_weight=0.5, teacher_data_config=told(teacher)
    )
    before = state_copy(teacher)
    assert any(k.endswith("running_mean") for k in before) or teacher_name == "test_vit"
    opt = torch.optim.AdamW(wrapper.parameters(), lr=2e-3)
    x, y = batch()
    losses = []
    for step in range(8):
        wrapper.train()
        if step == 3:
            teacher.train()  # a user flips the teacher network itself into train mode: it must not matter
        out = wrapper(x, y)
        assert set(out) >= {"loss", "ce", "kd", "output", "teacher_output"}
        assert out["teacher_output"].shape == out["output"].shape == (8, 5)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        assert not wrapper.teacher.training and not any(m.training for m in teacher.modules())
    assert losses[-1] < 0.7 * losses[0], losses
    assert_same_state(before, teacher.state_dict())  # weights and BatchNorm running statistics
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_parameters_and_state_dict_hold_only_the_student():
    student, teacher = tiny("test_resnet"), tiny("resnet10t")
    wrapper = DistillWrapper(student, teacher, loss="kd")
    assert {id(p) for p in wrapper.parameters()} == {id(p) for p in student.parameters()}
    assert {id(p) for p in teacher.parameters()}.isdisjoint(id(p) for p in wrapper.parameters())
    keys = set(wrapper.state_dict())
    assert keys == {f"student.{k}" for k in student.state_dict()}
    assert set(wrapper.student_state_dict()) == set(student.state_dict())
    assert teacher not in set(wrapper.modules())
    assert wrapper.get_trainable_module() is student and wrapper.get_eval_model() is student
    assert isinstance(wrapper, TrainingTask)
    # train()/eval() on the wrapper never reach into the teacher
    wrapper.train()
    assert student.training and not any(m.training for m in teacher.modules())
    # assigning the trainable module (timm's name) replaces the student
    other = tiny("test_resnet")
    wrapper.trainable_module = other
    assert wrapper.student is other and "trainable_module" not in wrapper._modules
    with pytest.raises(TypeError, match="Teacher"):
        wrapper.teacher = tiny("resnet10t")


def test_to_reaches_the_teacher_and_teacher_dtype_sticks():
    wrapper = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd")
    wrapper.to(torch.float64)
    assert next(wrapper.teacher.parameters()).dtype == torch.float64
    assert next(wrapper.student.parameters()).dtype == torch.float64
    wrapper.to(torch.float32)

    bf16 = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd", teacher_dtype="bfloat16")
    bf16.float()
    assert next(bf16.teacher.parameters()).dtype == torch.bfloat16
    x, y = batch()
    out = bf16(x, y)
    assert out["teacher_output"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_autocast_and_float32_teacher():
    teacher = tiny("resnet10t")
    wrapper = DistillWrapper(tiny("test_vit"), teacher, loss="kd", teacher_dtype=torch.float32)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapper(x, y)
    assert out["output"].dtype == torch.bfloat16  # the student follows the autocast
    with torch.no_grad():  # the teacher ran in full float32 despite it
        expected = teacher(wrapper.teacher.adapt(x))
    torch.testing.assert_close(out["teacher_output"], expected, rtol=0, atol=0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    # bf16 images (a student kept in bf16) reach a float32 teacher without autocast
    plain = DistillWrapper(tiny("test_vit"), teacher, loss="kd")
    torch.testing.assert_close(plain.teacher_logits(x.bfloat16()), expected, rtol=0.05, atol=0.05)


def test_channels_last_and_compiled_teacher_give_the_same_logits():
    x, _ = batch()
    plain = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd")
    ref = plain.teacher_logits(x)
    cl = DistillWrapper(
        tiny("test_resnet"),
        tiny("resnet10t"),
        loss="kd",
        teacher_channels_last=True,
        compile_teacher={"backend": "eager"},
    )
    assert cl.teacher._compiled is not None
    torch.testing.assert_close(cl.teacher_logits(x), ref, rtol=1e-4, atol=1e-5)


def _compile_raising_at_call(model, **kwargs):
    raise RuntimeError("Dynamo is not supported on this Python version")


def _compile_raising_at_first_batch(model, **kwargs):
    def run(*args, **kw):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config")

    return run


@pytest.mark.parametrize("broken", [_compile_raising_at_call, _compile_raising_at_first_batch])
def test_teacher_that_cannot_compile_warns_once_and_runs_eager(monkeypatch, broken):
    x, _ = batch()
    ref = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd").teacher_logits(x)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match=r"torch.compile of teacher .*failed .*runs eager.*C\+\+ compiler"):
        wrapper = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd", compile_teacher=True)
        out = wrapper.teacher_logits(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert wrapper.teacher._compiled is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later batches run eager silently
        torch.testing.assert_close(wrapper.teacher_logits(x), ref, rtol=0, atol=0)


_BUILTIN_LOSSES = ("kd", "ats", "isats", "dtkd", "dkd", "dist", "lskd")
_HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("name", _BUILTIN_LOSSES)
def test_a_training_step_never_reads_a_tensor_back_to_the_host(monkeypatch, name):
    """Teacher adapters (resize + re-normalize + class map), teacher, student, loss and backward call
    none of ``.item()``, ``bool()``, ``int()``, ``float()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` on
    a tensor: on a GPU each would stall the step until the device catches up. (The engine creates
    the losses with ``check_inputs=False`` and checks finiteness at logging steps only.)"""
    if name not in list_losses():
        pytest.skip(f"loss {name!r} not registered")
    teacher = tiny("resnet10t", num_classes=7, size=48, mean=HALF, std=HALF)
    wrapper = DistillWrapper(
        tiny("test_resnet"),
        teacher,
        loss=name,
        class_map=[6, 0, 2, 4, 1],
        check_inputs=False,
        teacher_data_config=told(teacher),
    )
    wrapper.train()
    x, y = batch()
    calls: list[str] = []

    def spy(attr, orig):
        def f(self, *args, **kwargs):
            calls.append(attr)
            return orig(self, *args, **kwargs)

        return f

    for attr in _HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, attr, spy(attr, getattr(torch.Tensor, attr)))
    out = wrapper(x, y, epoch=30.0)
    out["loss"].backward()
    monkeypatch.undo()
    assert calls == [], f"{name}: host syncs in the step: {calls}"
    assert torch.isfinite(out["loss"])  # the spy saw real work


# ------------------------------------------------------------------------------------------------
# the output is the loss on the two models' logits


@pytest.mark.parametrize("name", ["kd", "ats", "dtkd", "dkd", "dist"])
def test_output_equals_loss_on_the_two_models_logits(name):
    if name not in list_losses():
        pytest.skip(f"loss {name!r} not registered yet")
    student, teacher = tiny("test_resnet", mean=HALF, std=HALF), tiny("test_vit", mean=HALF, std=HALF)
    wrapper = DistillWrapper(student, teacher, loss=name)
    x, y = batch()
    out = wrapper(x, y, epoch=3.0)
    zs = student(x)
    with torch.no_grad():
        zt = teacher(x)  # same mean/std/size: no adapter acts, the teacher sees x itself
    direct = create_loss(name)(zs, zt, y, epoch=3.0)
    torch.testing.assert_close(out["teacher_output"], zt, rtol=0, atol=0)
    torch.testing.assert_close(out["output"], zs, rtol=0, atol=0)
    for key, value in direct.items():
        torch.testing.assert_close(out[key], value, rtol=0, atol=0)
    g_wrapper = torch.autograd.grad(out["loss"], list(student.parameters()))
    g_direct = torch.autograd.grad(direct["loss"], list(student.parameters()))
    for a, b in zip(g_wrapper, g_direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_live_teacher_takes_no_teacher_inputs():
    wrapper = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd")
    assert wrapper.teacher_input_keys == ()
    x, y = batch()
    with pytest.raises(TypeError, match=r"takes only the images; got teacher inputs \['teacher_lse'\]"):
        wrapper(x, y, teacher_lse=torch.zeros(8))


def test_loss_object_and_loss_kwargs_errors():
    loss = create_loss("kd", tau=1.0)
    wrapper = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss=loss)
    assert wrapper.loss_fn is loss and wrapper.loss_name == "kd"
    with pytest.raises(TypeError, match="loss object"):
        DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss=loss, tau=2.0)
    with pytest.raises(TypeError, match="taux"):
        DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd", taux=2.0)
    # checked before any model is built: offline, a download attempt would raise something else
    with pytest.raises(TypeError, match="taux"):
        DistillWrapper("resnet18", "resnet50", loss="kd", student_pretrained=True, taux=2.0)
    with pytest.raises(ValueError, match="unknown loss"):
        DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kdd")


# ------------------------------------------------------------------------------------------------
# input adapters against timm's own transforms


def told(model):
    """What a user who knows the teacher's weights passes: its own data config."""
    return resolve_data_config(model=model)


def _timm_eval_tensor(model, image):
    return create_transform(**resolve_data_config(model=model))(image).unsqueeze(0)


def test_normalization_adapter_gives_the_teachers_own_tensor():
    image = make_image()
    same_view = {"crop_pct": 0.9, "interpolation": "bicubic"}
    student = tiny("test_resnet", size=48, mean=HALF, std=HALF, **same_view)
    teacher = tiny("test_convnext", size=48, mean=IMAGENET_MEAN, std=IMAGENET_STD, **same_view)
    wrapper = DistillWrapper(student, teacher, loss="kd", teacher_data_config=told(teacher))
    x_student, x_teacher = _timm_eval_tensor(student, image), _timm_eval_tensor(teacher, image)
    assert (x_student - x_teacher).abs().max() > 0.05  # the two configs really differ
    # float32 vs float32 by two formulas (an affine map of the student's tensor, timm's normalize)
    torch.testing.assert_close(wrapper.teacher.adapt(x_student), x_teacher, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            wrapper.teacher_logits(x_student), teacher(x_teacher), rtol=1e-5, atol=1e-5
        )
    # switched off: the teacher sees the student's tensor as it is
    off = DistillWrapper(
        student, teacher, loss="kd", adapt_normalization=False, teacher_data_config=told(teacher)
    )
    assert off.teacher.adapt(x_student) is x_student


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("student_size, teacher_size", [(64, 32), (64, 40), (32, 48)])
def test_resolution_adapter_matches_timm_transform_up_to_uint8_rounding(
    interpolation, student_size, teacher_size
):
    # The image is at the student's resolution, so the student's tensor holds all of its information
    # and the teacher's own transform (PIL resize from the same pixels) is the exact target.
    image = make_image(student_size, student_size, seed=1)
    student = tiny(
        "test_resnet", size=student_size, mean=HALF, std=HALF, crop_pct=1.0, interpolation=interpolation
    )
    teacher = tiny(
        "resnet10t",
        size=teacher_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=1.0,
        interpolation=interpolation,
    )
    wrapper = DistillWrapper(student, teacher, loss="kd", teacher_data_config=told(teacher))
    x_student, x_teacher = _timm_eval_tensor(student, image), _timm_eval_tensor(teacher, image)
    assert x_teacher.shape[-1] == teacher_size
    seen = wrapper.teacher.adapt(x_student)
    assert seen.shape == x_teacher.shape
    err = (seen - x_teacher) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)  # back to pixel units
    assert err.abs().max() * 255 < 1.15  # PIL rounds to uint8 after each of its two passes
    assert err.abs().mean() * 255 < 0.4


def test_fixed_size_vit_teacher_is_fed_its_own_size():
    # img_size=48 without dynamic size: the ViT refuses anything else, whatever its pretrained_cfg says
    teacher = timm.create_model("test_vit", num_classes=5, img_size=48, dynamic_img_size=False)
    assert resolve_data_config(model=teacher)["input_size"][-1] != 48
    wrapper = DistillWrapper(tiny("test_resnet"), teacher, loss="kd")
    assert wrapper.teacher.input_size == (48, 48)
    x, y = batch(size=32)
    assert wrapper(x, y)["teacher_output"].shape == (8, 5)


def test_active_adapters_warn_once_per_batch_size():
    teacher = tiny("resnet10t", size=48)
    wrapper = DistillWrapper(tiny("test_vit"), teacher, loss="kd", teacher_data_config=told(teacher))
    x, y = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            wrapper(x, y)
    messages = [str(w.message) for w in caught if "teacher" in str(w.message)]
    assert len(messages) == 1, messages
    assert "sees 48 x 48, resized from 32 x 32 (bicubic), re-normalized to mean" in messages[0]
    assert "2.25x the student's pixels per image" in messages[0]
    assert "--teacher-input-size 32" in messages[0]


# ------------------------------------------------------------------------------------------------
# label spaces and construction errors


def test_class_map_selects_the_students_classes_from_a_superset_teacher():
    teacher = tiny("resnet10t", num_classes=20)
    class_map = [3, 7, 11, 2, 19]
    wrapper = DistillWrapper(tiny("test_resnet"), teacher, loss="kd", class_map=class_map)
    x, y = batch()
    out = wrapper(x, y)
    with torch.no_grad():
        full = teacher(wrapper.teacher.adapt(x))
    torch.testing.assert_close(out["teacher_output"], full[:, class_map], rtol=0, atol=0)
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize(
    "class_map, match",
    [
        ([1, 2, 3], "3 entries but the student predicts 5"),
        ([1, 2, 3, 4, 20], "outside \\[0, 20\\)"),
        ([1, 2, 3, 3, 4], "same teacher class 3"),
        ([0.5] * 5, "integer"),
    ],
)
def test_bad_class_map_is_refused(class_map, match):
    with pytest.raises(ValueError, match=match):
        DistillWrapper(tiny("test_resnet"), tiny("resnet10t", num_classes=20), loss="kd", class_map=class_map)


def test_class_count_mismatch_fails_at_construction_and_says_how_to_fix():
    with pytest.raises(ValueError) as e:
        DistillWrapper(tiny("test_resnet", num_classes=5), tiny("resnet10t", num_classes=20), loss="kd")
    msg = str(e.value)
    assert "predicts 20 classes but the student predicts 5" in msg
    assert "class_map=" in msg and "num_classes=20" in msg
    # a named pretrained teacher is checked from timm's registry metadata, before any download
    # (HF_HUB_OFFLINE=1 here: reaching the download would raise a different error)
    with pytest.raises(ValueError, match="'resnet50' predicts 1000 classes but the student predicts 5"):
        DistillWrapper(tiny("test_resnet", num_classes=5), "resnet50", loss="kd")
    with pytest.raises(ValueError, match="would replace the pretrained teacher's classifier"):
        DistillWrapper(tiny("test_resnet"), "resnet50", loss="kd", teacher_kwargs={"num_classes": 5})
    with pytest.raises(ValueError, match="fine-tune the teacher"):
        DistillWrapper(tiny("test_resnet", num_classes=20), tiny("resnet10t", num_classes=5), loss="kd")


def test_channel_mismatch_fails_at_construction_and_says_how_to_fix():
    student = timm.create_model("test_resnet", num_classes=5, in_chans=1)
    with pytest.raises(ValueError) as e:
        DistillWrapper(student, tiny("resnet10t"), loss="kd")
    assert "takes 3-channel images but the student takes 1" in str(e.value)
    assert "teacher_kwargs={'in_chans': 1}" in str(e.value)
    # the suggested fix works, once the one-channel normalization is spelled out too
    gray = {"input_size": (1, 32, 32), "mean": (0.5,), "std": (0.5,)}
    fixed = dict(
        loss="kd", teacher_pretrained=False, teacher_kwargs={"in_chans": 1}, teacher_data_config=gray
    )
    with pytest.raises(ValueError, match="data_config="):
        DistillWrapper(student, "resnet10t", **fixed)  # timm's cfg for in_chans=1 still has 3 means
    wrapper = DistillWrapper(student, "resnet10t", data_config=gray, **fixed)
    x = torch.randn(2, 1, 32, 32)
    assert wrapper(x, torch.tensor([0, 1]))["teacher_output"].shape == (2, 5)


# ------------------------------------------------------------------------------------------------
# creating models from names, checkpoints, local dirs and the Hub cache


def test_teacher_checkpoint_safetensors_keeps_its_head(tmp_path):
    trained = tiny("resnet10t", num_classes=7)
    path = tmp_path / "teacher.safetensors"
    save_file(trained.state_dict(), str(path))
    student = tiny("test_resnet", num_classes=7)
    # teacher_pretrained=True (the default) is ignored: nothing is downloaded (HF_HUB_OFFLINE=1 here)
    wrapper = DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=path)
    assert_same_state(trained.state_dict(), wrapper.teacher.model.state_dict())
    assert wrapper.teacher.num_classes == 7
    # a torch file is read with weights_only=True
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "teacher.pth")
    wrapper = DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=tmp_path / "teacher.pth")
    assert_same_state(trained.state_dict(), wrapper.teacher.model.state_dict())
    with pytest.raises(FileNotFoundError):
        DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder, not a weights file: pass the weights file"):
        DistillWrapper(student, "resnet10t", loss="kd", teacher_checkpoint=tmp_path)


def test_student_checkpoint_with_new_head(tmp_path):
    source = timm.create_model("test_vit", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "s.safetensors"))
    wrapper = DistillWrapper(
        "test_vit",
        tiny("resnet10t", num_classes=5),
        loss="kd",
        num_classes=5,
        student_checkpoint=tmp_path / "s.safetensors",
    )
    got = wrapper.student_state_dict()
    assert got["head.weight"].shape == (5, 64)
    for k, v in source.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k


def test_local_dir_and_hf_hub_teachers(tmp_path):
    from timm.models import save_for_hf

    trained = timm.create_model(
        "test_resnet", num_classes=5, pretrained_cfg_overlay={"input_size": (3, 32, 32)}
    )
    save_for_hf(trained, tmp_path / "teacher", safe_serialization=True)
    wrapper = DistillWrapper(tiny("test_vit"), f"local-dir:{tmp_path / 'teacher'}", loss="kd")
    assert_same_state(trained.state_dict(), wrapper.teacher.model.state_dict())

    # The same folder as an offline Hub cache entry, loaded through timm's hf-hub: path.
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--kd-tests--tiny-teacher"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((tmp_path / "teacher" / f).read_bytes())
    wrapper = DistillWrapper(tiny("test_vit"), "hf-hub:kd-tests/tiny-teacher", loss="kd")
    assert_same_state(trained.state_dict(), wrapper.teacher.model.state_dict())
    x, y = batch()
    assert torch.isfinite(wrapper(x, y)["loss"])


def test_named_student_and_teacher_without_weights():
    wrapper = DistillWrapper(
        "test_vit",
        "test_resnet",
        loss="kd",
        num_classes=5,
        teacher_pretrained=False,
        student_kwargs={"img_size": 32},
        teacher_kwargs={"pretrained_cfg_overlay": {"input_size": (3, 32, 32)}},
    )
    assert wrapper.student_name == "test_vit" and wrapper.teacher_name == "test_resnet"
    assert wrapper.teacher.num_classes == 5  # a teacher without weights follows the student's classes
    x, y = batch()
    assert wrapper(x, y)["output"].shape == (8, 5)
    with pytest.raises(ValueError, match="reset_classifier"):
        DistillWrapper(tiny("test_vit", num_classes=5), tiny("resnet10t"), loss="kd", num_classes=7)


# ------------------------------------------------------------------------------------------------
# the student leaves as a plain timm model


@pytest.mark.slow
def test_student_state_dict_loads_into_plain_timm_without_timm_kd(tmp_path):
    wrapper = DistillWrapper(
        "test_vit", tiny("resnet10t"), loss="kd", num_classes=5, student_kwargs={"img_size": 32}
    )
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    x, y = batch()
    wrapper(x, y)["loss"].backward()
    opt.step()
    wrapper.student = torch.compile(wrapper.student)  # wrapped keys (_orig_mod.) must not leak
    assert all(k.startswith("student._orig_mod.") for k in wrapper.state_dict())
    sd = wrapper.student_state_dict()
    assert not any(k.startswith(("student.", "_orig_mod.", "module.")) for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    wrapper.eval()
    with torch.no_grad():
        expected = torch.compiler.disable(wrapper.get_eval_model())(x)
    save_file({"x": x, "logits": expected}, str(tmp_path / "io.safetensors"))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["timm_kd"] = None  # importing timm_kd now fails
        import timm, torch
        from safetensors.torch import load_file
        model = timm.create_model("test_vit", num_classes=5, img_size=32)
        model.load_state_dict(load_file({str(tmp_path / "model.safetensors")!r}), strict=True)
        model.eval()
        io = load_file({str(tmp_path / "io.safetensors")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(io["x"]), io["logits"], rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# timm TrainingTask hooks: DDP of the student only, EMA, compile, checkpoint state


def test_prepare_distributed_ema_and_checkpoint_state():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    student = tiny("test_vit")
    wrapper = DistillWrapper(student, tiny("resnet10t"), loss="kd")
    wrapper.setup_ema(decay=0.5)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapper.prepare_distributed(device_ids=[0])
        assert isinstance(wrapper.student, DistributedDataParallel)
        assert wrapper.get_trainable_module() is wrapper.student
        assert not isinstance(wrapper.teacher.model, DistributedDataParallel)
        assert wrapper.get_eval_model() is student
        x, y = batch()
        with wrapper.no_sync():
            pass
        out = wrapper(x, y)
        out["loss"].backward()
        torch.optim.SGD(wrapper.parameters(), lr=0.5).step()
        wrapper.update_ema()
        state = wrapper.get_checkpoint_state()
        assert set(state["state_dict"]) == set(student.state_dict())
        assert set(wrapper.student_state_dict()) == set(student.state_dict())
        ema = wrapper.student_state_dict(ema=True)
        assert set(ema) == set(student.state_dict())
        assert not torch.equal(ema["head.weight"], student.state_dict()["head.weight"])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compile_hook_runs_student_and_teacher_compiled():
    wrapper = DistillWrapper(tiny("test_resnet"), tiny("resnet10t"), loss="kd")
    x, y = batch()
    ref = wrapper(x, y)["loss"].item()
    eval_model = wrapper.compile(backend="eager")
    assert eval_model is wrapper.student and hasattr(wrapper.student, "_orig_mod")
    assert wrapper.teacher._compiled is not None
    out = wrapper(x, y)
    out["loss"].backward()
    assert abs(out["loss"].item() - ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# two real processes under accelerate launch


@pytest.mark.slow
def test_accelerate_two_processes_match_one_process_step(tmp_path):
    setup = {
        "student": "test_vit",
        "teacher": "resnet10t",
        "num_classes": 5,
        "lr": 0.5,
        "student_kwargs": {"img_size": 32},
        "teacher_kwargs": {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}},
    }
    (tmp_path / "setup.json").write_text(json.dumps(setup))
    torch.manual_seed(1)
    save_file(
        timm.create_model("test_vit", num_classes=5, img_size=32).state_dict(),
        str(tmp_path / "student.safetensors"),
    )
    save_file(
        timm.create_model("resnet10t", num_classes=5).state_dict(), str(tmp_path / "teacher.safetensors")
    )
    x, y = batch(n=8)
    save_file({"images": x, "target": y}, str(tmp_path / "batch.safetensors"))

    cfg = write_accelerate_config(tmp_path / "accelerate.yaml")
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(cfg),
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "tests" / "scripts" / "wrapper_ddp_step.py"),
        str(tmp_path),
    ]
    # Without ACCELERATE_USE_CPU, `--multi_gpu` on a machine without GPUs starts two processes that
    # each believe they are alone (DistributedType.NO): no DDP, no gradient sync. The report catches it.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    reports = json.loads((tmp_path / "report.json").read_text())
    assert len(reports) == 2
    for r in reports:
        assert r["num_processes"] == 2 and r["backend"] == "gloo"
        assert r["student_is_ddp"] and not r["teacher_has_ddp"]
        assert not r["teacher_requires_grad"] and not r["teacher_training"] and r["teacher_unchanged"]
        assert r["optimizer_params"] == r["student_params"]

    # The same step in one process on the whole global batch.
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    try:
        from wrapper_ddp_step import build
    finally:
        sys.path.pop(0)
    wrapper = build(tmp_path)
    opt = torch.optim.SGD(wrapper.student.parameters(), lr=setup["lr"])
    wrapper.train()
    wrapper(x, y)["loss"].backward()
    opt.step()
    ddp = load_file(str(tmp_path / "student_after.safetensors"))
    single = wrapper.student_state_dict()
    init = load_file(str(tmp_path / "student.safetensors"))
    assert ddp.keys() == single.keys()
    moved = max((single[k] - init[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # the step did something
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=0, atol=1e-5, msg=k)
