"""Teacher-output cache (timm_kd.cache, engine.build_teacher_cache): top-k compression, view replay, build,
resume, CachedTeacher and cached training."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from _engine_utils import RECIPES, TINY, TINY_CONFIG, launch, output, sigkill_tree, subprocess_env

import timm_kd
import timm_kd.cli
from timm_kd import cache as C
from timm_kd import data as D
from timm_kd import engine
from timm_kd.cache.logits import _fill_tail
from timm_kd.engine import setup as engine_setup
from timm_kd.losses import is_loss

BUILTIN_LOSSES = ["ats", "dist", "dkd", "dtkd", "isats", "kd", "lskd"]
TIMM_KD = str(Path(sys.executable).parent / "timm-kd")

#: a tiny run with crops, flips and colour jitter, so every replayable step is exercised
CONFIG = engine.TrainConfig(
    **{
        **TINY_CONFIG,
        "embedded_kwargs": {"num_train": 48, "num_test": 20},
        "interpolation": "bilinear",
        "hflip": 0.5,
        "color_jitter": 0.3,
        "epochs": 2,
        "method": "kd",
        "max_eval_steps": 1,
    }
)
FLAGS = [
    "--dataset", "embedded", "--embedded-arg", "num_train=48", "--embedded-arg", "num_test=20",
    "--teacher", "test_resnet", "--student", "test_resnet", "--no-pretrained-teacher",
    "--input-size", "32", "--crop-pct", "1", "--hflip", "0.5", "--color-jitter", "0.3",
    "--interpolation", "bilinear", "--batch-size", "8", "--num-workers", "0", "--no-progress",
]  # fmt: skip
BUILD = dict(num_views=2, top_k=5, shard_size=20)


def _rows(cache_dir: Path) -> str:
    """Every row of a cache as JSON text (NaN jitter factors compare equal this way)."""
    return json.dumps(datasets.load_dataset(str(cache_dir), split="train").to_dict())


def _assert_same_cache(a: Path, b: Path) -> None:
    """Same views exactly; same teacher logits up to float noise (another process, batch or thread
    count changes the last bits; compared after expansion, so near-ties swapping at the k-th place
    do not matter)."""
    da = datasets.load_dataset(str(a), split="train")
    db = datasets.load_dataset(str(b), split="train")
    exact = ["index", "view", "label", "crop", "hflip", "vflip", "interpolation", "jitter_order"]
    assert json.dumps(da.select_columns(exact).to_dict()) == json.dumps(db.select_columns(exact).to_dict())
    ra, rb = da.with_format("torch")[:], db.with_format("torch")[:]
    assert torch.equal(ra["jitter"].isnan(), rb["jitter"].isnan())
    assert torch.equal(ra["jitter"].nan_to_num(), rb["jitter"].nan_to_num())
    za, zb = (C.expand_logits(r["values"], r["indices"], 100, r["lse"], r["tail_lse"]) for r in (ra, rb))
    assert torch.allclose(za, zb, atol=2e-3), (za - zb).abs().max()
    pa, pb = C.TeacherCache(a).tail_prior, C.TeacherCache(b).tail_prior
    assert pa is not None and torch.allclose(pa, pb, atol=1e-3), (pa - pb).abs().max()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    engine.build_teacher_cache(CONFIG, out, **BUILD)
    return out


# ------------------------------------------------------------------------------------------------
# compress / expand


@pytest.mark.parametrize("num_classes,dtype", [(100, torch.int16), (40_000, torch.int32)])
def test_compress_expand_round_trip(num_classes, dtype):
    z = torch.randn(6, num_classes) * 3
    packed = C.compress_logits(z, 10)
    assert packed["values"].dtype == torch.float16 and packed["values"].shape == (6, 10)
    assert packed["indices"].dtype == dtype and packed["lse"].dtype == torch.float32
    top = z.topk(10, dim=1)
    assert torch.equal(packed["indices"].long(), top.indices)
    assert torch.allclose(packed["lse"], torch.logsumexp(z, 1))
    rest = torch.ones_like(z, dtype=torch.bool).scatter_(1, top.indices, False)
    p = z.softmax(1)
    p_rest = p[rest].view(6, -1).sum(1)
    assert torch.allclose(packed["tail_lse"].exp(), (z.exp() * rest).sum(1), rtol=1e-4)
    # with tail_lse the dropped mass is exact; from lse alone it is 1 - sum(fp16 top-k probs)
    for lses, mass_rtol in (((packed["lse"], packed["tail_lse"]), 1e-2), ((packed["lse"],), 0.5)):
        full = C.expand_logits(packed["values"], packed["indices"], num_classes, *lses)
        assert full.dtype == torch.float32 and full.shape == z.shape
        # kept entries exact (fp16), so the same top-k probabilities at T = 1
        assert torch.equal(full.gather(1, top.indices), packed["values"].float())
        assert torch.allclose(torch.logsumexp(full, 1), packed["lse"], atol=2e-2)
        q = full.softmax(1)
        assert torch.allclose(q.gather(1, top.indices), p.gather(1, top.indices), rtol=3e-2, atol=1e-6)
        # the dropped mass is spread uniformly over the other classes
        q_rest = q[rest].view(6, -1)
        assert torch.allclose(q_rest, q_rest[:, :1].expand_as(q_rest))
        mass = full[rest].view(6, -1).logsumexp(1) - torch.logsumexp(full, 1)
        assert torch.allclose(mass.exp(), p_rest, rtol=mass_rtol), lses


def test_expand_with_all_classes_is_the_fp16_input_and_without_lse_uses_the_margin():
    z = torch.randn(4, 20) * 2
    packed = C.compress_logits(z, 20)
    assert torch.equal(C.expand_logits(packed["values"], packed["indices"], 20), z.half().float())
    packed = C.compress_logits(z, 3)
    full = C.expand_logits(packed["values"], packed["indices"], 20)
    fill = packed["values"].float().min(1).values - C.NO_LSE_MARGIN
    rest = torch.ones_like(z, dtype=torch.bool).scatter_(1, packed["indices"].long(), False)
    assert torch.equal(full[rest].view(4, -1), fill[:, None].expand(4, 17))


@pytest.mark.parametrize("k", [0, -1, 21])
def test_bad_k_is_refused_with_the_valid_range(k):
    with pytest.raises(ValueError, match=r"1 <= k <= num_classes \(20\)"):
        C.compress_logits(torch.randn(2, 20), k)
    with pytest.raises(TypeError, match="int"):
        C.compress_logits(torch.randn(2, 20), 2.0)


def test_bad_top_k_is_refused_by_cache_teacher_before_any_teacher_runs(tmp_path, capsys):
    code = timm_kd.cli.main(["cache-teacher", "--cache-dir", str(tmp_path / "c"), "--top-k", "101", *FLAGS])
    assert code == 2  # a user error: one line, status 2 (timm_kd.cli)
    assert "1 <= k <= num_classes (100), got k=101" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# measured on these peaked logits (epoch 30: warm-ups done), bounds ~1.4x the measurement; docs/cache.md
# has the numbers on trained models. grad_rel_err = ||g_k - g|| / ||g||, the gradient w.r.t. the student
# logits at k = 10 of 100 classes. Losses that read the wrong classes at T = 4 (kd, dkd's NCKD, dtkd) or
# standardize the logits (lskd) lose most to the flat tail; ats/isats/dist almost nothing.
GRAD_BOUNDS = {"ats": 0.04, "isats": 0.04, "dist": 0.05, "dkd": 0.55, "dtkd": 0.45, "kd": 0.45, "lskd": 2.3}


def _peaked(b: int, c: int, correct: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (b,), generator=g)
    z = torch.randn(b, c, generator=g) * 1.5
    z[torch.arange(b), y] += correct
    return z, y


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_topk_approximation_error_is_bounded_and_vanishes_at_k_equals_c(name):
    zt, y = _peaked(128, 100, 6.0, 0)
    zs, _ = _peaked(128, 100, 3.0, 1)
    loss = timm_kd.create_loss(name)
    err = C.topk_error(loss, zs, zt, y, 10, epoch=30.0)
    assert math.isfinite(err["loss_topk"])
    assert err["grad_rel_err"] < GRAD_BOUNDS[name], err
    assert err["grad_cos"] > 0.85, err
    exact = C.topk_error(loss, zs, zt, y, 100, epoch=30.0)  # only fp16 rounding left
    assert exact["grad_rel_err"] < 1e-3 and exact["loss_rel_err"] < 1e-3, exact


def _structured(n: int, c: int, seed: int, similarity: torch.Tensor):
    """Logits of a teacher that knows which classes look alike: the label's similarity row + noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = similarity[y] + 0.4 * torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += 5.0
    return z, y


def test_fill_tail_holds_the_cap_keeps_the_mass_and_stays_finite_when_every_entry_is_held():
    shape = torch.tensor([[0.0, 3.0, 2.0, -1.0, float("-inf")], [1.0, 1.0, 1.0, 1.0, float("-inf")]])
    cap = torch.tensor([[0.5], [0.0]])
    # row 0: room below the cap; row 1: the mass is exactly 4 entries at the cap (all held)
    tail = torch.tensor([[1.2], [math.log(4.0)]])
    out = _fill_tail(shape, tail, cap)
    dropped = out[:, :4]
    assert torch.isfinite(dropped).all() and (dropped <= cap).all()
    assert torch.allclose(dropped.logsumexp(1, keepdim=True), tail, atol=1e-5)
    assert torch.equal(dropped[1], torch.zeros(4))  # every entry at the cap
    # row 0: the plain shift would lift the largest entry to 0.85 > 0.5: it is held at the cap and the
    # other three, shifted up together, keep the shape among themselves
    assert torch.equal(dropped[0] == cap[0], torch.tensor([False, True, False, False]))
    assert torch.allclose(dropped[0, [0, 2]] - dropped[0, 3], torch.tensor([1.0, 3.0]), atol=1e-5)


def test_tail_prior_keeps_the_mass_takes_the_priors_shape_and_cuts_the_error():
    c, k = 100, 10
    similarity = torch.randn(c, c, generator=torch.Generator().manual_seed(7)) * 1.5
    train, _ = _structured(3000, c, 0, similarity)
    prior = C.TailPrior(c)
    for chunk in train.split(1000):  # batches add up like one pass
        prior.add(chunk)
    table = prior.table()
    one = C.TailPrior(c)
    one.add(train)
    assert torch.allclose(table, one.table(), atol=1e-6)
    top1 = train.argmax(1)
    assert torch.allclose(table[top1[0]], train[top1 == top1[0]].log_softmax(1).mean(0), atol=1e-5)

    z, y = _structured(256, c, 1, similarity)
    packed = C.compress_logits(z, k)
    idx = packed["indices"].long()
    full = C.expand_logits(packed["values"], packed["indices"], c, packed["lse"], packed["tail_lse"], table)
    assert torch.equal(full.gather(1, idx), packed["values"].float())  # kept entries as stored
    dropped = torch.ones_like(z, dtype=torch.bool).scatter_(1, idx, False)
    vmin = packed["values"].float().min(1, keepdim=True).values
    # the tail's mass is the teacher's, and no dropped class climbs above the smallest kept one
    tail_mass = full.masked_fill(~dropped, float("-inf")).logsumexp(1)
    assert torch.allclose(tail_mass, packed["tail_lse"], atol=1e-4)
    assert torch.allclose(full.logsumexp(1), packed["lse"], atol=5e-3)  # fp16 rounding of the top values
    assert (full.masked_fill(~dropped, float("-inf")) <= vmin).all()
    # the prior's shape: below the cap, the rebuilt tail is the prior row shifted by one number per row
    free = dropped & (full < vmin)
    held = dropped & (full == vmin)
    assert held.any(1).float().mean() > 0.3  # on these logits the cap binds often: the test exercises it
    offset = (full - table[idx[:, 0]]).masked_fill(~free, float("nan"))
    spread = offset.nan_to_num(-1e9).amax(1) - offset.nan_to_num(1e9).amin(1)
    assert (spread[free.any(1)] < 1e-4).all()
    # every loss gets a gradient closer to the full teacher's (measured 0.59-0.85 x the flat tail's
    # error: kd 0.50 -> 0.29, dkd 0.60 -> 0.35, dtkd 0.46 -> 0.22, lskd 2.13 -> 0.48, ats 0.037 -> 0.022)
    zs = 0.5 * z + torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
    for name in BUILTIN_LOSSES:
        loss = timm_kd.create_loss(name)
        flat = C.topk_error(loss, zs, z, y, k, epoch=30.0)["grad_rel_err"]
        shaped = C.topk_error(loss, zs, z, y, k, epoch=30.0, tail_prior=table)["grad_rel_err"]
        assert shaped < 0.75 * flat, (name, shaped, flat)
    with pytest.raises(ValueError, match=r"tail_prior must be \[C, C\] = \[100, 100\]"):
        C.expand_logits(packed["values"], packed["indices"], c, packed["lse"], packed["tail_lse"], table[:50])


# ------------------------------------------------------------------------------------------------
# replay


def test_replayed_views_equal_the_transform_under_the_same_seed():
    images = D.make_embedded_dataset("train", num_train=4, num_test=1)
    tf = D.create_timm_transform(
        {"input_size": (3, 24, 24), "interpolation": "random", "mean": (0.5,) * 3, "std": (0.5,) * 3,
         "crop_pct": 1.0},
        is_training=True, hflip=0.5, vflip=0.5, color_jitter=0.4,
    )  # fmt: skip
    replay = C.ReplayTransform(tf)
    flips = set()
    for i in range(4):
        image = images[i]["image"].convert("RGB")
        for seed in range(6):
            expected = D.seeded_transform(tf, image, seed)
            pixels, params = D.seeded_transform(replay, image, seed)
            assert torch.equal(pixels, expected)
            again, same = replay.replay(image, params)  # no RNG involved
            assert torch.equal(again, expected) and same == params
            flips.add(params["hflip"])
            assert params["crop"][2] > 0 and not math.isnan(params["jitter"][0])
    assert flips == {True, False}


@pytest.mark.parametrize(
    "kwargs,hint", [({"auto_augment": "rand-m9-mstd0.5"}, "--aa"), ({"re_prob": 0.25}, "--reprob 0")]
)
def test_unreplayable_augmentation_is_refused(kwargs, hint):
    tf = D.create_timm_transform({"input_size": (3, 32, 32)}, is_training=True, **kwargs)
    with pytest.raises(ValueError, match="cannot record and replay") as e:
        C.ReplayTransform(tf)
    assert hint in str(e.value)


# ------------------------------------------------------------------------------------------------
# build, format, replay parity with online training


def test_cache_loads_with_datasets_and_holds_every_view_in_order(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["num_rows"] == 96
    assert manifest["num_classes"] == 100 and manifest["top_k"] == 5 and manifest["index_dtype"] == "int16"
    assert sorted(p.name for p in (built / "data").iterdir()) == manifest["shards"]
    ds = datasets.load_dataset(str(built), split="train")
    assert len(ds) == 96
    assert ds.features["values"].feature.dtype == "float16"
    assert ds.features["indices"].feature.dtype == "int16"
    assert ds["index"] == [i for i in range(48) for _ in range(2)] and ds["view"] == [0, 1] * 48
    assert len(ds[0]["values"]) == 5 and manifest["bytes_per_view"] > 0


def test_fast_row_reader_gives_the_datasets_rows_and_pickles_for_workers(built):
    import pickle

    cache = C.TeacherCache(built)
    rows = datasets.load_dataset(str(built), split="train")
    reader = pickle.loads(pickle.dumps(cache.reader))  # as a DataLoader worker receives it
    assert len(pickle.dumps(cache.reader)) < 10_000  # by path, not the table's bytes
    for i in (0, 1, len(rows) // 2, len(rows) - 1):
        want, got = rows[i], reader[i]
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, list):
                a, b = np.asarray(got[key], dtype=float), np.asarray(value, dtype=float)
                assert np.allclose(a, b, equal_nan=True), key
            else:
                assert got[key] == value, key
    with pytest.raises(IndexError):
        reader[len(rows)]


def test_replayed_pixels_are_the_teachers_and_the_online_runs(built):
    cache = C.TeacherCache(built)
    train = D.load_image_dataset("embedded", "train", embedded_kwargs=CONFIG.embedded_kwargs)
    student = engine_setup._create_student(CONFIG, 100)
    dc = D.resolve_model_data_config(
        student, dataset_name="embedded", **engine_setup._data_config_overrides(CONFIG)
    )
    tf = D.create_timm_transform(
        dc, is_training=True, dataset_name="embedded", **engine_setup._train_aug_kwargs(CONFIG)
    )
    cache.check(CONFIG, train, 100, tf)
    replayed = cache.dataset(train, tf, seed=CONFIG.seed)
    online = D.apply_transform(train, tf, seed=CONFIG.seed)
    for index in (0, 7, 47):
        for epoch in (0, 1):  # view v is what online training draws in epoch v
            item = replayed[(index, epoch)]
            assert torch.equal(item["pixel_values"], online[(index, epoch)]["pixel_values"])
            assert item["label"] == online[(index, epoch)]["label"]
    batch = C.collate_cached([replayed[(i, 1)] for i in range(4)])
    assert batch["teacher_values"].dtype == torch.float16 and batch["teacher_values"].shape == (4, 5)
    assert batch["teacher_indices"].dtype == torch.int16
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


def test_stored_logits_are_the_teachers_on_the_replayed_pixels(tmp_path):
    import timm

    net = timm.create_model("test_resnet", num_classes=100)  # a given teacher module
    out = tmp_path / "c"
    small = {"num_train": 12, "num_test": 20}
    engine.build_teacher_cache(
        dataclasses.replace(CONFIG, embedded_kwargs=small), out, num_views=1, top_k=7, teacher=net
    )
    cache = C.TeacherCache(out)
    dc = cache.manifest["data_config"]
    train = D.load_image_dataset("embedded", "train", embedded_kwargs=small)
    tf = D.create_timm_transform(dc, is_training=True, dataset_name="embedded", hflip=0.5, color_jitter=0.3)
    batch = C.collate_cached([cache.dataset(train, tf, seed=CONFIG.seed)[(i, 0)] for i in range(12)])
    # the teacher as the build ran it: adapted from the student's normalization to its own
    teacher = timm_kd.DistillWrapper(
        "test_resnet", net, loss="kd", num_classes=100, data_config=dc, verbose=False
    )
    with torch.no_grad():
        expected = C.compress_logits(teacher.teacher_logits(batch["pixel_values"]), 7)
    assert torch.equal(batch["teacher_indices"], expected["indices"])
    assert torch.allclose(batch["teacher_values"].float(), expected["values"].float(), atol=1e-3)
    assert torch.allclose(batch["teacher_lse"], expected["lse"], atol=1e-4)
    # the tail prior is the teacher's mean log-softmax over these views, by top-1 class
    prior = C.TailPrior(100)
    with torch.no_grad():
        prior.add(teacher.teacher_logits(batch["pixel_values"]))
    assert cache.manifest["tail_prior"] == C.TAIL_PRIOR_FILE and (out / C.TAIL_PRIOR_FILE).is_file()
    assert torch.allclose(cache.tail_prior, prior.table(), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# cached training


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_cached_training_runs_every_loss_without_a_teacher(built, tmp_path, monkeypatch, name):
    if not is_loss(name):
        pytest.skip(f"{name} not registered")

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher network was built during cached training")

    monkeypatch.setattr(timm_kd.teacher.Teacher, "__init__", no_teacher)
    monkeypatch.setattr(timm_kd.wrapper, "create_teacher_model", no_teacher)
    res = engine.fit(
        dataclasses.replace(
            CONFIG, method=name, teacher_cache=str(built), output_dir=str(tmp_path / name), max_train_steps=2
        )
    )
    assert res.global_step == 2
    train = res.summary["run"]["history"][-1]["train"]
    assert math.isfinite(train["loss"]) and train["loss"] > 0


def _cache_columns(cache: C.TeacherCache, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The first ``n`` rows' ``teacher_*`` columns, as a cached batch carries them, and their labels."""
    rows = cache.rows[:n]
    keys = {
        "teacher_values": torch.as_tensor(rows["values"]).half(),
        "teacher_indices": torch.as_tensor(rows["indices"]).short(),
        "teacher_lse": torch.as_tensor(rows["lse"]),
        "teacher_tail_lse": torch.as_tensor(rows["tail_lse"]),
    }
    return keys, torch.as_tensor(rows["label"])


def test_cached_teacher_rebuilds_the_tail_from_the_prior_unless_told_flat(built):
    import timm

    cache = C.TeacherCache(built)
    keys, target = _cache_columns(cache, 8)
    images = torch.randn(8, 3, 32, 32)
    outs = {}
    for tail in ("prior", "flat"):
        teacher = C.CachedTeacher(cache, tail=tail)
        assert (teacher.tail_prior is not None) == (tail == "prior")
        assert teacher.num_classes == 100 and teacher.name == "test_resnet" and teacher.cache is cache
        student = timm.create_model("test_resnet", num_classes=100)
        wrapper = timm_kd.DistillWrapper(student, teacher, loss="kd")
        assert wrapper.teacher is teacher and wrapper.teacher_input_keys == C.TEACHER_KEYS
        assert not any(k.startswith("teacher") for k in wrapper.state_dict())  # the cache is not saved
        out = wrapper(images, target, **keys)
        assert torch.equal(out["teacher_output"], teacher(**keys))  # the images are not read
        expected = wrapper.loss_fn(out["output"], out["teacher_output"], target)["loss"]
        assert torch.allclose(out["loss"], expected)
        outs[tail] = out["teacher_output"]
    kept = torch.zeros(8, 100, dtype=torch.bool).scatter_(1, keys["teacher_indices"].long(), True)
    assert torch.equal(outs["prior"][kept], outs["flat"][kept])
    flat_tail = outs["flat"].masked_fill(kept, float("nan"))
    assert torch.allclose(flat_tail.nanmean(1), flat_tail.nan_to_num(-1e9).amax(1))  # one value per row
    prior_tail = outs["prior"].masked_fill(kept, float("nan"))
    assert (prior_tail.nan_to_num(-1e9).amax(1) - prior_tail.nan_to_num(1e9).amin(1) > 0.01).all()
    for out in outs.values():  # the same tail mass either way
        mass = out.masked_fill(kept, float("-inf")).logsumexp(1)
        assert torch.allclose(mass, keys["teacher_tail_lse"], atol=1e-4)
    with pytest.raises(ValueError, match="tail must be one of"):
        C.CachedTeacher(cache, tail="x")
    assert C.CachedTeacher(str(built)).cache.root == built  # a folder is opened


def test_cached_teacher_prior_follows_the_wrapper_and_refuses_what_does_not_fit(built):
    import timm

    teacher = C.CachedTeacher(built)
    wrapper = timm_kd.DistillWrapper(timm.create_model("test_resnet", num_classes=100), teacher, loss="kd")
    assert "CachedTeacher(name='test_resnet'" in repr(wrapper)
    wrapper.train()
    assert not teacher.training
    with pytest.raises(TypeError, match="teacher_values"):  # a cached teacher needs its columns
        wrapper(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))
    wrapper.half()  # the prior stays float32: log-probabilities rounded to fp16 would move the tail
    assert teacher.tail_prior.dtype == torch.float32
    wrapper.to("meta")  # a device move reaches it (the teacher is not a submodule: _apply forwards it)
    assert teacher.tail_prior.device.type == "meta" and teacher.tail_prior.dtype == torch.float32
    with pytest.raises(ValueError, match="'test_resnet' predicts 100 classes but the student predicts 10"):
        timm_kd.DistillWrapper(timm.create_model("test_resnet", num_classes=10), C.CachedTeacher(built))
    student = timm.create_model("test_resnet", num_classes=100)
    with pytest.raises(ValueError, match="class_map does not apply to a CachedTeacher"):
        timm_kd.DistillWrapper(student, C.CachedTeacher(built), class_map=list(range(100)))
    with pytest.raises(ValueError, match=r"tail_prior must be \[C, C\] = \[100, 100\]"):
        C.CachedTeacher.from_prior(100, torch.zeros(10, 10))
    flat = C.CachedTeacher.from_prior(100, teacher.tail_prior, tail="flat")
    assert flat.tail_prior is None and flat.cache is None


def test_cached_teacher_with_every_logit_gives_the_live_teachers_loss(tmp_path):
    """k = C: the cache holds every logit (fp16), so the cached wrapper's loss and gradient are the live
    wrapper's up to that rounding, on the same replayed views."""
    import timm

    net = timm.create_model("test_resnet", num_classes=100)
    small = {"num_train": 12, "num_test": 20}
    out = tmp_path / "c"
    engine.build_teacher_cache(
        dataclasses.replace(CONFIG, embedded_kwargs=small), out, num_views=1, top_k=100, teacher=net
    )
    cache = C.TeacherCache(out)
    assert cache.tail_prior is None  # k = C: nothing dropped, no prior
    dc = cache.manifest["data_config"]
    train = D.load_image_dataset("embedded", "train", embedded_kwargs=small)
    tf = D.create_timm_transform(dc, is_training=True, dataset_name="embedded", hflip=0.5, color_jitter=0.3)
    batch = C.collate_cached([cache.dataset(train, tf, seed=CONFIG.seed)[(i, 0)] for i in range(12)])
    images, target = batch["pixel_values"], batch["label"]
    student = timm.create_model("test_resnet", num_classes=100)
    live = timm_kd.DistillWrapper(student, net, loss="ats", data_config=dc, verbose=False)
    cached = timm_kd.DistillWrapper(student, C.CachedTeacher(cache), loss="ats", verbose=False)
    assert live.teacher_input_keys == ()
    with pytest.raises(TypeError, match="a live teacher takes only the images"):
        live(images, target, teacher_values=batch["teacher_values"])
    results = []
    for wrapper, inputs in ((live, {}), (cached, {k: batch[k] for k in cached.teacher_input_keys})):
        student.zero_grad()
        out = wrapper(images, target, epoch=5.0, **inputs)
        out["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        results.append((out["loss"].detach(), out["teacher_output"], grad))
    (loss_a, z_a, g_a), (loss_b, z_b, g_b) = results
    assert torch.allclose(z_b, z_a, atol=5e-3)  # fp16 rounding of the stored logits
    assert torch.allclose(loss_b, loss_a, rtol=1e-3), (loss_a, loss_b)
    assert float((g_b - g_a).norm() / g_a.norm()) < 1e-2


def test_mismatched_or_incomplete_cache_is_refused(built, tmp_path):
    def fit(**changes):
        run = {"teacher_cache": str(built), "output_dir": str(tmp_path / "r"), "max_train_steps": 1}
        return engine.fit(dataclasses.replace(CONFIG, **{**run, **changes}))

    with pytest.raises(ValueError, match=r"does not match this run: transform: cache") as e:
        fit(scale=(0.5, 1.0))
    assert "timm-kd cache-teacher" in str(e.value)
    with pytest.raises(ValueError, match="dataset_fingerprint: cache"):
        fit(embedded_kwargs={"num_train": 40, "num_test": 20})
    with pytest.raises(ValueError, match="teacher: cache 'test_resnet', now 'resnet10t'"):
        fit(teacher="resnet10t")
    with pytest.raises(ValueError, match="Mixup/CutMix"):
        fit(mixup=0.2)
    with pytest.raises(ValueError, match="--teacher-cache-tail must be 'prior' .* or 'flat', got 'shaped'"):
        fit(teacher_cache_tail="shaped")
    broken = tmp_path / "partial"
    shutil.copytree(built, broken)
    m = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    with pytest.raises(ValueError, match="incomplete: all 3 shards are written, but the build stopped") as e:
        fit(teacher_cache=str(broken))
    assert "merging the tail prior" in str(e.value) and f"cache-teacher --cache-dir {broken}" in str(e.value)
    # resuming a build with other settings is refused too
    with pytest.raises(ValueError, match="built with other settings .*top_k: cache 5, now 6.*--overwrite"):
        engine.build_teacher_cache(CONFIG, broken, **{**BUILD, "top_k": 6})


def test_resume_after_a_lost_shard_gives_the_same_cache(built, tmp_path):
    partial = tmp_path / "p"
    shutil.copytree(built, partial)
    m = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    (partial / "data" / m["shards"][1]).unlink()
    (partial / "prior" / m["shards"][1].replace(".parquet", ".safetensors")).unlink()  # lost with its shard
    (partial / "tail_prior.safetensors").unlink()  # only written when the build completes
    (partial / "data" / f".tmp-{m['shards'][1]}.123").write_bytes(b"half a shard")  # a killed writer
    done = {n: (partial / "data" / n).stat().st_mtime_ns for n in (m["shards"][0], m["shards"][2])}
    engine.build_teacher_cache(CONFIG, partial, **BUILD)
    assert {n: (partial / "data" / n).stat().st_mtime_ns for n in done} == done  # skipped, not rebuilt
    assert sorted(p.name for p in (partial / "data").iterdir()) == m["shards"]
    assert _rows(partial) == _rows(built)
    _assert_same_cache(partial, built)  # the tail prior too


# ------------------------------------------------------------------------------------------------
# integrity: the teacher's weights, damaged shards, the tail prior, what an incomplete build lacks


def test_changed_teacher_weights_at_the_same_local_dir_are_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    from timm_kd.hub import save_pretrained

    folder = tmp_path / "teacher"
    torch.manual_seed(0)
    save_pretrained(timm.create_model("test_resnet", num_classes=100), folder)
    config = dataclasses.replace(
        CONFIG, teacher=f"local-dir:{folder}", pretrained_teacher=True, teacher_input_size=32
    )
    out = tmp_path / "c"
    manifest = engine.build_teacher_cache(config, out, **BUILD)
    assert manifest["teacher_weights_source"] == "files"
    assert manifest["teacher_weights_sha256"] == C.teacher_files_sha256(config.teacher, None)

    torch.manual_seed(1)  # new weights, same path
    save_file(
        timm.create_model("test_resnet", num_classes=100).state_dict(), str(folder / "model.safetensors")
    )
    run = dict(teacher_cache=str(out), output_dir=str(tmp_path / "r"), max_train_steps=1)
    with pytest.raises(ValueError, match=r"teacher_weights_sha256: cache .*weight files \(local-dir:"):
        engine.fit(dataclasses.replace(config, **run))
    with pytest.raises(ValueError, match="built with other settings .*teacher_weights_sha256.*--overwrite"):
        engine.build_teacher_cache(config, out, **BUILD)  # refused before the teacher runs
    rebuilt = engine.build_teacher_cache(config, out, **BUILD, overwrite=True)
    assert rebuilt["complete"] and rebuilt["teacher_weights_sha256"] != manifest["teacher_weights_sha256"]


def test_weights_from_a_module_are_fingerprinted_by_their_bytes():
    import timm

    torch.manual_seed(0)
    a = timm.create_model("test_resnet", num_classes=10)
    b = timm.create_model("test_resnet", num_classes=10)
    assert C.state_dict_sha256(a) == C.state_dict_sha256(a) != C.state_dict_sha256(b)
    assert C.teacher_files_sha256("resnet50.tv_in1k", None) is None  # a tag: not files (a rebuild checks)


def test_damaged_shards_are_named_on_load_and_rebuilt_by_a_rerun(built, tmp_path, capsys):
    out = tmp_path / "d"
    shutil.copytree(built, out)
    m = json.loads((out / "manifest.json").read_text())
    first, truncated, deleted = (out / "data" / name for name in m["shards"])
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[: size // 2])
    deleted.unlink()
    with pytest.raises(ValueError, match="damaged") as e:
        C.TeacherCache(out)
    msg = str(e.value)
    assert f"data/{truncated.name} has {size // 2} bytes, {size} were written" in msg
    assert f"data/{deleted.name} is missing" in msg and f"--cache-dir {out}" in msg
    assert "rebuilds only the damaged ones" in msg

    flipped = bytearray(first.read_bytes())  # same size, other bytes: the SHA-256 tells
    flipped[len(flipped) // 2] ^= 0xFF
    first.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=f"data/{first.name} does not have the SHA-256 recorded"):
        C.TeacherCache(out)

    capsys.readouterr()
    engine.build_teacher_cache(CONFIG, out, **BUILD)
    said = capsys.readouterr().out
    assert "is damaged, rebuilding 3 shard(s)" in said and truncated.name in said and deleted.name in said
    assert _rows(out) == _rows(built)
    _assert_same_cache(out, built)
    capsys.readouterr()
    engine.build_teacher_cache(CONFIG, out, **BUILD)  # now intact: nothing to do
    assert "complete and intact (3 shards), nothing to do" in capsys.readouterr().out


def test_missing_tail_prior_names_the_cache_folder_and_a_rerun_merges_it_again(built, tmp_path, capsys):
    out = tmp_path / "nested" / "c"
    shutil.copytree(built, out)
    (out / "tail_prior.safetensors").unlink()
    with pytest.raises(ValueError, match="tail_prior.safetensors is missing") as e:
        C.TeacherCache(out)
    assert f"teacher cache {out} is damaged" in str(e.value)
    with pytest.raises(ValueError) as e:
        C.load_tail_prior(out, json.loads((out / "manifest.json").read_text()))
    assert f"delete the cache folder {out} " in str(e.value)  # the cache itself, not its parent
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    engine.build_teacher_cache(CONFIG, out, **BUILD)
    assert "re-merging the tail prior" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == mtimes  # no shard rebuilt
    assert torch.equal(C.TeacherCache(out).tail_prior, C.TeacherCache(built).tail_prior)


def test_incomplete_cache_says_which_shards_are_missing(built, tmp_path):
    out = tmp_path / "i"
    shutil.copytree(built, out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    (out / "data" / m["shards"][2]).unlink()
    with pytest.raises(ValueError, match=f"incomplete: 2 of 3 shards written, {m['shards'][2]} not yet"):
        C.TeacherCache(out)


@pytest.mark.slow
def test_readme_cache_workflow_runs_as_written(tmp_path):
    """README: `accelerate launch recipes/imagenet_ats.py --build-teacher-cache DIR --num-views N --top-k K`,
    then `accelerate launch recipes/imagenet_ats.py --teacher-cache DIR` (plus tiny-model flags): the
    recipe builds the cache with its own defaults, so its run accepts it."""
    tiny = [*TINY, "--embedded-arg", "num_train=32", "--embedded-arg", "num_test=16"]
    cache = tmp_path / "cache" / "r50"
    build = ["--build-teacher-cache", str(cache), "--num-views", "2", "--top-k", "5", *tiny]
    res = launch(tmp_path, RECIPES / "imagenet_ats.py", build, num_processes=1, timeout=300)
    assert res.returncode == 0, output(res)
    assert f"train from it with: --teacher-cache {cache}" in res.stdout
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    train = ["--teacher-cache", str(cache), *tiny, "--max-train-steps", "2", "--max-eval-steps", "1",
             "--epochs", "1", "--teacher-check", "warn", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    res = launch(tmp_path, RECIPES / "imagenet_ats.py", train, num_processes=1, timeout=300)
    assert res.returncode == 0, output(res)
    assert "from cache" in res.stdout + res.stderr
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["run"]["global_step"] == 2


@pytest.mark.slow
def test_sigkilled_build_resumes_to_the_same_cache(built, tmp_path):
    out = tmp_path / "k"
    cmd = [TIMM_KD, "cache-teacher", "--cache-dir", str(out), "--num-views", "2", "--top-k", "5",
           "--shard-size", "2", *FLAGS]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list((out / "data").glob("train-*.parquet")):  # killed right after its first shard
            break
        time.sleep(0.02)
    sigkill_tree(proc)
    shards = list((out / "data").glob("train-*.parquet"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert 1 <= len(shards) < 24 and not manifest["complete"], proc.stdout.read().decode()[-3000:]
    for shard in shards:  # every shard present is complete
        assert len(datasets.Dataset.from_parquet(str(shard))) == 4
    res = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert res.returncode == 0, output(res)
    assert json.loads((out / "manifest.json").read_text())["complete"]
    _assert_same_cache(out, built)


@pytest.mark.slow
def test_two_processes_build_the_same_cache_and_train_from_it(built, tmp_path):
    out = tmp_path / "c2"
    args = ["cache-teacher", "--cache-dir", str(out), "--num-views", "2", "--top-k", "5",
            "--shard-size", "20",
            *FLAGS]  # fmt: skip
    res = launch(tmp_path, Path(TIMM_KD), args, num_processes=2, timeout=300)
    assert res.returncode == 0, output(res)
    _assert_same_cache(out, built)
    assert (
        json.loads((out / "manifest.json").read_text())["dataset_fingerprint"]
        == json.loads((built / "manifest.json").read_text())["dataset_fingerprint"]
    )
    run_dir = tmp_path / "run"
    train = [*FLAGS, "--teacher-cache", str(out), "--method", "ats", "--epochs", "2",
             "--max-train-steps", "4",
             "--max-eval-steps", "1", "--teacher-check", "warn", "--output-dir", str(run_dir)]  # fmt: skip
    res = launch(tmp_path, RECIPES / "imagenet_ats.py", train, num_processes=2, timeout=300)
    assert res.returncode == 0, output(res)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and summary["run"]["global_step"] == 4
    assert summary["method"] == "ats" and math.isfinite(summary["run"]["history"][-1]["train"]["loss"])
    assert "from cache" in res.stdout + res.stderr
