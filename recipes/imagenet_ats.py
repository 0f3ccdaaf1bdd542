"""Distill a pretrained timm teacher into a timm student on ImageNet-1k with ATS.

ATS (Asymmetric Temperature Scaling; Li et al., NeurIPS 2022) softens the teacher's wrong classes
with their own temperature tau_wrong and the true class with tau_correct, so that a large, confident
teacher still passes on how it ranks the wrong classes.

Run it (one GPU, or all GPUs that `accelerate config` set up):

    accelerate launch recipes/imagenet_ats.py --output-dir runs/resnet18_ats
    accelerate launch recipes/imagenet_ats.py --push-to-hub your-name/resnet18-ats-in1k

Resume a stopped run with the same command plus `--resume latest`. Smoke test on a laptop CPU, with
the embedded dataset and tiny random models (nothing is downloaded):

    accelerate launch recipes/imagenet_ats.py --dataset embedded --teacher test_resnet \\
        --student test_resnet --no-pretrained-teacher --max-train-steps 5 --max-eval-steps 2 \\
        --input-size 32 --batch-size 16 --num-workers 0 --output-dir runs/smoke

Defaults: ImageNet practice of the KD literature (timm_kd.engine.IMAGENET_DEFAULTS: ResNet-50 ->
ResNet-18, SGD lr 0.1 per 256 images, 100 epochs, lr x0.1 at 30/60/90) and the ATS authors' default
temperatures tau_correct=4, tau_wrong=3, student temperature 1, lambda=0.5 (kd_weight).
recipes/imagenet_dtkd.py is this script with DTKD's defaults.
"""

import argparse

from timm_kd import engine, hub

# The only part that differs between the ImageNet recipes: the method and its defaults.
METHOD = dict(
    method="ats",
    loss_kwargs={"tau_correct": 4.0, "tau_wrong": 3.0, "student_tau": 1.0, "kd_weight": 0.5},
    output_dir="runs/imagenet_ats",
)


def main():
    # 1. Arguments: every flag of the engine, with ImageNet and ATS defaults (see --help).
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=engine.HelpFormatter)
    engine.add_train_args(parser, **{**engine.IMAGENET_DEFAULTS, **METHOD})
    args = parser.parse_args()
    config = engine.config_from_args(args)

    # 2. A push that cannot work (bad repo id, no token, offline) fails now, not after training.
    if args.push_to_hub:
        hub.check_push_ready(args.push_to_hub)

    # 3. Train: data checks, teacher check, distillation, per-epoch evaluation, checkpoints;
    #    the student is saved in timm's format to <output-dir>/student.
    result = engine.fit(config)

    # 4. Publish.
    if args.push_to_hub:
        engine.publish(result, args.push_to_hub, private=args.hub_private)


if __name__ == "__main__":
    main()
