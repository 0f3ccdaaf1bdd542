"""Accuracy parity of cached distillation (FKD-style top-k teacher cache) with online distillation.

    python benchmarks/cache_parity.py                      # ~45 min on 2 CPU cores
    python benchmarks/cache_parity.py --methods kd --seeds 0 --tails prior,flat

On the embedded dataset with the quickstart's models and schedule (recipes/quickstart.py: teacher
resnet10t trained 3 epochs with cross-entropy, student test_resnet distilled 3 epochs), for each seed:

1. trains the teacher once (seed 42, saved in timm format; reused by every seed),
2. distills the student online from it, for each method,
3. builds a teacher cache with ``num_views = epochs`` views per image and the top-k logits
   (``timm_kd.engine.build_teacher_cache``; view v is the view online training draws in epoch v with
   this seed), with its tail prior,
4. distills the same student (same seed, same epochs, same views) from the cache, no teacher in memory,
   once per tail mode (``--teacher-cache-tail``: ``prior``, the default, and ``flat``, the ablation),
5. measures the top-k approximation on the test split: for every registered loss and tail mode, the
   relative error of the loss value and of its gradient with respect to the student logits, teacher and
   (online-distilled) student logits as they are after training (``timm_kd.cache.topk_error``).

It prints every run's accuracy, the cached-minus-online difference per seed and its mean over seeds
(target: within 0.5 points for k = 10), and the cache's bytes per view, and writes everything to
``<output-dir>/cache_parity.json``. Runs already in ``<output-dir>`` are read back, not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from timm_kd import create_loss, engine, list_losses
from timm_kd import data as D
from timm_kd.cache import TeacherCache, topk_error
from timm_kd.engine import build_teacher_cache
from timm_kd.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_config() -> dict:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "recipes" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.QUICKSTART)


@torch.no_grad()
def _test_logits(model_dir: str, config: engine.TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a saved timm-format model on the test split (eval transform), and the labels."""
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


def _fit_once(config: engine.TrainConfig) -> float:
    """Top-1 of a run: read from its summary when the run already finished, else trained now."""
    summary = Path(config.output_dir) / "run_summary.json"
    if summary.is_file():
        return float(json.loads(summary.read_text())["metrics"]["top1"])
    return float(engine.fit(config).metrics["top1"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="runs/cache_parity")
    parser.add_argument(
        "--methods", default="kd,ats", help="comma-separated losses to train online and cached"
    )
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--tails", default="prior,flat", help="comma-separated --teacher-cache-tail modes")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (= cached views per image)")
    parser.add_argument("--teacher-arch", default="resnet10t")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=10_000, help="embedded training images")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    parser.add_argument("--json", default=None, help="report file (default: <output-dir>/cache_parity.json)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    methods, tails = args.methods.split(","), args.tails.split(",")
    seeds = [int(v) for v in args.seeds.split(",")]
    t0 = time.time()

    qs = _quickstart_config()
    base = engine.TrainConfig(
        **{
            **qs,
            "epochs": args.epochs,
            "seed": 42,
            "progress": False,
            "teacher_check": "warn",
            "log_every": 1000,
            "embedded_kwargs": {"num_train": args.num_train},
        }
    )

    # 1. teacher
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
    teacher = f"local-dir:{teacher_dir / 'student'}"

    results, manifest = [], None
    for seed in seeds:
        seeded = dataclasses.replace(base, seed=seed, teacher=teacher, pretrained_teacher=True)
        # 3. the cache of this seed's views (shared by the methods and tails: it stores logits, not losses)
        cache_dir = out / f"cache_k{args.top_k}_seed{seed}"
        manifest = build_teacher_cache(seeded, cache_dir, num_views=args.epochs, top_k=args.top_k)
        for method in methods:
            loss_kwargs = qs["loss_kwargs"] if method == qs["method"] else {}
            cfg = dataclasses.replace(seeded, method=method, loss_kwargs=loss_kwargs)
            # 2. online
            row = {"seed": seed, "method": method}
            online_dir = str(out / f"online_{method}_s{seed}")
            row["online"] = _fit_once(dataclasses.replace(cfg, output_dir=online_dir))
            # 4. cached, per tail mode
            for tail in tails:
                row[tail] = _fit_once(
                    dataclasses.replace(
                        cfg,
                        teacher_cache=str(cache_dir),
                        teacher_cache_tail=tail,
                        output_dir=str(out / f"cached_k{args.top_k}_{tail}_{method}_s{seed}"),
                    )
                )
            results.append(row)
            print(f"seed {seed} {method}: " + ", ".join(f"{k} {row[k]:.2f}" for k in ["online", *tails]))

    # 5. approximation error on real logits (first seed's cache prior and online student)
    prior = TeacherCache(out / f"cache_k{args.top_k}_seed{seeds[0]}").tail_prior
    zt, y = _test_logits(str(teacher_dir / "student"), base)
    zs, _ = _test_logits(str(out / f"online_{methods[0]}_s{seeds[0]}" / "student"), base)
    errors = {
        tail: {
            name: topk_error(
                create_loss(name), zs, zt, y, args.top_k, epoch=float(args.epochs),
                tail_prior=prior if tail == "prior" else None,
            )
            for name in list_losses()
        }
        for tail in tails
    }

    print(
        f"\nteacher {args.teacher_arch}: top-1 on its {manifest['num_rows']} cached views (last seed) "
        f"{manifest['teacher_view_top1']:.2f}%"
    )
    print(
        f"cache: top-{args.top_k} of {manifest['num_classes']} logits, {manifest['num_views']} views x "
        f"{manifest['num_images']} images, {manifest['bytes'] / 1e6:.2f} MB, "
        f"{manifest['bytes_per_view']:.1f} bytes per view (full fp32 logits: "
        f"{4 * manifest['num_classes']} B); "
        f"tail prior {4 * manifest['num_classes'] ** 2 / 1e6:.2f} MB per cache"
    )
    head = f"{'method':<7} {'seed':>4} {'online':>7}" + "".join(f" {t:>7} {'diff':>6}" for t in tails)
    print(f"\ntest top-1 (%), cached with top-{args.top_k}, per tail mode:\n{head}")
    for r in results:
        print(
            f"{r['method']:<7} {r['seed']:>4} {r['online']:>7.2f}"
            + "".join(f" {r[t]:>7.2f} {r[t] - r['online']:>+6.2f}" for t in tails)
        )
    summary = {}
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        summary[method] = {t: statistics.mean(r[t] - r["online"] for r in rows) for t in tails}
        summary[method]["online"] = statistics.mean(r["online"] for r in rows)
        print(
            f"{method:<7} {'mean':>4} {summary[method]['online']:>7.2f}"
            + "".join(f" {'':>7} {summary[method][t]:>+6.2f}" for t in tails)
        )
    for tail in tails:
        print(f"\ntop-{args.top_k} approximation, tail {tail}, test split (trained teacher and student):")
        print(
            f"{'loss':<8} {'loss':>9} {'loss top-k':>10} {'loss rel err':>12} "
            f"{'grad rel err':>12} {'grad cos':>9}"
        )
        for name, e in errors[tail].items():
            print(
                f"{name:<8} {e['loss']:>9.4f} {e['loss_topk']:>10.4f} {e['loss_rel_err']:>12.4f} "
                f"{e['grad_rel_err']:>12.4f} {e['grad_cos']:>9.4f}"
            )
    total = time.time() - t0
    print(f"\ntotal {total / 60:.1f} min")
    report = {
        "args": vars(args),
        "manifest": manifest,
        "results": results,
        "mean_diff": summary,
        "errors": errors,
        "total_s": total,
    }
    path = Path(args.json) if args.json else out / "cache_parity.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"written to {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
