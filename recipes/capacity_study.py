"""The capacity-mismatch study: do bigger teachers teach worse with KD, and do ATS / DTKD fix it?

ATS (Li et al., NeurIPS 2022, arXiv 2210.04427) and DTKD (Wei & Bai 2024, arXiv 2404.12711) start
from the observation that a larger, more accurate teacher can give a student *worse* results with
Hinton KD, because its confident soft labels carry little about the wrong classes. This recipe
lets you watch whether that happens, on a CPU, with nothing to download:

1. trains a ladder of teachers of growing capacity on the embedded 100-class dataset (cross-entropy,
   one schedule for all; each is saved in timm's format, so a rerun skips it),
2. computes each teacher's logits on the training images once (the study uses no random
   augmentation, so these are exactly the logits an online teacher would produce),
3. distills one fixed student from each teacher with ``kd``, ``ats`` (authors' temperatures),
   ``ats`` at the temperatures ``timm_kd.diagnostics.suggest_ats_temperatures`` picks from that
   teacher's training-set logits, ``dtkd`` and ``isats``, plus the student trained alone, for
   several seeds (each cell's result is saved, so an interrupted study resumes where it stopped),
4. writes a Markdown and a CSV table (mean +- std over seeds), a plot of student accuracy vs
   teacher size per method, and the teacher diagnostics (wrong-class average and spread vs
   temperature, TS vs ATS) for the smallest and the largest teacher.

Run it (the full study: 57.7 minutes measured with two processes on this project's 2-core VM while
other jobs ran beside it; 3,150 CPU-seconds, so about 30 minutes on an idle 2-core machine):

    accelerate launch --multi_gpu --num_processes 2 recipes/capacity_study.py   # 2 CPU processes
    python recipes/capacity_study.py --quick                                      # about a minute

Every cell is an independent training run, so processes split the cells between them (they do not
train one model together). On one GPU run it with plain ``python`` or ``accelerate launch``.

Sized for a 2-core CPU: 16x16 images (each handwritten digit at its native 8x8 resolution, two per
image), 10,000 training and 2,000 test images, student ``test_resnet`` (0.38M parameters),
teachers from ``test_resnet`` itself to ``resnet34`` (21.3M, 56x the student), 8 epochs of AdamW
for teachers and students. Hyperparameters are fixed before any test accuracy is seen: each
method at its authors' defaults (DTKD's 20-of-240-epoch warm-up scaled to the same fraction of
this schedule), and the reported accuracy is the last epoch's, not the best. Results and what
they mean: docs/capacity_study.md.
"""

import argparse
import csv
import json
import math
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from timm_kd import create_loss, diagnostics, save_pretrained
from timm_kd.data import make_embedded_dataset

STUDY = dict(
    student="test_resnet",
    teachers=["test_resnet", "resnet10t", "resnet18", "resnet34"],
    methods=["alone", "kd", "ats", "ats_suggested", "dtkd", "isats"],
    seeds=[0, 1, 2],
    image_size=16,
    num_train=10_000,
    num_test=2_000,
    epochs=8,
    teacher_epochs=8,
    batch_size=128,
    lr=2e-3,
    weight_decay=0.05,
    output_dir="runs/capacity_study",
)
# --quick: the same pipeline, small enough for the test suite.
QUICK = dict(
    teachers=["test_resnet", "resnet10t"],
    seeds=[0],
    num_train=1_000,
    num_test=500,
    epochs=1,
    teacher_epochs=1,
    output_dir="runs/capacity_study_quick",
)

EXTRA_METHODS = ["ats_s4", "ts_s4"]  # for the analysis in docs/capacity_study.md (--methods ...)

# Each method at its authors' defaults (METHODS.md); the DTKD warm-up is 20 of 240 epochs there.
DTKD_WARMUP_FRACTION = 20 / 240


def loss_kwargs(method, epochs, suggestion):
    if method == "kd":
        return "kd", {}  # tau 4, ce 0.1, kd 0.9 (mdistiller's CIFAR-100 setting)
    if method == "ats":
        return "ats", {}  # tau_correct 4, tau_wrong 3, student tau 1, lambda 0.5 (authors' default)
    if method == "ats_suggested":
        return "ats", suggestion.as_kwargs()
    if method == "dtkd":
        return "dtkd", {"warmup_epochs": DTKD_WARMUP_FRACTION * epochs}  # tau 4, alpha 3, beta 1, gamma 1
    if method == "isats":
        return "isats", {}
    # Not in the default study: ATS's target with the student at KD's temperature (s = tau_correct),
    # and plain TS in ATS's objective (tau_correct = tau_wrong = s = 4, i.e. KD's gradient with
    # lambda = 0.5). docs/capacity_study.md uses them to find out why ats trails kd.
    if method == "ats_s4":
        return "ats", {"student_tau": 4.0}
    if method == "ts_s4":
        return "ats", {"tau_correct": 4.0, "tau_wrong": 4.0, "student_tau": 4.0}
    raise ValueError(f"unknown method {method!r}")


def load_split(split, args):
    """The embedded dataset as in-memory tensors: images [N, 3, H, W] in [-1, 1], labels [N]."""
    ds = make_embedded_dataset(
        split, image_size=args.image_size, num_train=args.num_train, num_test=args.num_test
    )
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x, torch.tensor(ds["label"])


def train(model, x, y, *, epochs, seed, args, device, accelerator, loss_fn=None, teacher_logits=None):
    """AdamW + per-step cosine schedule, batches drawn from a seeded permutation each epoch.

    Returns the per-epoch mean loss terms; stops early (and says so) if the loss is not finite.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        sums: dict[str, torch.Tensor] = {}
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            with accelerator.autocast():
                logits = model(xb)
            if loss_fn is None:
                terms = {"loss": F.cross_entropy(logits.float(), yb)}
            else:
                # epoch is 1-based and fractional, for the losses with a warm-up (DTKD)
                terms = loss_fn(
                    logits, teacher_logits[idx].to(device), yb, epoch=epoch + 1 + step / steps_per_epoch
                )
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        means = {k: float(v) / steps_per_epoch for k, v in sums.items()}  # one host sync per epoch
        history.append(means)
        if not math.isfinite(means["loss"]):
            history[-1]["diverged_in_epoch"] = epoch + 1
            break
    return history


@torch.no_grad()
def predict(model, x, device, batch_size=500):
    model.eval()
    return torch.cat(
        [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    )


def top1(logits, y):
    return 100.0 * (logits.argmax(-1) == y).float().mean().item()


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def parse_args():
    """The study's settings: STUDY, QUICK with --quick, then the flags given."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small version of the study (2 teachers, 1 seed)"
    )
    parser.add_argument(
        "--output-dir", default=None, help=f"results and caches (default: {STUDY['output_dir']})"
    )
    parser.add_argument("--student", default=None, help=f"timm architecture (default: {STUDY['student']})")
    parser.add_argument("--teachers", nargs="+", default=None, help=f"default: {' '.join(STUDY['teachers'])}")
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(STUDY['methods'])}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"student epochs (default: {STUDY['epochs']})"
    )
    parser.add_argument(
        "--teacher-epochs", type=int, default=None, help=f"default: {STUDY['teacher_epochs']}"
    )
    parser.add_argument("--num-train", type=int, default=None, help=f"default: {STUDY['num_train']}")
    parser.add_argument("--num-test", type=int, default=None, help=f"default: {STUDY['num_test']}")
    parser.add_argument("--image-size", type=int, default=None, help=f"default: {STUDY['image_size']}")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    cli = parser.parse_args()
    settings = {**STUDY, **(QUICK if cli.quick else {})}
    settings.update({k: v for k, v in vars(cli).items() if v is not None and k in STUDY})
    args = argparse.Namespace(**settings, mixed_precision=cli.mixed_precision)
    for name in ("epochs", "teacher_epochs", "num_train", "num_test", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    unknown = sorted(set(args.methods) - set(STUDY["methods"] + EXTRA_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {STUDY['methods'] + EXTRA_METHODS}")
    return args


def train_teachers(args, out, data, data_tag, accelerator):
    """Train each teacher once (largest first, spread over processes), save it in timm's format
    with its logits on the training and test images; return every teacher's facts and train logits."""
    (x_train, y_train), (x_test, y_test) = data
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device

    def teacher_dir(name):
        return out / "teachers" / f"{name}_{data_tag}"

    by_size = sorted(
        args.teachers,
        key=lambda n: -sum(p.numel() for p in timm.create_model(n, num_classes=100).parameters()),
    )
    for name in by_size[rank::world]:
        folder = teacher_dir(name)
        if (folder / "logits.safetensors").exists():
            print(f"[rank {rank}] teacher {name}: cached in {folder}")
            continue
        t0 = time.time()
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=100).to(device)
        history = train(
            model,
            x_train,
            y_train,
            epochs=args.teacher_epochs,
            seed=0,
            args=args,
            device=device,
            accelerator=accelerator,
        )
        logits = {"train": predict(model, x_train, device), "test": predict(model, x_test, device)}
        # loadable with timm.create_model(f"local-dir:{folder}/timm", pretrained=True)
        save_pretrained(model, folder / "timm")
        meta = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_loss": history[-1]["loss"],
            "train_top1": top1(logits["train"], y_train),
            "test_top1": top1(logits["test"], y_test),
            "seconds": time.time() - t0,
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        save_file(logits, folder / "logits.tmp.safetensors")
        os.replace(folder / "logits.tmp.safetensors", folder / "logits.safetensors")  # written last: done
        print(f"[rank {rank}] teacher {name}: {meta['test_top1']:.2f} % test top-1 ({meta['seconds']:.0f} s)")
    accelerator.wait_for_everyone()

    teachers = {}
    for name in args.teachers:
        folder = teacher_dir(name)
        teachers[name] = {
            **json.loads((folder / "meta.json").read_text()),
            "logits": load_file(folder / "logits.safetensors")["train"],
        }
    return teachers


def teacher_diagnostics(teachers, y_train, out, accelerator):
    """From the training-set logits only (never the test set): the ATS temperatures the helper
    suggests for each teacher, and the wrong-class statistics of the smallest and largest."""
    for name, t in teachers.items():
        try:
            t["suggestion"] = diagnostics.suggest_ats_temperatures(t["logits"], y_train)
        except diagnostics.TeacherAtChanceError as e:  # e.g. --quick's barely trained teachers
            accelerator.print(f"note: teacher {name}: {e} The 'ats (suggested)' cells use it anyway.")
            t["suggestion"] = diagnostics.suggest_ats_temperatures(t["logits"], y_train, check_teacher=False)
        probs = t["logits"].softmax(-1)
        t["train_confidence"] = 100.0 * probs.max(-1).values.mean().item()
    if accelerator.is_main_process:
        ladder = sorted(teachers, key=lambda n: teachers[n]["params"])
        rows = []
        for name in dict.fromkeys([ladder[0], ladder[-1]]):  # smallest and largest, side by side
            rows += diagnostics.temperature_sweep(teachers[name]["logits"], y_train, name=name)
        diagnostics.plot_temperature_sweep(
            rows, out / "teacher_diagnostics.png", title="Wrong-class statistics of the training-set targets"
        )
        (out / "teacher_diagnostics.md").write_text(diagnostics.format_sweep_table(rows) + "\n")


def cell_path(out, student_tag, teacher_name, method, seed):
    return out / "cells" / f"{student_tag}__{teacher_name}__{method}__{seed}.json"


def train_cells(args, out, data, teachers, cells, student_tag, accelerator):
    """Every (teacher, method, seed) cell, spread over the processes; each result is saved as it
    finishes, so a rerun only trains what is missing."""
    (x_train, y_train), (x_test, y_test) = data
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    for teacher_name, method, seed in cells[rank::world]:
        path = cell_path(out, student_tag, teacher_name, method, seed)
        if path.exists():
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        student = timm.create_model(args.student, num_classes=100).to(device)
        loss_fn, kwargs, t_logits = None, {}, None
        if method != "alone":
            teacher = teachers[teacher_name]
            loss_name, kwargs = loss_kwargs(method, args.epochs, teacher["suggestion"])
            loss_fn = create_loss(loss_name, check_inputs=False, **kwargs)
            t_logits = teacher["logits"]
        history = train(
            student,
            x_train,
            y_train,
            epochs=args.epochs,
            seed=seed,
            args=args,
            device=device,
            accelerator=accelerator,
            loss_fn=loss_fn,
            teacher_logits=t_logits,
        )
        result = {
            "teacher": teacher_name,
            "method": method,
            "seed": seed,
            "loss_kwargs": kwargs,
            "test_top1": top1(predict(student, x_test, device), y_test),
            "diverged_in_epoch": history[-1].get("diverged_in_epoch"),
            "history": history,
            "seconds": time.time() - t0,
        }
        path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        print(
            f"[rank {rank}] {teacher_name:>12} {method:>13} seed {seed}: {result['test_top1']:.2f} % "
            f"({result['seconds']:.0f} s)",
            flush=True,
        )
    accelerator.wait_for_everyone()


def teacher_row(name, t, methods, results, alone, student_params):
    """One teacher's Markdown cells, CSV row and notes (diverged seeds)."""
    alone_mean, alone_std = alone
    sug = t["suggestion"]
    row = [
        name,
        f"{t['params'] / 1e6:.2f}",
        f"{t['params'] / student_params:.0f}x",
        f"{t['test_top1']:.2f}",
        f"{t['train_confidence']:.1f}",
        f"({sug.tau_correct:g}, {sug.tau_wrong:g})",
    ]
    csv_row = {
        "teacher": name,
        "params": t["params"],
        "teacher_test_top1": t["test_top1"],
        "teacher_train_confidence": t["train_confidence"],
        "ats_suggested_tau_correct": sug.tau_correct,
        "ats_suggested_tau_wrong": sug.tau_wrong,
        "student_alone_mean": alone_mean,
        "student_alone_std": alone_std,
    }
    notes = []
    for m in methods:
        accs = [r["test_top1"] for r in results[(name, m)]]
        mean, std = mean_std(accs)
        diverged = [r["seed"] for r in results[(name, m)] if r["diverged_in_epoch"]]
        below = mean < alone_mean
        row.append(f"{mean:.2f} ± {std:.2f}" + (" ↓" if below else "") + (" (diverged)" if diverged else ""))
        csv_row.update(
            {f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": len(accs), f"{m}_diverged_seeds": len(diverged)}
        )
        if diverged:
            notes.append(f"{m} from {name} diverged for seeds {diverged}")
    return row, csv_row, notes


def write_results(args, out, teachers, cells, student_tag, t_start):
    """The table (Markdown + CSV) and the plot."""
    results = {}
    for teacher_name, method, seed in cells:
        r = json.loads(cell_path(out, student_tag, teacher_name, method, seed).read_text())
        results.setdefault((teacher_name, method), []).append(r)
    alone_mean, alone_std = mean_std(
        [r["test_top1"] for r in results.get(("-", "alone"), [])] or [float("nan")]
    )
    methods = [m for m in args.methods if m != "alone"]
    header = [
        "teacher",
        "params (M)",
        "x student",
        "teacher top-1",
        "teacher train conf.",
        "ATS suggested (t1, t2)",
    ]
    header += [f"{m} top-1" for m in methods]
    student_params = sum(p.numel() for p in timm.create_model(args.student, num_classes=100).parameters())
    table, csv_rows, notes = [], [], []
    for name in sorted(teachers, key=lambda n: teachers[n]["params"]):
        row, csv_row, row_notes = teacher_row(
            name, teachers[name], methods, results, (alone_mean, alone_std), student_params
        )
        table.append(row)
        csv_rows.append(csv_row)
        notes += row_notes
    md = [
        f"Student {args.student} ({student_params / 1e6:.2f}M) alone: {alone_mean:.2f} ± {alone_std:.2f} % "
        f"top-1 ({len(args.seeds)} seeds). Cells: mean ± std over seeds {args.seeds}; ↓ = below the "
        "student alone.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    md += ["| " + " | ".join(r) + " |" for r in table]
    md += ["", *notes]
    (out / "results.md").write_text("\n".join(md) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    plot_results(
        out / "student_vs_teacher_size.png", teachers, results, methods, alone_mean, alone_std, args.student
    )
    print("\n" + "\n".join(md))
    print(
        f"\nwritten to {out}: results.md, results.csv, student_vs_teacher_size.png, teacher_diagnostics.png "
        f"({(time.time() - t_start) / 60:.1f} min)"
    )


def main():
    # 1. Arguments.
    args = parse_args()

    # 2. Processes split the work; on a machine without a GPU they are CPU processes (gloo), one
    #    thread each, which is faster for these small models than two threads in one process.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=3))],
    )
    if accelerator.num_processes > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    out = Path(args.output_dir)
    (out / "teachers").mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    data = (load_split("train", args), load_split("test", args))
    data_tag = f"{args.image_size}px_{args.num_train}_{args.num_test}_e{args.teacher_epochs}"
    accelerator.print(
        f"{len(data[0][0])} train / {len(data[1][0])} test images, {args.image_size}x{args.image_size}, "
        f"{accelerator.num_processes} process(es)"
    )

    # 3. Teachers: trained once each, saved in timm's format with their logits.
    teachers = train_teachers(args, out, data, data_tag, accelerator)

    # 4. Diagnostics from the training-set logits only.
    teacher_diagnostics(teachers, data[0][1], out, accelerator)

    # 5. Students: every (teacher, method, seed) cell, plus the student alone per seed.
    cells = [("-", "alone", s) for s in args.seeds if "alone" in args.methods]
    cells += [(t, m, s) for t in args.teachers for m in args.methods if m != "alone" for s in args.seeds]
    student_tag = f"{args.student}_{data_tag}_s{args.epochs}"
    train_cells(args, out, data, teachers, cells, student_tag, accelerator)
    if not accelerator.is_main_process:
        return

    # 6. The table (Markdown + CSV) and the plots.
    write_results(args, out, teachers, cells, student_tag, t_start)


def plot_results(path, teachers, results, methods, alone_mean, alone_std, student):
    """Student accuracy vs teacher parameters, one line per method (the papers' main figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(teachers, key=lambda n: teachers[n]["params"])
    params = [teachers[n]["params"] / 1e6 for n in names]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        stats = [mean_std([r["test_top1"] for r in results[(n, m)]]) for n in names]
        ax.errorbar(params, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=m)
    ax.plot(params, [teachers[n]["test_top1"] for n in names], "k--", marker="s", label="teacher itself")
    ax.axhspan(alone_mean - alone_std, alone_mean + alone_std, color="grey", alpha=0.25)
    ax.axhline(alone_mean, color="grey", label=f"{student} alone")
    for n, p in zip(names, params):
        ax.annotate(
            n,
            (p, teachers[n]["test_top1"]),
            textcoords="offset points",
            xytext=(0, 6),
            fontsize=7,
            ha="center",
        )
    ax.set_xscale("log")
    ax.set_xlabel("teacher parameters (M, log scale)")
    ax.set_ylabel("test top-1 %")
    ax.set_title(f"Student {student} distilled from teachers of growing capacity")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
