"""Quickstart: watch knowledge distillation work in a few minutes on a CPU, nothing to download.

    accelerate launch recipes/quickstart.py          # or: python recipes/quickstart.py

On the embedded dataset (timm_kd.data.make_embedded_dataset: 100 classes of two-digit numbers
"00".."99" written with scikit-learn's bundled handwritten digits, 32x32 px; the test split uses
handwriting never seen in training), it

1. trains a teacher (a larger timm model) briefly with cross-entropy,
2. trains the student (a small timm model) alone with cross-entropy, for comparison,
3. distills the same student, same schedule, from the teacher with ATS,
4. prints the three accuracies in a table.

Every stage is one call of timm_kd.engine.fit, the function the ImageNet recipes use. The teacher
is saved in timm's format and loaded back from that folder for stage 3; the distilled student is
saved in timm's format too, ready for `timm.create_model("local-dir:<path>", pretrained=True)` or
`timm-kd push <run dir> your-name/repo`. Run folders, logs and checkpoints go to --output-dir.

Measured with the defaults on a 2-core CPU shared with other jobs (load 2-4), 7.8 minutes wall
time in all (the teacher takes more than half). Runs are seeded: two runs here gave this same table
(other machines may differ slightly through floating-point rounding):

    model                                  params  top-1 %  top-5 %
    teacher resnet10t (CE)                  4.97M    84.15    98.30
    student test_resnet alone (CE)          0.38M    74.35    93.20
    student test_resnet distilled (ats)     0.38M    79.60    96.45

The engine also prints a warning during stage 3: with this teacher the authors' tau 4 / 3
put a wrong class above the label on ~14 % of the samples the teacher gets right; see
docs/capacity_study.md for what that costs and timm_kd.diagnostics.suggest_ats_temperatures.
"""

import argparse
import dataclasses
import os
import sys

from timm_kd import cli, engine

# Everything the three stages share. Models and schedule are sized for a 2-core CPU.
QUICKSTART = dict(
    dataset="embedded",
    val_split="test",
    student="test_resnet",
    method="ats",
    loss_kwargs={"tau_correct": 4.0, "tau_wrong": 3.0, "kd_weight": 0.5},
    epochs=3,
    batch_size=64,
    opt="adamw",
    lr=2e-3,
    weight_decay=0.05,
    sched="cosine",
    warmup_epochs=0.5,
    warmup_lr=2e-4,
    num_workers=0,
    log_every=50,
    checkpoint_every=None,
    keep_checkpoints=1,
    output_dir="runs/quickstart",
)


def main():
    # 1. Arguments: every flag of the engine with the quickstart's defaults, plus the teacher's.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=engine.HelpFormatter)
    engine.add_train_args(parser, **QUICKSTART)
    group = parser.add_argument_group("teacher training")
    group.add_argument("--teacher-arch", default="resnet10t", help="timm architecture of the teacher")
    group.add_argument("--teacher-epochs", type=int, default=3, help="epochs of the teacher's CE training")
    args = parser.parse_args()
    config = engine.config_from_args(args)
    out = config.output_dir

    # 2. The teacher: trained with cross-entropy, saved in timm's format.
    teacher = engine.fit(
        dataclasses.replace(
            config,
            student=args.teacher_arch,
            teacher=None,
            method="ce",
            loss_kwargs={},
            epochs=args.teacher_epochs,
            output_dir=os.path.join(out, "teacher"),
        )
    )

    # 3. The student alone (cross-entropy), the baseline distillation has to beat.
    alone = engine.fit(
        dataclasses.replace(config, teacher=None, method="ce", output_dir=os.path.join(out, "student_alone"))
    )

    # 4. The same student distilled from the teacher, loaded from the folder stage 2 saved.
    distilled = engine.fit(
        dataclasses.replace(
            config,
            teacher=f"local-dir:{os.path.join(out, 'teacher', 'student')}",
            pretrained_teacher=True,
            output_dir=os.path.join(out, f"student_{config.method}"),
        ),
        card_meta={"student_alone_metrics": alone.metrics},
    )

    # 5. The table.
    if distilled.is_main_process:
        rows = [
            (f"teacher {args.teacher_arch} (CE)", teacher),
            (f"student {config.student} alone (CE)", alone),
            (f"student {config.student} distilled ({config.method})", distilled),
        ]
        print(f"\n{'model':<44} {'params':>8} {'top-1 %':>8} {'top-5 %':>8} {'best top-1 %':>13}")
        for name, r in rows:
            params = sum(p.numel() for p in r.student.parameters()) / 1e6
            best = r.best_metrics["top1"] if r.best_metrics else float("nan")
            top5 = r.metrics.get("top5", float("nan"))
            print(f"{name:<44} {params:>7.2f}M {r.metrics['top1']:>8.2f} {top5:>8.2f} {best:>13.2f}")
        gain = distilled.metrics["top1"] - alone.metrics["top1"]
        print(
            f"\ndistillation: {gain:+.2f} points top-1 over the student alone "
            f"({config.dataset}[{config.val_split}], {distilled.metrics['num_samples']} images)"
        )
        print(f"distilled student (timm format): {distilled.output_dir / 'student'}")


if __name__ == "__main__":
    # a bad flag or a stopped run: one line `error: ...`, exit status 2
    sys.exit(cli.exit_on_error(main, "quickstart.py"))
