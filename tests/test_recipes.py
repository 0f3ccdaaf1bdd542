"""The recipes under `accelerate launch`: two real gloo processes, SIGKILL and resume, bf16, --help.

Every run uses the embedded dataset and timm's tiny random test models, so nothing is downloaded;
the stand-in Hub (tests/_hub_server.py) receives the push.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from _engine_utils import RECIPES, TINY, launch, launch_cmd, output, sigkill_tree, subprocess_env
from _hub_server import StandInHub
from safetensors.torch import load_file

from timm_kd.data import make_embedded_dataset
from timm_kd.metrics import load_topk_metric


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_summary.json").read_text())


@pytest.mark.slow
def test_two_processes_report_what_the_gathered_predictions_say_and_push(tmp_path):
    """2 gloo processes, 101 test images (uneven shards): the reported accuracy is the gathered one."""
    run = tmp_path / "run"
    with StandInHub() as hub:
        res = launch(
            tmp_path,
            RECIPES / "imagenet_ats.py",
            [
                *TINY,
                "--epochs",
                "2",
                "--max-train-steps",
                "14",
                "--log-every",
                "4",
                "--output-dir",
                str(run),
                "--report-to",
                "tensorboard",
                "--push-to-hub",
                "tester/tiny-ats",
            ],
            HF_ENDPOINT=hub.url,
            HF_HUB_OFFLINE="0",
            HF_TOKEN="hf_test_token_not_real",
        )
        assert res.returncode == 0, output(res)
        pushed = hub.repos["tester/tiny-ats"].head.files
    summary = _summary(run)
    assert summary["hardware"] == "2x CPU processes" and summary["run"]["world_size"] == 2
    assert summary["global_batch_size"] == 16 and summary["run"]["global_step"] == 14

    # the predictions gathered from both ranks: every test image once, in dataset order
    pred = load_file(str(run / "predictions.safetensors"))
    test_labels = make_embedded_dataset("test", num_test=101)["label"]
    assert pred["labels"].tolist() == test_labels
    recomputed = load_topk_metric().compute(
        predictions=pred["topk"].tolist(), references=pred["labels"].tolist()
    )
    assert summary["metrics"] == recomputed and summary["metrics"]["num_samples"] == 101
    top1 = (pred["topk"][:, 0] == pred["labels"]).float().mean().item() * 100
    assert summary["metrics"]["top1"] == pytest.approx(top1)

    # last and best epoch both recorded; the teacher was evaluated once, before training
    hist = summary["run"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and summary["run"]["best_epoch"] in (1, 2)
    assert summary["metrics"]["top1"] == hist[-1]["top1"]
    assert summary["run"]["best_metrics"]["top1"] == max(h["top1"] for h in hist)
    assert summary["teacher_metrics"]["num_samples"] == 101
    log = res.stdout + res.stderr
    assert log.count("teacher test_resnet: top1") == 1
    for term in ("loss", "ce", "kd", "agreement", "lr", "img_per_s"):
        assert f" {term} " in log, term
    assert set(hist[0]["train"]) >= {"loss", "ce", "kd", "agreement"}
    assert list((run / "logs").rglob("events.out.tfevents.*"))  # tensorboard tracker

    # the student folder is timm's format, with its preprocessing, and is the model that was evaluated
    student = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=student))
    images = torch.stack([transform(im) for im in make_embedded_dataset("test", num_test=101)["image"]])
    with torch.no_grad():
        logits = student(images)
    # its top-1 is the class evaluated: float32 at float32 tolerance (batches of another size may
    # round differently, so a near-tie may be ranked the other way)
    chosen = logits.gather(1, pred["topk"][:, :1]).squeeze(1)
    torch.testing.assert_close(chosen, logits.max(-1).values, rtol=1e-5, atol=1e-5)
    # pushed once, by the main process, with the card
    assert {"config.json", "model.safetensors", "README.md"} <= set(pushed)
    assert b"test_resnet" in pushed["README.md"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "student" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path):
    """Kill -9 a 2-process run after a checkpoint; --resume latest finishes bit-identical to a clean run.

    Mixup, EMA, gradient accumulation and a warm-up schedule are on, so every piece of state
    (data order, augmentation, RNG, optimizer, scheduler, EMA, counters) has to come back.
    """
    args = [
        *TINY,
        "--epochs",
        "2",
        "--grad-accum-steps",
        "2",
        "--mixup",
        "0.4",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
        "--warmup-epochs",
        "1",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
        "--log-every",
        "3",
        "--method",
        "dtkd",
    ]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    res = launch(tmp_path, RECIPES / "imagenet_dtkd.py", [*args, "--output-dir", str(clean)])
    assert res.returncode == 0, output(res)

    cmd = launch_cmd(tmp_path, RECIPES / "imagenet_dtkd.py", [*args, "--output-dir", str(killed)])
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=subprocess_env(),
        start_new_session=True,
    )
    target = killed / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed_pids = sigkill_tree(proc)  # the launcher and both ranks, no chance to clean up
    assert len(killed_pids) >= 3, killed_pids
    assert target.exists(), "the run never wrote its first checkpoint"
    assert not (killed / "run_summary.json").exists(), "the run finished before it could be killed"

    res = launch(
        tmp_path, RECIPES / "imagenet_dtkd.py", [*args, "--output-dir", str(killed), "--resume", "latest"]
    )
    assert res.returncode == 0, output(res)
    assert "resumed from" in res.stdout and "(epoch 1, step" in res.stdout  # mid-epoch: batches skipped
    a, b = _weights(clean), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = _summary(clean), _summary(killed)
    assert sa["metrics"] == sb["metrics"]
    for ha, hb in zip(sa["run"]["history"], sb["run"]["history"], strict=True):  # the whole epoch's means
        assert ha["train"] == pytest.approx(hb["train"], rel=1e-5) and ha["top1"] == hb["top1"]
    # the last K checkpoints, complete, no leftovers of the interrupted save
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (clean / "checkpoints").iterdir()) and len(ckpts) == 2, ckpts


@pytest.mark.slow
def test_bf16_mixed_precision_runs_without_nan(tmp_path):
    run = tmp_path / "run"
    res = launch(
        tmp_path,
        RECIPES / "imagenet_ats.py",
        [
            *TINY,
            "--mixed-precision",
            "bf16",
            "--max-train-steps",
            "6",
            "--log-every",
            "2",
            "--output-dir",
            str(run),
        ],
        num_processes=1,
    )
    assert res.returncode == 0, output(res)
    summary = _summary(run)
    assert summary["run"]["mixed_precision"] == "bf16"
    train = summary["run"]["history"][-1]["train"]
    assert all(torch.isfinite(torch.tensor(v)) for v in train.values()), train
    weights = _weights(run)
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


@pytest.mark.slow
def test_quickstart_three_stages_and_table(tmp_path):
    """The README's command, shrunk: teacher, student alone, distilled student, the table."""
    run = tmp_path / "qs"
    cmd = [
        sys.executable,
        str(RECIPES / "quickstart.py"),
        "--teacher-arch",
        "test_resnet",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
        "--max-train-steps",
        "3",
        "--max-eval-steps",
        "1",
        "--embedded-arg",
        "num_train=256",
        "--embedded-arg",
        "num_test=64",
        "--teacher-check",
        "warn",
        "--no-progress",
        "--output-dir",
        str(run),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert res.returncode == 0, output(res)
    for line in (
        "teacher test_resnet (CE)",
        "student test_resnet alone (CE)",
        "student test_resnet distilled (ats)",
        "points top-1 over the student alone",
    ):
        assert line in res.stdout, res.stdout
    distilled = _summary(run / "student_ats")
    assert distilled["teacher"] == f"local-dir:{run / 'teacher' / 'student'}"
    assert distilled["student_alone_metrics"] == _summary(run / "student_alone")["metrics"]
    timm.create_model(f"local-dir:{run / 'student_ats' / 'student'}", pretrained=True)


@pytest.mark.slow
def test_recipe_help_under_accelerate_launch(tmp_path):
    res = launch(tmp_path, RECIPES / "imagenet_ats.py", ["--help"], num_processes=1, timeout=120)
    assert res.returncode == 0, output(res)
    for flag in (
        "--push-to-hub",
        "--resume",
        "--max-train-steps",
        "--max-eval-steps",
        "--teacher",
        "--loss-arg",
        "(default: resnet50.tv_in1k)",
        "tau_wrong",
    ):
        assert flag in res.stdout, flag


@pytest.mark.parametrize("recipe", ["imagenet_dtkd.py", "cifar100.py", "quickstart.py"])
def test_every_recipe_explains_its_flags(recipe, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [recipe, "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(RECIPES / recipe), run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-train-steps" in out and "--max-eval-steps" in out and "--output-dir" in out
    lines = out.split("options:", 1)[1].splitlines()
    flags = 0
    for i, line in enumerate(lines):  # every flag has a help text, on its line or the next
        if line.startswith("  -"):
            flags += 1
            has_text = "  " in line.strip() or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 10))
            assert has_text, f"{recipe}: no help for {line.strip()}"
    assert flags > 60


def test_bad_push_target_fails_before_training(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["imagenet_ats.py", *TINY, "--output-dir", str(run), "--push-to-hub", "no-namespace"]
    )
    with pytest.raises(SystemExit) as info:  # one line `error: ...`, status 2, no traceback
        runpy.run_path(str(RECIPES / "imagenet_ats.py"), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet_ats.py: error: ") and "has no namespace" in err
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()
