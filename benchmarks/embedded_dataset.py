"""How hard is the embedded dataset? Train a small student and a large teacher alone (plain CE).

Measures, for each difficulty setting, the top-1 test accuracy and wall time of each model trained
from scratch with cross-entropy only, side by side in one run, and prints a table. The default
setting must leave the student clearly below the teacher (room for distillation); the easy
setting (every training digit, no noise, shift or distortion) shows how easy the task becomes
without the knobs. The numbers in docs/data.md come from:

    python benchmarks/embedded_dataset.py                      # default vs easy, test_resnet, resnet10t
    python benchmarks/embedded_dataset.py --settings default distorted \\
        --models test_convnext test_efficientnet test_resnet resnet10t

Timings depend on the machine and its load; they are reported as measured.
"""
from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from timm_kd.data import (
    EMBEDDED_NAME,
    apply_transform,
    create_loader,
    create_timm_transform,
    load_image_dataset,
)

SETTINGS = {
    # name: make_embedded_dataset kwargs (the default: 150 source digits, noise 0.3, shift 2)
    "default": {},
    "easy": {"num_source_digits": None, "noise": 0.0, "max_shift": 0, "distortion": 0.0},
    "distorted": {"distortion": 1.0},
    "distorted-all": {"num_source_digits": None, "distortion": 1.0},
}


def evaluate(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            correct += (model(batch["pixel_values"]).argmax(-1) == batch["label"]).sum().item()
            total += len(batch["label"])
    return 100.0 * correct / total


def train_alone(model_name: str, embedded_kwargs: dict, args) -> dict:
    torch.manual_seed(args.seed)
    model = timm.create_model(model_name, num_classes=100)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    build = time.perf_counter()
    train = load_image_dataset(EMBEDDED_NAME, "train", embedded_kwargs={"seed": args.seed, **embedded_kwargs})
    test = load_image_dataset(EMBEDDED_NAME, "test", embedded_kwargs={"seed": args.seed, **embedded_kwargs})
    build = time.perf_counter() - build
    train_tf = create_timm_transform(model, is_training=True, dataset_name=EMBEDDED_NAME)
    eval_tf = create_timm_transform(model, is_training=False, dataset_name=EMBEDDED_NAME)
    train_loader = create_loader(
        apply_transform(train, train_tf, seed=args.seed),
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    test_loader = create_loader(apply_transform(test, eval_tf), 256, num_workers=args.workers)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=args.epochs, warmup_epochs=1, warmup_lr=args.lr * 0.1,
        updates_per_epoch=len(train_loader), step_on_epochs=False,
    )
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            loss = F.cross_entropy(model(batch["pixel_values"]), batch["label"], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        if args.verbose:
            print(f"  {model_name} epoch {epoch}: loss {loss.item():.3f}", flush=True)
    train_time = time.perf_counter() - start
    top1 = evaluate(model, test_loader)
    return {"model": model_name, "params_m": params, "top1": top1, "train_s": train_time, "build_s": build}


def parse_setting(text: str) -> dict:
    if ":" not in text:
        if text not in SETTINGS:
            raise SystemExit(f"unknown setting {text!r}; named settings: {sorted(SETTINGS)}")
        return SETTINGS[text]
    kwargs = {}
    for item in text.split(":", 1)[1].split(","):
        key, value = item.split("=")
        kwargs[key] = None if value == "None" else (float(value) if "." in value else int(value))
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=["default", "easy"],
                        help=f"named settings {sorted(SETTINGS)} or custom ones written "
                        f"name:key=value,key=value (e.g. hard:noise=0.5,max_shift=3,num_source_digits=None)")
    parser.add_argument("--student", default="test_resnet", help="small model (timm name)")
    parser.add_argument("--teacher", default="resnet10t", help="large model (timm name)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="train these models instead of --student and --teacher")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a loaded 2-core machine slows down badly with 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for setting in args.settings:
        kwargs = parse_setting(setting)
        setting = setting.split(":")[0]
        for name in args.models or (args.student, args.teacher):
            row = {"setting": setting, **train_alone(name, kwargs, args)}
            rows.append(row)
            print(f"{setting:>10} {name:>14}: top-1 {row['top1']:.1f} % in {row['train_s']:.0f} s",
                  flush=True)

    print(f"\n{args.epochs} epochs, AdamW lr {args.lr}, batch {args.batch_size}, CE (label smoothing 0.1), "
          f"{torch.get_num_threads()} threads")
    print("| setting | model | params (M) | top-1 (%) | train time (s) | dataset build (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['model']} | {r['params_m']:.2f} | {r['top1']:.1f} | {r['train_s']:.0f} "
              f"| {r['build_s']:.1f} |")


if __name__ == "__main__":
    main()
