"""The ``timm-kd`` command a pip user trains with: ``train``, ``diagnose``, ``list-losses -v``, errors,
``--help``.

Runs use the embedded dataset and timm's tiny random test models: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _engine_utils import RECIPES, TINY, launch_cmd, output, subprocess_env
from test_options import describe, recipe_parser

from timm_kd import cli, engine
from timm_kd.engine import diagnose as diagnose_module

#: a tiny `timm-kd train` / `diagnose` run (TINY without its training-only flags)
TRAIN_TINY = [*TINY, "--epochs", "1", "--max-train-steps", "2", "--max-eval-steps", "1"]


def _train_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = cli.build_parser(["train", *argv])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# --help without torch


def test_help_imports_no_torch_timm_or_datasets():
    """`timm-kd --help`, `timm-kd train --help` and each recipe's --help build their parsers without
    importing torch, timm or datasets (those take seconds to import)."""
    code = f"""
import runpy, sys
from timm_kd.cli import build_parser
for argv in (["--help"], ["train", "--help"], ["train", "--recipe", "cifar100", "--help"],
             ["diagnose", "--help"], ["cache-teacher", "--help"]):
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit:
        pass
for recipe in ("imagenet_ats.py", "imagenet_dtkd.py", "cifar100.py"):
    sys.argv = [recipe, "--help"]
    try:
        runpy.run_path({str(RECIPES)!r} + "/" + recipe, run_name="__main__")
    except SystemExit:
        pass
print("HEAVY", sorted(m for m in ("torch", "timm", "datasets", "accelerate") if m in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout, res.stdout[-500:]


def test_package_root_and_engine_names_resolve_lazily():
    import timm_kd

    assert set(timm_kd.__all__) == {"__version__", *timm_kd._LAZY}
    assert set(engine.__all__) == set(engine._LAZY)
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name
    assert timm_kd.DistillWrapper.__name__ == "DistillWrapper"
    assert timm_kd.models.unwrap_model is not None  # submodules too, as an eager root gave them
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        timm_kd.nope  # noqa: B018


# --------------------------------------------------------------------------------------------------
# train: the recipes' flags, installed


@pytest.mark.parametrize(
    "recipe, recipe_argv",
    [
        ("imagenet_ats", []),
        ("imagenet_dtkd", []),
        ("cifar100", []),
        ("cifar100", ["--method", "dtkd"]),
        ("cifar100", ["--method", "ce"]),
    ],
)
def test_train_has_every_flag_and_default_of_the_recipe(recipe, recipe_argv):
    script = describe(recipe_parser(f"{recipe}.py", recipe_argv))
    train = describe(_train_parser(["--recipe", recipe, *recipe_argv]))
    recipe_flag = train["flags"].pop("--recipe")
    assert recipe_flag["default"] == recipe and recipe_flag["choices"] == list(engine.RECIPES)
    extra = [f for f in train["flags"] if f not in script["flags"]]
    # train builds a teacher cache for any recipe (recipes/cifar100.py has no --build-teacher-cache)
    assert set(extra) <= {"--build-teacher-cache", "--num-views", "--top-k", "--shard-size", "--overwrite"}
    assert {f: train["flags"][f] for f in script["flags"]} == script["flags"]
    assert list(script["flags"]) == [f for f in train["flags"] if f not in extra]  # same order
    assert train["set_defaults"].pop("func") == "cmd_train"
    assert train["set_defaults"] == script["set_defaults"]


def test_cifar100_method_ce_trains_the_student_alone():
    """cifar100 used to suggest --method ce (the error for a teacher-less method) and then reject it."""
    args = _train_parser(["--recipe", "cifar100", "--method", "ce"]).parse_args(["--method", "ce"])
    config = engine.config_from_args(args)
    assert config.method == "ce" and config.teacher is None and config.loss_kwargs == {}
    assert engine.teacher_stage(config, "resnet50", 1) == (None, config)
    engine.check_config(config)  # accepted
    # with a loss and no teacher, the recipe trains one first
    args = _train_parser(["--recipe", "cifar100"]).parse_args(["--output-dir", "out"])
    teacher, distill = engine.teacher_stage(engine.config_from_args(args), "test_resnet", 3)
    assert (teacher.method, teacher.student, teacher.epochs) == ("ce", "test_resnet", 3)
    assert distill.teacher == "local-dir:out/teacher/student" and distill.method == "ats"


def test_input_size_and_lr_help_print_one_default(capsys):
    text = " ".join(_help(["train", "--recipe", "imagenet_ats"], capsys).split())
    assert "--input-size INPUT_SIZE image side (default: 224)" in text
    assert "the student's" not in text.split("--input-size INPUT_SIZE", 1)[1].split("--crop-pct")[0]
    text = " ".join(_help(["train", "--recipe", "cifar100"], capsys).split())
    assert "--lr LR learning rate (default: 0.05)" in text
    text = " ".join(_help(["train"], capsys).split())  # no recipe: None means the student's
    assert "--input-size INPUT_SIZE image side (default: the student's)" in text
    assert text.count("(default: the student's)") == 1


def test_class_map_help_says_the_file_format(capsys):
    text = " ".join(_help(["train"], capsys).split())
    assert "line i holds the teacher's class index for dataset class i" in text
    assert "JSON list" in text


@pytest.mark.parametrize(
    "argv, crop_pct",
    [
        ([], 0.875),  # 224 px: ImageNet's crop
        (["--input-size", "32"], 1.0),  # tiny images keep their border
        (["--input-size", "63"], 1.0),
        (["--input-size", "64"], 0.875),
        (["--input-size", "32", "--crop-pct", "0.875"], 0.875),  # given: applies
        (["--crop-pct", "0.9"], 0.9),
    ],
)
def test_imagenet_recipe_crop_pct_at_small_inputs(argv, crop_pct):
    args = _train_parser(["--recipe", "imagenet_ats"]).parse_args(argv)
    config = engine.config_from_args(args)
    assert config.crop_pct == crop_pct and type(config.crop_pct) is float


def test_train_runs_a_recipe_in_process(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", "--recipe", "imagenet_dtkd", *TRAIN_TINY, "--output-dir", str(run)])
    assert code == 0
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["method"] == "dtkd" and summary["loss_kwargs"]["warmup_epochs"] == 1
    assert (run / "student" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# errors


def test_user_error_prints_one_line_and_exits_2(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", *TRAIN_TINY, "--student", "resnet_nope", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("timm-kd train: error: unknown student model 'resnet_nope'")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "fit", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["train", *TRAIN_TINY, "--output-dir", str(tmp_path / "run")])


@pytest.mark.parametrize("error", [engine.TrainingDivergedError, engine.BrokenTeacherError])
def test_stopped_runs_are_user_errors(error, capsys):
    assert cli.exit_on_error(lambda: (_ for _ in ()).throw(error("loss is NaN at step 3")), "x.py") == 2
    assert capsys.readouterr().err == "x.py: error: loss is NaN at step 3\n"


def test_recipe_error_is_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["cifar100.py", *TRAIN_TINY, "--output-dir", str(run), "--epochs", "0"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(RECIPES / "cifar100.py"), run_name="__main__")
    assert info.value.code == 2
    assert capsys.readouterr().err == "cifar100.py: error: --epochs must be >= 1, got 0\n"


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("wandb") is not None, reason="wandb is installed"
)
def test_report_to_wandb_without_wandb_refuses_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", *TRAIN_TINY, "--report-to", "wandb", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "wandb is not installed" in err and "pip install wandb" in err
    assert not run.exists()


# --------------------------------------------------------------------------------------------------
# list-losses -v


def test_list_losses_verbose_prints_papers_and_defaults(capsys):
    assert cli.main(["list-losses", "-v", "ats"]) == 0
    out = capsys.readouterr().out
    assert "Asymmetric Temperature Scaling (ATS) (Li et al., NeurIPS 2022, arXiv:2210.04427)" in out
    assert "tau_correct=4.0 tau_wrong=3.0 student_tau=1.0 kd_weight=0.5" in out
    assert "check_inputs" not in out
    assert cli.main(["list-losses", "dtkd"]) == 0
    assert capsys.readouterr().out == "dtkd\n"


# --------------------------------------------------------------------------------------------------
# diagnose


def test_diagnose_end_to_end_on_a_random_teacher(tmp_path, capsys):
    """Logits collected from a (random, so at chance) teacher: statistics, no suggestion and why,
    the plot marking the authors' temperatures, the JSON record."""
    out = tmp_path / "diag"
    argv = ["diagnose", "--teacher", "test_resnet", "--no-pretrained-teacher", "--dataset", "embedded"]
    argv += ["--embedded-arg", "num_train=96", "--input-size", "32", "--num-workers", "0"]
    assert cli.main([*argv, "--num-samples", "80", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "teacher test_resnet on 80 images of embedded[train] (100 classes): top-1" in text
    assert "no temperature suggestion: " in text and "chance" in text
    record = json.loads((out / "diagnose.json").read_text())
    assert record["num_samples"] == 80 and record["suggestion"] is None
    assert len(record["sweep"]) == 2 * len(engine.diagnose.FIG7_TAUS)
    assert record["stats_authors"]["tau_correct"] == 4.0
    assert (out / "temperature_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_suggests_and_marks_the_suggestion(tmp_path, monkeypatch, capsys):
    """An informative teacher (peaked logits, right on 90 %): the suggestion, printed with the flags to
    train with, saved in the record, and marked in the plot."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 20, (500,), generator=g)
    logits = torch.randn(500, 20, generator=g) * 2
    right = torch.rand(500, generator=g) < 0.9
    logits[right, labels[right]] += 12.0
    monkeypatch.setattr(diagnose_module, "collect_teacher_logits", lambda *a, **k: (logits, labels))
    marks = {}

    def plot(rows, path, **kw):
        marks.update(kw["marks"])
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(diagnose_module, "plot_temperature_sweep", plot)
    config = engine.TrainConfig(teacher="test_resnet", dataset="embedded")
    record = diagnose_module.diagnose_teacher(config, tmp_path)
    s = record["suggestion"]
    assert s is not None and s["tau_correct"] >= s["tau_wrong"] > 0
    assert marks == {"suggested τ1": s["tau_correct"], "suggested τ2": s["tau_wrong"]}
    assert json.loads((tmp_path / "diagnose.json").read_text())["suggestion"] == s
    assert record["stats_suggested"]["tau_wrong"] == s["tau_wrong"]


# --------------------------------------------------------------------------------------------------
# accelerate launch -m timm_kd.cli train


@pytest.mark.slow
def test_train_under_accelerate_launch_on_two_processes(tmp_path):
    run = tmp_path / "run"
    cmd = launch_cmd(tmp_path, "-m", ["timm_kd.cli", "train", "--recipe", "imagenet_ats", *TRAIN_TINY])
    res = subprocess.run(
        [*cmd, "--output-dir", str(run)], capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert res.returncode == 0, output(res)
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and summary["method"] == "ats"


@pytest.mark.slow
def test_error_under_accelerate_launch_prints_the_message_not_our_traceback(tmp_path):
    cmd = launch_cmd(tmp_path, "-m", ["timm_kd", "train", *TRAIN_TINY, "--epochs", "0"], num_processes=1)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert res.returncode != 0
    assert "timm-kd train: error: --epochs must be >= 1, got 0" in res.stderr
    assert "timm_kd/" not in res.stderr  # no frame of ours: accelerate's own report of the exit only


def test_a_value_error_from_a_library_is_a_bug_with_its_traceback():
    """A ValueError raised inside timm-kd is the user's; one raised deep in another library is not."""
    from timm_kd import cli
    from timm_kd.losses import create_loss

    with pytest.raises(ValueError) as ours:
        create_loss("kd", no_such_argument=1)
    assert cli.is_user_error(ours.value)
    with pytest.raises(ValueError) as theirs:
        json.loads("{")
    assert not cli.is_user_error(theirs.value)


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `timm-kd list-losses -v | head -1`: the pipe is closed before the command writes to it
    proc = subprocess.Popen(
        [sys.executable, "-m", "timm_kd.cli", "list-losses", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
