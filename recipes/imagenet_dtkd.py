"""Distill a pretrained timm teacher into a timm student on ImageNet-1k with DTKD.

DTKD (Dynamic Temperature Knowledge Distillation; Wei & Bai, 2024) gives teacher and student each
its own temperature per sample, from their maximum logits, so that both softened distributions are
equally sharp.

Run it (one GPU, or all GPUs that `accelerate config` set up):

    accelerate launch recipes/imagenet_dtkd.py --output-dir runs/resnet18_dtkd
    accelerate launch recipes/imagenet_dtkd.py --push-to-hub your-name/resnet18-dtkd-in1k

Distill from a teacher cache (the teacher runs once, FKD-style; docs/cache.md): build it with this
recipe's flags, then train from it with the same flags (the build refuses or repairs an existing
cache before the teacher runs):

    accelerate launch recipes/imagenet_dtkd.py --build-teacher-cache cache/r50 --num-views 100 --top-k 10
    accelerate launch recipes/imagenet_dtkd.py --teacher-cache cache/r50

Installed with pip (no clone), the same run is `timm-kd train --recipe imagenet_dtkd ...`, and on many GPUs
`accelerate launch -m timm_kd.cli train --recipe imagenet_dtkd ...`.

Resume a stopped run with the same command plus `--resume latest`. Smoke test on a laptop CPU, with
the embedded dataset and tiny random models (nothing is downloaded):

    accelerate launch recipes/imagenet_dtkd.py --dataset embedded --teacher test_resnet \\
        --student test_resnet --no-pretrained-teacher --max-train-steps 5 --max-eval-steps 2 \\
        --input-size 32 --batch-size 16 --num-workers 0 --output-dir runs/smoke

Defaults: ImageNet practice of the KD literature (timm_kd.engine.IMAGENET_DEFAULTS: ResNet-50 ->
ResNet-18, SGD lr 0.1 per 256 images, 100 epochs, lr x0.1 at 30/60/90) and the DTKD authors'
weights tau=4, alpha=3 (dtkd_weight), beta=1 (kd_weight), gamma=1 (ce_weight). The authors warm the
KD terms up over 20 of 240 CIFAR epochs; on ImageNet's 100 epochs we warm up over 1 epoch, as
mdistiller's ImageNet settings do for DKD. recipes/imagenet_ats.py is this script with ATS's defaults.
"""

import argparse
import sys

from timm_kd import cli, engine  # neither imports torch: --help answers at once

# The recipe's defaults live in the package (timm_kd.engine.recipes: the ImageNet practice plus
# DTKD's settings), shared with `timm-kd train --recipe imagenet_dtkd`.
RECIPE = "imagenet_dtkd"


def main():
    # 1. Arguments: every flag of the engine, with ImageNet and DTKD defaults (see --help).
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=engine.HelpFormatter)
    engine.add_train_args(parser, **engine.recipe_defaults(RECIPE))
    engine.add_cache_args(parser)  # --build-teacher-cache DIR (see docs/cache.md)
    args = parser.parse_args()
    config = engine.config_from_args(args)
    if args.build_teacher_cache:  # the teacher cache this run trains from (--teacher-cache DIR), then stop
        engine.build_cache_from_args(config, args)
        return

    # 2. A push that cannot work (bad repo id, no token, offline) fails now, not after training.
    from timm_kd import hub  # imports torch: after parse_args, so that --help is instant

    if args.push_to_hub:
        hub.check_push_ready(args.push_to_hub)

    # 3. Train: data checks, teacher check, distillation, per-epoch evaluation, checkpoints;
    #    the student is saved in timm's format to <output-dir>/student.
    result = engine.fit(config)

    # 4. Publish.
    if args.push_to_hub:
        engine.publish(result, args.push_to_hub, private=args.hub_private)


if __name__ == "__main__":
    # a bad flag, a diverged run or a broken teacher: one line `error: ...`, exit status 2
    sys.exit(cli.exit_on_error(main, "imagenet_dtkd.py"))
