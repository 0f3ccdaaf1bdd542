"""The capacity study: does a better teacher teach worse with KD, and which methods fix it?

A larger or longer-trained, more accurate teacher can give a student *worse* results with Hinton KD
(Cho & Hariharan, ICCV 2019; Li et al., NeurIPS 2022, arXiv 2210.04427): on the images the student
trains on, its soft targets are nearly one-hot. This recipe tests that on a CPU, with nothing to
download, in a design that can fail:

1. **Teacher ladders** (timm architectures, cross-entropy, each a complete run with its own cosine
   schedule, saved in timm's format and cached by its settings):
   ``schedule`` (the default): one architecture trained for E, 2E and 3E epochs;
   ``smoothing``: the same with label smoothing; ``size``: architectures of growing size at 3E.
   Each ladder is checked for rising test accuracy before any student is trained; a ladder that
   does not rise is reported as such.
2. **Teacher statistics** (``timm_kd.ranking.teacher_statistics``): on the training images
   (accuracy, confidence, wrong-class spread and entropy at τ 4, ATS's flips, dark knowledge) and on
   held-out training-distribution images (accuracy, ECE, NLL), and the ranking score.
3. **Students**: ``alone`` (cross-entropy) and ``kd``, ``ats``, ``isats``, ``dtkd``, ``lskd``,
   ``dist`` at their authors' defaults, for every seed (a seed fixes the student's start and batch
   order, so cells pair by seed). With tuning (the default), each method also gets the best of
   ``GRIDS[method]`` for each teacher, chosen on the held-out images (never the test images) from
   seed-0 runs, then trained on the other seeds.
4. **Report**: teacher table with the monotonicity check, student tables (mean ± std), paired
   differences against KD and against the student alone, how well the ranking score and the naive
   rule "most accurate teacher" order the KD students (Spearman), plots; ``results.md`` and
   ``results.json``.

    python recipes/capacity_study.py --quick                     # the pipeline, in minutes
    accelerate launch --multi_gpu --num_processes 2 \
        recipes/capacity_study.py                                # ladder schedule (~35 min, 2 CPUs)
    accelerate launch --multi_gpu --num_processes 2 \
        recipes/capacity_study.py --ladders schedule smoothing size
    python recipes/capacity_study.py --gpu                       # a larger setting for one GPU

Every cell is an independent training run: processes split cells (they do not train one model
together); a rerun trains only what is missing. The estimate printed at the start is measured on
this machine. Results and what they mean: docs/capacity_study.md.
"""

import argparse
import functools
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from timm_kd import create_loss, diagnostics, ranking, save_pretrained
from timm_kd.data import make_embedded_dataset

STUDY = dict(
    student="test_resnet",
    ladders=["schedule"],
    ladder_arch="resnet10t",
    base_epochs=6,  # E: the schedule ladder is E, 2E, 3E
    label_smoothing=0.1,
    size_archs=["test_resnet", "resnet10t", "resnet18d"],
    methods=["alone", "kd", "ats", "isats", "dtkd", "lskd", "dist"],
    seeds=[0, 1, 2],
    image_size=16,
    num_train=10_000,
    num_heldout=2_000,
    num_test=2_000,
    epochs=8,
    batch_size=128,
    lr=2e-3,
    weight_decay=0.05,
    output_dir="runs/capacity_study",
)
# --quick: the whole pipeline, small enough for CI.
QUICK = dict(
    ladder_arch="test_resnet",
    base_epochs=1,
    size_archs=["test_resnet", "test_efficientnet"],
    seeds=[0, 1],
    num_train=1_000,
    num_heldout=300,
    num_test=300,
    epochs=1,
    output_dir="runs/capacity_study_quick",
)
# --gpu: larger images, more data and longer schedules (not run on the project's CPU machine).
GPU = dict(
    image_size=32,
    num_train=50_000,
    num_heldout=5_000,
    num_test=10_000,
    base_epochs=15,
    epochs=30,
    batch_size=256,
    size_archs=["test_resnet", "resnet10t", "resnet18d", "resnet34d"],
    output_dir="runs/capacity_study_gpu",
)
LADDERS = ("schedule", "smoothing", "size")

# Tuning grids, fixed before any result was seen: the authors' default first (it wins ties), then
# the method's temperature halved and doubled (ATS: the student at tau_correct as in KD, and
# timm_kd.diagnostics.suggest_ats_temperatures on the teacher's training-set logits).
GRIDS = {
    "kd": [{}, {"tau": 2.0}, {"tau": 8.0}],
    "ats": [{}, {"student_tau": 4.0}, "suggested"],
    "isats": [{}, {"tau_correct": 2.0}, {"tau_correct": 8.0}],
    "dtkd": [{}, {"tau": 2.0}, {"tau": 8.0}],
    "lskd": [{}, {"tau": 1.0}, {"tau": 4.0}],
    "dist": [{}, {"tau": 2.0}, {"tau": 4.0}],
}
# DTKD's warm-up is 20 of 240 epochs in the authors' setting: the same fraction of this schedule.
DTKD_WARMUP_FRACTION = 20 / 240


def parse_args():
    """The study's settings: STUDY, then QUICK or GPU, then the flags given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the whole pipeline on tiny models, in minutes")
    p.add_argument("--gpu", action="store_true", help="a larger setting for one GPU (32 px, 50k images)")
    p.add_argument("--ladders", nargs="+", choices=LADDERS, default=None, help="default: schedule")
    p.add_argument("--methods", nargs="+", choices=STUDY["methods"], default=None, help="default: all")
    p.add_argument("--no-tune", action="store_true", help="the authors' defaults only")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="student seeds (default: 0 1 2)")
    p.add_argument("--output-dir", default=None, help=f"default: {STUDY['output_dir']}")
    for name in ("student", "ladder_arch"):
        p.add_argument(f"--{name.replace('_', '-')}", default=None, help=f"default: {STUDY[name]}")
    p.add_argument("--size-archs", nargs="+", default=None, help=f"default: {' '.join(STUDY['size_archs'])}")
    for name in ("base_epochs", "epochs", "num_train", "num_heldout", "num_test", "image_size", "batch_size"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default: {STUDY[name]}")
    p.add_argument("--label-smoothing", type=float, default=None, help="smoothing ladder (default: 0.1)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    cli = p.parse_args()
    if cli.quick and cli.gpu:
        p.error("--quick and --gpu are two sizes of the study: pick one")
    settings = {**STUDY, **(QUICK if cli.quick else GPU if cli.gpu else {})}
    settings.update({k: v for k, v in vars(cli).items() if v is not None and k in STUDY})
    args = argparse.Namespace(**settings, tune=not cli.no_tune, mixed_precision=cli.mixed_precision)
    for name in ("base_epochs", "epochs", "num_train", "num_heldout", "num_test", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.label_smoothing < 1.0:
        p.error("--label-smoothing must be in (0, 1)")
    return args


def teacher_ladders(args):
    """{ladder: [(arch, epochs, label_smoothing), ...]} in the order accuracy should rise."""
    E, arch, ls = args.base_epochs, args.ladder_arch, args.label_smoothing
    ladders = {
        "schedule": [(arch, k * E, 0.0) for k in (1, 2, 3)],
        "smoothing": [(arch, k * E, ls) for k in (1, 2, 3)],
        "size": [(a, 3 * E, 0.0) for a in args.size_archs],
    }
    return {name: ladders[name] for name in LADDERS if name in args.ladders}


def teacher_name(spec):
    arch, epochs, ls = spec
    return f"{arch}@{epochs}ep" + (f"+ls{ls:g}" if ls else "")


@functools.cache
def n_params(arch):
    return sum(p.numel() for p in timm.create_model(arch, num_classes=100).parameters())


def to_tensors(ds):
    """A split as in-memory tensors: images [N, 3, H, W] in [-1, 1], labels [N]."""
    images = np.stack([np.asarray(im.convert("RGB")) for im in ds["image"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0), torch.tensor(
        ds["label"]
    )


def load_data(args):
    """train / heldout (the last num_heldout images of the training distribution, never trained on) / test
    (unseen handwriting)."""
    pool = make_embedded_dataset(
        "train", image_size=args.image_size, num_train=args.num_train + args.num_heldout
    )
    x, y = to_tensors(pool)
    n = args.num_train
    test = to_tensors(make_embedded_dataset("test", image_size=args.image_size, num_test=args.num_test))
    return {"train": (x[:n], y[:n]), "heldout": (x[n:], y[n:]), "test": test}


def train(model, x, y, *, epochs, seed, args, accelerator, loss_fn=None, teacher_logits=None, smoothing=0.0):
    """AdamW + per-step cosine schedule, batches from a seeded permutation each epoch. Returns the
    per-epoch mean loss terms; stops (and records the epoch) if the loss is not finite."""
    device = accelerator.device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = math.ceil(len(x) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        sums = {}
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            with accelerator.autocast():
                logits = model(xb)
            if loss_fn is None:
                terms = {"loss": F.cross_entropy(logits.float(), yb, label_smoothing=smoothing)}
            else:  # the 1-based fractional epoch, for the warm-up of DTKD
                terms = loss_fn(logits, teacher_logits[idx].to(device), yb, epoch=epoch + 1 + step / steps)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        history.append({k: float(v) / steps for k, v in sums.items()})
        if not math.isfinite(history[-1]["loss"]):
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


def step_seconds(arch, args, device, steps=3):
    """Measured seconds of one training step of ``arch`` at the study's batch and image size."""
    model = timm.create_model(arch, num_classes=100).to(device)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def assign(jobs, world, cost):
    """Longest job first to the least-loaded process: the same split on every process."""
    loads, mine = [0.0] * world, [[] for _ in range(world)]
    for job in sorted(jobs, key=lambda j: -cost(j)):
        r = loads.index(min(loads))
        loads[r] += cost(job)
        mine[r].append(job)
    return mine


def train_teachers(args, out, data, specs, accelerator):
    """Train each missing teacher once; save it in timm's format with its logits on every split."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    missing = [s for s in specs if not (teacher_dir(out, s, args) / "logits.safetensors").exists()]
    for spec in specs:
        if spec not in missing:
            accelerator.print(f"teacher {teacher_name(spec)}: cached in {teacher_dir(out, spec, args)}")
    accelerator.wait_for_everyone()
    for spec in assign(missing, world, lambda s: n_params(s[0]) * s[1])[rank]:
        arch, epochs, ls = spec
        folder = teacher_dir(out, spec, args)
        t0 = time.time()
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=100).to(device)
        history = train(
            model, *data["train"], epochs=epochs, seed=0, args=args, accelerator=accelerator, smoothing=ls
        )
        logits = {split: predict(model, x, device) for split, (x, _) in data.items()}
        data_config = {
            "input_size": (3, args.image_size, args.image_size),
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        }
        save_pretrained(model, folder / "timm", data_config=data_config)  # local-dir:{folder}/timm
        meta = {
            "arch": arch,
            "epochs": epochs,
            "label_smoothing": ls,
            "params": n_params(arch),
            "train_loss": history[-1]["loss"],
            "seconds": time.time() - t0,
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        save_file(logits, folder / "logits.tmp.safetensors")
        os.replace(folder / "logits.tmp.safetensors", folder / "logits.safetensors")  # written last: done
        print(
            f"[rank {rank}] teacher {teacher_name(spec)}: {top1(logits['test'], data['test'][1]):.2f} % test "
            f"top-1 ({meta['seconds']:.0f} s)",
            flush=True,
        )
    accelerator.wait_for_everyone()
    teachers = {}
    for spec in specs:
        folder = teacher_dir(out, spec, args)
        logits = load_file(folder / "logits.safetensors")
        stats = ranking.teacher_statistics(
            logits["train"], data["train"][1], logits["heldout"], data["heldout"][1]
        )
        teachers[teacher_name(spec)] = {
            **json.loads((folder / "meta.json").read_text()),
            **stats,
            "test_top1": top1(logits["test"], data["test"][1]),
            "logits": logits["train"],
            "train_target": data["train"][1],
            "heldout_logits": logits["heldout"],
            "heldout_target": data["heldout"][1],
            "folder": str(folder / "timm"),
        }
    return teachers


def teacher_dir(out, spec, args):
    tag = f"{args.image_size}px_{args.num_train}_{args.num_heldout}_b{args.batch_size}"
    return out / "teachers" / f"{teacher_name(spec)}_{tag}"


def check_monotone(ladders, teachers):
    """{ladder: (rises, [test top-1 along the ladder])}: accuracy must rise strictly along a ladder."""
    result = {}
    for ladder, specs in ladders.items():
        accs = [teachers[teacher_name(s)]["test_top1"] for s in specs]
        result[ladder] = (all(b > a for a, b in zip(accs, accs[1:])), accs)
    return result


def resolve_kwargs(method, candidate, teacher, y_train):
    """A grid entry as the loss's keyword arguments (``"suggested"``: the helper's ATS temperatures)."""
    if candidate == "suggested":
        try:
            return diagnostics.suggest_ats_temperatures(teacher["logits"], y_train).as_kwargs()
        except diagnostics.TeacherAtChanceError:  # e.g. --quick's barely trained teachers
            return diagnostics.suggest_ats_temperatures(
                teacher["logits"], y_train, check_teacher=False
            ).as_kwargs()
    return dict(candidate)


def kwargs_tag(kwargs):
    return ",".join(f"{k}={v:g}" for k, v in sorted(kwargs.items())) or "default"


def cell_path(out, args, teacher, method, kwargs, seed):
    data = f"{args.image_size}px_{args.num_train}_{args.num_heldout}_{args.num_test}"
    tag = f"{args.student}_{data}_e{args.epochs}_b{args.batch_size}"
    return out / "cells" / f"{tag}__{teacher}__{method}__{kwargs_tag(kwargs)}__{seed}.json"


def train_cells(args, out, data, teachers, cells, accelerator):
    """Every missing (teacher, method, kwargs, seed) cell, split over the processes; each result is
    saved as it finishes (test and held-out top-1, per-epoch loss terms)."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    missing = [c for c in cells if not cell_path(out, args, *c).exists()]
    accelerator.wait_for_everyone()
    for teacher, method, kwargs, seed in missing[rank::world]:
        t0 = time.time()
        torch.manual_seed(seed)
        student = timm.create_model(args.student, num_classes=100).to(device)
        loss_fn, t_logits = None, None
        if method != "alone":
            extra = {"warmup_epochs": DTKD_WARMUP_FRACTION * args.epochs} if method == "dtkd" else {}
            loss_fn = create_loss(method, check_inputs=False, **{**extra, **kwargs})
            t_logits = teachers[teacher]["logits"]
        history = train(
            student,
            *data["train"],
            epochs=args.epochs,
            seed=seed,
            args=args,
            accelerator=accelerator,
            loss_fn=loss_fn,
            teacher_logits=t_logits,
        )
        result = {
            "teacher": teacher,
            "method": method,
            "loss_kwargs": kwargs,
            "seed": seed,
            "test_top1": top1(predict(student, data["test"][0], device), data["test"][1]),
            "heldout_top1": top1(predict(student, data["heldout"][0], device), data["heldout"][1]),
            "diverged_in_epoch": history[-1].get("diverged_in_epoch"),
            "history": history,
            "seconds": time.time() - t0,
        }
        path = cell_path(out, args, teacher, method, kwargs, seed)
        path.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
        os.replace(path.with_suffix(".tmp"), path)
        print(
            f"[rank {rank}] {teacher:>22} {method:>5} {kwargs_tag(kwargs):>22} seed {seed}: "
            f"{result['test_top1']:.2f} % ({result['seconds']:.0f} s)",
            flush=True,
        )
    accelerator.wait_for_everyone()


def read_cell(out, args, teacher, method, kwargs, seed):
    return json.loads(cell_path(out, args, teacher, method, kwargs, seed).read_text())


def choose_settings(args, out, teachers, y_train):
    """{(teacher, method): (chosen kwargs, [(kwargs, held-out top-1 of seed 0)])}: the grid entry
    with the best held-out accuracy (the default wins ties). Reads no test accuracy."""
    chosen = {}
    for t in teachers:
        for m in args.methods:
            if m == "alone":
                continue
            grid = [resolve_kwargs(m, c, teachers[t], y_train) for c in GRIDS[m]] if args.tune else [{}]
            grid = [g for i, g in enumerate(grid) if g not in grid[:i]]
            scores = [(g, read_cell(out, args, t, m, g, args.seeds[0])["heldout_top1"]) for g in grid]
            best = max(scores, key=lambda s: s[1])  # max keeps the first of equals: the default
            chosen[(t, m)] = (best[0], scores)
    return chosen


def count_runs(args, out, specs, missing_specs, methods):
    """Student runs still to train, about: the missing cells whose settings are known now, and
    for a teacher not trained yet also its suggested-temperature and tuned cells."""
    runs = sum(
        not cell_path(out, args, "-", "alone", {}, s).exists() for s in args.seeds if "alone" in args.methods
    )
    for spec in specs:
        t = teacher_name(spec)
        for m in methods:
            grid = GRIDS[m][1:] if args.tune else []
            known = [(g, args.seeds[0]) for g in grid if g != "suggested"] + [({}, s) for s in args.seeds]
            runs += sum(not cell_path(out, args, t, m, g, s).exists() for g, s in known)
            if spec in missing_specs:
                runs += sum(g == "suggested" for g in grid) + (len(args.seeds) - 1) * bool(grid)
    return runs


def estimate(args, specs, cells_per_seed, accelerator):
    """Print the expected wall time, from measured step times on this machine."""
    steps = math.ceil(args.num_train / args.batch_size)
    per_step = {a: step_seconds(a, args, accelerator.device) for a in {s[0] for s in specs} | {args.student}}
    teacher_s = sum(per_step[a] * steps * e for a, e, _ in specs)
    student_s = per_step[args.student] * steps * args.epochs * cells_per_seed
    minutes = (teacher_s + student_s) / accelerator.num_processes / 60
    accelerator.print(
        f"estimate: {minutes:.0f} min on {accelerator.num_processes} process(es) for what is not cached yet "
        f"({len(specs)} teachers, {cells_per_seed} student runs; a training step takes "
        + ", ".join(f"{a} {1000 * s:.0f} ms" for a, s in sorted(per_step.items()))
        + ")"
    )


def main():
    # 1. Arguments and processes (on a CPU, one thread per process: faster for these small models).
    args = parse_args()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))],
    )
    if accelerator.num_processes > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    out = Path(args.output_dir)
    (out / "teachers").mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    data = load_data(args)
    ladders = teacher_ladders(args)
    specs = list(dict.fromkeys(s for ladder in ladders.values() for s in ladder))
    methods = [m for m in args.methods if m != "alone"]
    accelerator.print(
        f"{args.num_train} train / {args.num_heldout} held-out / {args.num_test} test images, "
        f"{args.image_size} px; ladders {', '.join(ladders)}; {accelerator.num_processes} process(es)"
    )
    missing_specs = [s for s in specs if not (teacher_dir(out, s, args) / "logits.safetensors").exists()]
    estimate(args, missing_specs, count_runs(args, out, specs, missing_specs, methods), accelerator)

    # 2. Teachers, their statistics, and the monotonicity check, before any student is trained.
    teachers = train_teachers(args, out, data, specs, accelerator)
    monotone = check_monotone(ladders, teachers)
    for ladder, (rises, accs) in monotone.items():
        accelerator.print(
            f"ladder {ladder}: test top-1 {' -> '.join(f'{a:.2f}' for a in accs)}: "
            + ("rises" if rises else "DOES NOT RISE: what it shows about better teachers is void")
        )

    # 3. Students: the defaults for every seed, the tuning grid on the first seed ...
    y_train = data["train"][1]
    cells = [("-", "alone", {}, s) for s in args.seeds if "alone" in args.methods]
    for t in teachers:
        for m in methods:
            cells += [(t, m, {}, s) for s in args.seeds]
            if args.tune:
                cells += [
                    (t, m, resolve_kwargs(m, c, teachers[t], y_train), args.seeds[0]) for c in GRIDS[m][1:]
                ]
    train_cells(args, out, data, teachers, cells, accelerator)
    # ... then each method's setting chosen on the held-out images, on the other seeds.
    chosen = choose_settings(args, out, teachers, y_train)
    cells = [(t, m, kw, s) for (t, m), (kw, _) in chosen.items() if kw for s in args.seeds[1:]]
    train_cells(args, out, data, teachers, cells, accelerator)
    if accelerator.is_main_process:
        from capacity_report import write_report  # the tables and plots, beside this file

        write_report(args, out, ladders, teachers, monotone, chosen, read_cell, teacher_name)
        accelerator.print(f"({(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
