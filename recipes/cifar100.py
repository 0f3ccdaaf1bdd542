"""Distill on CIFAR-100 with the papers' settings: ATS, ISATS, DTKD, KD, or any registered loss.

    accelerate launch recipes/cifar100.py --method ats
    accelerate launch recipes/cifar100.py --method dtkd --teacher hf-hub:your-name/resnet50-cifar100

Without a trained teacher (--teacher with weights, or --teacher-checkpoint), the script first trains
one with cross-entropy on the same schedule (as the papers do before distilling), saves it in timm's
format to <output-dir>/teacher/student, then distills from that folder. Resume either stage with
--resume latest.

Installed with pip (no clone), the same run is `timm-kd train --recipe cifar100 ...`. With
--method ce the student trains alone with cross-entropy (the baseline the papers compare with).

Schedule (timm_kd.engine.CIFAR100_DEFAULTS, from the papers): SGD lr 0.05, momentum 0.9, weight decay
5e-4, 240 epochs, lr x0.1 at epochs 150, 180 and 210. Per method
(timm_kd.engine.recipes.CIFAR100_METHODS):
  ats, isats: batch 128 and a 5-epoch linear warm-up (ATS authors' scripts), tau_correct=4,
              tau_wrong=3, student temperature 1, lambda=0.5;
  dtkd:       batch 64, tau=4, alpha=3, beta=1, gamma=1, KD warm-up over 20 epochs (DTKD authors,
              their res32x4 -> res8x4 setting);
  kd:         batch 64, T=4, CE weight 0.1, KD weight 0.9 (mdistiller);
  others:     batch 64 and the loss's own defaults.
The papers' CIFAR networks (resnet32x4, resnet8x4...) are not timm models; the defaults are timm's
ResNet-50 -> ResNet-18 at CIFAR's 32 px, whose stride-4 stem costs accuracy: --input-size 64 gives
more at 4x the compute. timm's random-resized crop (scale 0.6-1) replaces the papers' pad-and-crop.

Smoke test with the embedded dataset and tiny models (nothing is downloaded):

    accelerate launch recipes/cifar100.py --method dtkd --dataset embedded --student test_resnet \\
        --teacher-arch test_resnet --teacher-epochs 1 --max-train-steps 5 --max-eval-steps 2 \\
        --num-workers 0 --teacher-check warn --output-dir runs/smoke_cifar
"""

import argparse
import sys

from timm_kd import cli, engine  # neither imports torch: --help answers at once

# The per-method settings (listed above) are timm_kd.engine.recipes.CIFAR100_METHODS; everything
# else is engine.CIFAR100_DEFAULTS. `timm-kd train --recipe cifar100` uses the same tables.
RECIPE = "cifar100"


def main():
    # 1. Arguments: --method first, because it picks the defaults of the others ('ce': the student
    #    alone with cross-entropy, the baseline; any other name is a distillation loss).
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default="ats")
    method = pre.parse_known_args()[0].method
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=engine.HelpFormatter)
    engine.add_train_args(parser, **engine.recipe_defaults(RECIPE, method))
    cli.add_teacher_stage_args(parser)  # --teacher-arch, --teacher-epochs
    args = parser.parse_args()
    config = engine.config_from_args(args)

    from timm_kd import hub  # imports torch: after parse_args, so that --help is instant

    if args.push_to_hub:
        hub.check_push_ready(args.push_to_hub)  # fails now, not after training

    # 2. The teacher: given, or trained here with cross-entropy and saved in timm's format
    #    (<output-dir>/teacher/student); the distillation then reads it from that folder.
    teacher_config, config = engine.teacher_stage(config, args.teacher_arch, args.teacher_epochs)
    if teacher_config is not None:
        engine.fit(teacher_config)

    # 3. Distill (or, with --method ce, train the student alone).
    result = engine.fit(config)

    # 4. Publish.
    if args.push_to_hub:
        engine.publish(result, args.push_to_hub, private=args.hub_private)


if __name__ == "__main__":
    # a bad flag, a diverged run or a broken teacher: one line `error: ...`, exit status 2
    sys.exit(cli.exit_on_error(main, "cifar100.py"))
