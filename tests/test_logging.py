"""What a run tells its user: the trackers' epoch metrics, percent for every share, plain log lines
where a progress bar cannot redraw, the warm-up longer than the run, and the 1-based loss epoch."""

from __future__ import annotations

import subprocess
import warnings
from types import SimpleNamespace

import pytest
import torch
from _engine_utils import ACCELERATE, TINY_CONFIG, subprocess_env

from timm_kd import engine
from timm_kd.engine import loop
from timm_kd.losses import create_loss
from timm_kd.losses._base import warmup_factor

pytestmark = pytest.mark.usefixtures("one_thread")


def _scalars(logdir):
    """``{tag: [(step, value), ...]}`` of every TensorBoard event file under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.slow
def test_run_logs_epochs_to_tensorboard_plain_lines_and_flags_a_long_warmup(tmp_path, capfd):
    """One tiny dkd run, its output captured (not a terminal), progress bars asked for:
    the warm-up (20 epochs in a 2-epoch run) is flagged before the first step, naming the flag;
    TensorBoard gets each epoch's validation accuracy (percent) and training means; the captured
    output holds plain lines, no carriage returns from a bar."""
    pytest.importorskip("tensorboard")
    config = engine.TrainConfig(
        **{
            **TINY_CONFIG,
            "embedded_kwargs": {"num_train": 32, "num_test": 16},
            "output_dir": str(tmp_path / "run"),
            "method": "dkd",
            "epochs": 2,
            "log_every": 2,
            "report_to": "tensorboard",
            "progress": True,
        }
    )
    with pytest.warns(UserWarning, match=r"warmup_epochs=20 epochs, longer than this run \(2 epochs\)"):
        result = engine.fit(config)
    out, err = capfd.readouterr()
    text = out + err
    assert "\r" not in text, "a progress bar redrew into captured output"
    assert "--loss-arg warmup_epochs=N" in text and "WARNING: the dkd loss" in text
    assert text.index("WARNING: the dkd loss") < text.index("step 2/")  # before training
    assert "epoch 2/2 (step 8)" in out

    tb = _scalars(tmp_path / "run" / "logs")
    history = result.summary["run"]["history"]
    assert [s for s, _ in tb["val/top1"]] == [4, 8]  # after each epoch, at its last step
    for (_, v), h in zip(tb["val/top1"], history):
        assert v == pytest.approx(h["top1"], rel=1e-5) and 0 <= v <= 100  # percent, as the console
    for term in ("loss", "ce", "tckd", "nckd", "warmup", "agreement"):
        got = [v for _, v in tb[f"epoch/{term}"]]
        assert got == pytest.approx([h["train"][term] for h in history], rel=1e-5), term
    assert [v for _, v in tb["epoch"]] == [1, 2]
    assert "val/top5" in tb and "epoch/lr" in tb and "train/loss" in tb  # step logs stay


def test_rates_are_logged_in_percent_like_accuracies():
    """The ATS loss returns its flip rates as fractions; the engine logs them in percent, as it
    does the agreement and every accuracy, and warns from the fraction."""
    z_t = torch.tensor([[4.0, 3.9, 0.0], [4.0, 3.9, 0.0]])
    labels = torch.tensor([0, 0])
    out = create_loss("ats", tau_correct=4.0, tau_wrong=1.0)(torch.zeros(2, 3), z_t, labels)
    assert out["induced_flip"].item() == 1.0  # a fraction in the loss's own output
    run = SimpleNamespace(bad_step=torch.tensor(-1), state={"global_step": 0})
    terms = loop._terms(run, {**out, "output": torch.zeros(2, 3), "teacher_output": z_t})
    assert terms["induced_flip"].item() == pytest.approx(100.0)
    assert terms["target_flip"].item() == pytest.approx(100.0)
    assert terms["agreement"].item() == pytest.approx(100.0)
    assert terms["ce"].item() == pytest.approx(out["ce"].item())  # loss terms unchanged
    assert set(loop.PERCENT_TERMS) == {"target_flip", "induced_flip"}


def _warmup_run(method, warmup, updates_per_epoch, total_updates, compiled=False):
    lines = []
    loss = create_loss(method, warmup_epochs=warmup) if warmup is not None else create_loss(method)
    loss_fn = SimpleNamespace(loss_fn=loss) if compiled else loss
    run = SimpleNamespace(
        wrapper=SimpleNamespace(loss_fn=loss_fn),
        config=SimpleNamespace(method=method),
        updates_per_epoch=updates_per_epoch,
        total_updates=total_updates,
        log=lines.append,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop._warn_long_warmup(run)
    assert len(caught) == len(lines)
    return lines


def test_long_warmup_is_flagged_only_when_full_weight_is_never_reached():
    """The loss gets the 1-based epoch ``1 + update / updates_per_epoch``: a warm-up of E epochs
    reaches full weight within an E-epoch run, a longer one does not (max_train_steps counts)."""
    (msg,) = _warmup_run("dtkd", 20, 10, 20)
    assert "warmup_epochs=20" in msg and "(2 epochs)" in msg and "end at 14 %" in msg
    assert "--loss-arg warmup_epochs=N with N at most 2" in msg and "warmup_epochs=0" in msg
    assert _warmup_run("dkd", 2, 10, 20) == []  # 1 + 19/10 = 2.9 >= 2
    assert _warmup_run("dkd", 0, 10, 20) == []
    assert len(_warmup_run("dkd", 3, 10, 15)) == 1  # max_train_steps cut the run to 1.5 epochs
    assert len(_warmup_run("dkd", 20, 10, 20, compiled=True)) == 1  # through compile_loss
    assert _warmup_run("kd", None, 10, 20) == []  # a loss without a warm-up


def test_loss_epoch_is_one_based_and_epoch_zero_warns():
    """``epoch`` 1 is the first epoch; a 0-based loop's ``epoch=0`` gives no distillation and a
    warning naming the fix, the loss values themselves unchanged."""
    assert warmup_factor(1, 20, "dkd") == pytest.approx(0.05)
    assert warmup_factor(20, 20, "dkd") == 1.0
    with pytest.warns(UserWarning, match=r"epoch=0 gives a warm-up factor of 0.*epoch \+ 1"):
        assert warmup_factor(0, 20, "dkd") == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for 1-based epochs nor without a warm-up
        warmup_factor(0.5, 20, "dkd")
        warmup_factor(0, 0, "dkd")
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g) * 3
    y = torch.randint(0, 10, (8,), generator=g)
    for name in ("dkd", "dtkd"):
        loss = create_loss(name)
        with pytest.warns(UserWarning, match=f"{name}: epoch=0"):
            out = loss(zs, zt, y, epoch=0)
        assert out["warmup"].item() == 0.0
        assert out["loss"].item() == pytest.approx(out["ce"].item(), rel=1e-6)  # CE alone
        assert loss(zs, zt, y, epoch=1)["warmup"].item() == pytest.approx(1 / 20)


def test_warmup_mean_per_step_and_per_epoch():
    """The docstrings' numbers: over 20 warm-up epochs a per-step ramp of the 1-based epoch
    averages 0.549, the authors' once-per-epoch steps 0.525."""
    steps = 1000
    per_step = [warmup_factor(1 + i / steps, 20, "dtkd") for i in range(20 * steps)]
    per_epoch = [warmup_factor(k, 20, "dtkd") for k in range(1, 21)]
    assert sum(per_step) / len(per_step) == pytest.approx(0.549, abs=5e-4)
    assert sum(per_epoch) / len(per_epoch) == pytest.approx(0.525)


@pytest.mark.slow
def test_documented_launch_has_no_default_values_warning_and_the_run_keeps_its_precision(tmp_path):
    """docs/training.md: ``accelerate launch`` with the values passed prints no "had defaults used
    instead" message, and a precision given to the ``Accelerator`` (the engine passes
    ``--mixed-precision`` there) wins over the launcher's ``--mixed_precision no``."""
    script = tmp_path / "probe.py"
    script.write_text(
        "from accelerate import Accelerator\n"
        "print('precision', Accelerator(mixed_precision='bf16').mixed_precision)\n"
    )
    flags = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    flags += ["--dynamo_backend", "no"]
    env = subprocess_env(HF_HOME=str(tmp_path / "hf"))  # no user accelerate config merged
    res = subprocess.run(
        [ACCELERATE, "launch", *flags, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "had defaults used instead" not in res.stdout + res.stderr
    assert "precision bf16" in res.stdout
