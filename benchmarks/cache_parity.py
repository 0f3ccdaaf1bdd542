"""Accuracy parity of cached distillation (FKD-style top-k teacher cache) with online distillation.

    python benchmarks/cache_parity.py                      # ~10 min on 2 CPU cores
    python benchmarks/cache_parity.py --methods ats,kd --top-k 10

On the embedded dataset with the quickstart's models and schedule (recipes/quickstart.py):

1. trains the teacher with cross-entropy (saved in timm format),
2. distills the student online from it,
3. builds a teacher cache with ``num_views = epochs`` views per image and the top-k logits
   (``timm_kd.cache.build_teacher_cache``; view v is the view online training draws in epoch v),
4. distills the same student (same seed, same epochs, same views) from the cache, no teacher in memory,
5. measures the top-k approximation on the test split: for every registered loss, the relative
   error of the loss value and of its gradient with respect to the student logits, teacher and
   (online-distilled) student logits as they are after training (``timm_kd.cache.topk_error``).

It prints the accuracies, their difference (target: within 0.5 points) and the cache's bytes per
view, and writes everything to ``<output-dir>/cache_parity.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from timm_kd import create_loss, engine, list_losses
from timm_kd.cache import build_teacher_cache, topk_error

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_config() -> dict:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "recipes" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.QUICKSTART)


@torch.no_grad()
def _test_logits(model_dir: str, config: engine.TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a saved timm-format model on the test split (eval transform), and the labels."""
    from timm_kd import data as D
    from timm_kd.teacher import resolve_model

    model = resolve_model(f"local-dir:{model_dir}", pretrained=True, role="teacher").eval()
    test = D.load_image_dataset(
        config.dataset, config.val_split, embedded_kwargs=config.embedded_kwargs or None
    )
    dc = D.resolve_model_data_config(model, dataset_name=config.dataset, input_size=(3, 32, 32), crop_pct=1.0)
    tf = D.create_timm_transform(dc, is_training=False, dataset_name=config.dataset)
    loader = D.create_loader(D.apply_transform(test, tf), 256)
    logits, labels = [], []
    for batch in loader:
        logits.append(model(batch["pixel_values"]).float())
        labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="runs/cache_parity")
    parser.add_argument(
        "--methods", default="ats,kd", help="comma-separated losses to train online and cached"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (= cached views per image)")
    parser.add_argument("--teacher-arch", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=5000, help="embedded training images")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out = Path(args.output_dir)
    t0 = time.time()

    qs = _quickstart_config()
    base = engine.TrainConfig(
        **{
            **qs,
            "epochs": args.epochs,
            "seed": args.seed,
            "progress": False,
            "teacher_check": "warn",
            "log_every": 1000,
            "embedded_kwargs": {"num_train": args.num_train},
        }
    )
    timings: dict[str, float] = {}

    # 1. teacher
    t = time.time()
    teacher_dir = out / "teacher"
    if not (teacher_dir / "student" / "model.safetensors").is_file():
        engine.fit(
            dataclasses.replace(
                base,
                student=args.teacher_arch,
                teacher=None,
                method="ce",
                loss_kwargs={},
                epochs=args.teacher_epochs,
                output_dir=str(teacher_dir),
            )
        )
    timings["teacher_train_s"] = time.time() - t
    teacher = f"local-dir:{teacher_dir / 'student'}"

    # 3. the cache (built once, shared by the methods: it stores logits, not losses)
    t = time.time()
    cache_dir = out / f"cache_k{args.top_k}"
    manifest = build_teacher_cache(
        dataclasses.replace(base, teacher=teacher, pretrained_teacher=True),
        cache_dir,
        num_views=args.epochs,
        top_k=args.top_k,
    )
    timings["cache_build_s"] = time.time() - t

    results = []
    for method in args.methods.split(","):
        loss_kwargs = qs["loss_kwargs"] if method == qs["method"] else {}
        cfg = dataclasses.replace(
            base, teacher=teacher, pretrained_teacher=True, method=method, loss_kwargs=loss_kwargs
        )
        # 2. online
        t = time.time()
        online = engine.fit(dataclasses.replace(cfg, output_dir=str(out / f"online_{method}")))
        t_online = time.time() - t
        # 4. cached
        t = time.time()
        cached = engine.fit(
            dataclasses.replace(cfg, teacher_cache=str(cache_dir), output_dir=str(out / f"cached_{method}"))
        )
        t_cached = time.time() - t
        results.append(
            {
                "method": method,
                "online_top1": online.metrics["top1"],
                "cached_top1": cached.metrics["top1"],
                "diff": cached.metrics["top1"] - online.metrics["top1"],
                "online_wall_s": t_online,
                "cached_wall_s": t_cached,
            }
        )

    # 5. approximation error on real logits
    zt, y = _test_logits(str(teacher_dir / "student"), base)
    zs, _ = _test_logits(str(out / f"online_{args.methods.split(',')[0]}" / "student"), base)
    errors = {}
    for name in list_losses():
        errors[name] = topk_error(create_loss(name), zs, zt, y, args.top_k, epoch=float(args.epochs))

    print(
        f"\nteacher {args.teacher_arch}: top-1 on its {manifest['num_rows']} cached views "
        f"{manifest['teacher_view_top1']:.2f}%"
    )
    print(
        f"cache: top-{args.top_k} of {manifest['num_classes']} logits, {manifest['num_views']} views x "
        f"{manifest['num_images']} images, {manifest['bytes'] / 1e6:.2f} MB, "
        f"{manifest['bytes_per_view']:.1f} bytes per view (full fp32 logits: {4 * manifest['num_classes']} B)"
    )
    print(
        f"\n{'method':<8} {'online top-1':>12} {'cached top-1':>12} {'diff':>7} "
        f"{'online s':>9} {'cached s':>9}"
    )
    for r in results:
        print(
            f"{r['method']:<8} {r['online_top1']:>12.2f} {r['cached_top1']:>12.2f} {r['diff']:>+7.2f} "
            f"{r['online_wall_s']:>9.0f} {r['cached_wall_s']:>9.0f}"
        )
    print(f"\ntop-{args.top_k} approximation on the test split (trained teacher and student logits):")
    print(
        f"{'loss':<8} {'loss':>9} {'loss top-k':>10} {'loss rel err':>12} "
        f"{'grad rel err':>12} {'grad cos':>9}"
    )
    for name, e in errors.items():
        print(
            f"{name:<8} {e['loss']:>9.4f} {e['loss_topk']:>10.4f} {e['loss_rel_err']:>12.4f} "
            f"{e['grad_rel_err']:>12.4f} {e['grad_cos']:>9.4f}"
        )
    timings["total_s"] = time.time() - t0
    print(f"\ntimings (s): {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}")
    report = {
        "args": vars(args),
        "manifest": manifest,
        "results": results,
        "errors": errors,
        "timings": timings,
    }
    (out / "cache_parity.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"written to {out / 'cache_parity.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
