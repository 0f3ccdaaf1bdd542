"""What does a distillation training step cost, next to training the student alone?

One run, side by side, for every registered loss (small timm models, random weights, no download):

* **student alone**: ``student(x)``, cross-entropy, backward, SGD step (the physical limit);
* **teacher forward**: the bare teacher network under ``torch.inference_mode()``;
* **online**: ``DistillWrapper(student, teacher, loss)(x, y)``, backward, SGD step;
* **cached**: ``DistillWrapper(student, CachedTeacher, loss)(x, y, **columns)``, backward, SGD step:
  the teacher logits are rebuilt from the stored top-k columns (what ``compress_logits(z_t, k)``
  gives, with a tail prior up to 4096 classes, as a real cache has): no teacher runs;
* **timm task**: timm's own ``timm.task.LogitDistillationTask`` (KL at T = 4) with the same models.

Targets::

    online  <= 1.05 x (student alone + teacher forward)   and   online <= timm task
    cached  <= 1.10 x student alone

Time: all workloads run interleaved (the order rotates each round) for ``--repeats`` rounds after
``--warmup``; the table shows medians, the target table the median of per-round ratios (each
round's workloads share the machine's load of that moment). On CPU the default clock is the
process's CPU time (robust on a shared machine; ``--clock wall`` on an idle one); on CUDA it is wall
time between ``torch.cuda.synchronize()`` calls.

Memory: each workload runs again in a fresh process that builds only what it needs (the cached
step builds no teacher), runs a warm-up step, then reports its peak over two more steps: on CPU the
resident set size above the post-import baseline (``VmHWM`` after ``/proc/self/clear_refs``; PyTorch's
CPU allocations bypass ``tracemalloc``; Linux only), on CUDA ``torch.cuda.max_memory_allocated()``.

Cost growth: step time vs batch size and vs number of classes (100 -> 1000 -> 21841), for the
student alone, the teacher forward, online / cached ``--growth-loss`` and timm's task, printed and
plotted to ``--plot`` (needs matplotlib, from the ``demo`` extra).

The same command runs on a CUDA GPU, where bf16 autocast and channels-last are on by default::

    python benchmarks/distill_step.py                      # the README table (CPU: a few minutes)
    python benchmarks/distill_step.py --quick              # smoke test, tiny models, seconds
    python benchmarks/distill_step.py --student resnet50 --teacher resnet152 --img-size 224 \\
        --batch-size 128                                   # a GPU-sized run
    python benchmarks/distill_step.py --no-growth --memory none --losses kd ats

Timings depend on the machine and its load; they are reported as measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from _bench import interleaved_times, nbytes, status_kb
from timm.data import resolve_data_config

from timm_kd import DistillWrapper, list_losses
from timm_kd.cache import TAIL_PRIOR_MAX_CLASSES, CachedTeacher, compress_logits
from timm_kd.teacher import Teacher

EPOCH = 30.0  # past every default warm-up, so the warm-up losses compute all their terms
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENT, TEACHER, SUM, TIMM = "student alone", "teacher forward", "student + teacher forward", "timm task"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Targets: online <= 1.05 x (student + teacher forward), online <= timm task, "
        "cached <= 1.10 x student. See the module docstring for how time and memory are measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models and batch")
    g.add_argument("--student", default="resnet18", help="timm name of the student")
    g.add_argument("--teacher", default="resnet50", help="timm name of the teacher")
    g.add_argument("--img-size", type=int, default=64, help="input size in px (student and teacher)")
    g.add_argument("--batch-size", type=int, default=16, help="images per step")
    g.add_argument("--num-classes", type=int, default=1000, help="classes of both models")
    g.add_argument("--losses", nargs="*", default=None, help="registered losses to run (default: all)")
    g.add_argument("--topk", type=int, default=10, help="logits kept per image by the cache")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument(
        "--amp",
        choices=("bf16", "fp16", "none"),
        default=None,
        help="autocast dtype (default: bf16 on CUDA, none on CPU)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last inputs and models (default: on for CUDA, off on CPU)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the teacher (online, teacher forward, timm task); falls back to eager with "
        "a warning where torch.compile does not work",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on CPU)")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=8, help="timed rounds")
    g.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    g.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="CPU: process CPU time (cpu) or elapsed time (wall); CUDA always times wall clock",
    )
    g.add_argument(
        "--memory",
        choices=("all", "first", "none"),
        default="all",
        help="peak memory for every workload; 'first': the student alone and the first loss's online and "
        "cached steps only; 'none'",
    )
    g = p.add_argument_group("cost growth")
    g.add_argument("--growth", action=argparse.BooleanOptionalAction, default=True, help="run the sweeps")
    g.add_argument("--growth-batch-sizes", type=_ints, default=(8, 16, 32, 64), help="batch sweep")
    g.add_argument("--growth-classes", type=_ints, default=(100, 1000, 21841), help="class sweep")
    g.add_argument("--growth-loss", default="kd", help="loss of the online/cached lines of the sweeps")
    g.add_argument("--growth-repeats", type=int, default=3, help="timed rounds per sweep point")
    g.add_argument(
        "--plot",
        default=None,
        help="PNG of the sweeps (default: docs/img/distill_step.png; none with --quick; '' for none)",
    )
    g.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    g.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny test_* models, 32 px, 2 rounds, small sweeps, memory of the first loss only",
    )
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)  # "batch,classes" of a memory child
    args = p.parse_args(argv)
    if args.quick:
        args.student, args.teacher, args.img_size, args.batch_size = "test_resnet", "test_convnext", 32, 4
        args.num_classes, args.repeats, args.warmup, args.growth_repeats = 10, 2, 1, 1
        args.growth_batch_sizes, args.growth_classes = (2, 4), (10, 100)
        if args.memory == "all":
            args.memory = "first"
        if args.plot is None:
            args.plot = ""
    if args.plot is None:
        args.plot = os.path.join(ROOT, "docs", "img", "distill_step.png")
    args.losses = list(args.losses) if args.losses else list_losses()
    unknown = sorted(set(args.losses) - set(list_losses()))
    if unknown:
        p.error(f"unknown losses {unknown}; registered: {list_losses()}")
    for name in ("img_size", "batch_size", "num_classes", "repeats", "topk", "growth_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


# --------------------------------------------------------------------------------------------------
# execution settings


class Env:
    """Device, autocast and memory format, resolved once from the arguments."""

    def __init__(self, args: argparse.Namespace):
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.cuda = self.device.type == "cuda"
        amp = args.amp or ("bf16" if self.cuda else "none")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        self.channels_last = self.cuda if args.channels_last is None else args.channels_last
        if not self.cuda:
            torch.set_num_threads(args.threads or 1)
        self.clock = time.perf_counter if self.cuda or args.clock == "wall" else time.process_time
        self.clock_name = "wall" if self.clock is time.perf_counter else "CPU"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        if self.cuda:
            hw = torch.cuda.get_device_name(self.device)
        else:
            hw = f"CPU, {torch.get_num_threads()} thread(s)"
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        return f"{hw}, {amp}, channels_last={self.channels_last}, {self.clock_name} clock"


# --------------------------------------------------------------------------------------------------
# workloads


def online(loss: str) -> str:
    return f"online {loss}"


def cached(loss: str) -> str:
    return f"cached {loss}"


def _workloads(losses: list[str]) -> list[str]:
    names = [STUDENT, TEACHER, TIMM]
    for loss in losses:
        names += [online(loss), cached(loss)]
    return names


def build_steps(
    args: argparse.Namespace, env: Env, names: list[str], batch_size: int, num_classes: int
) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module]]:
    """``{workload: step()}`` for ``names``; builds only the models those workloads need."""
    torch.manual_seed(0)
    dev, cl = env.device, env.channels_last
    need_student = any(n != TEACHER for n in names)
    need_teacher = any(n in (TEACHER, TIMM) or n.startswith("online ") for n in names)
    student = teacher = None
    if need_student:
        student = timm.create_model(args.student, num_classes=num_classes).to(dev)
    if need_teacher:
        teacher = timm.create_model(args.teacher, num_classes=num_classes).to(dev)
        teacher.eval().requires_grad_(False)
    x = torch.randn(batch_size, 3, args.img_size, args.img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
        for m in (student, teacher):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    models = {k: m for k, m in (("student", student), ("teacher", teacher)) if m is not None}
    steps: dict[str, Callable[[], None]] = {}
    opt = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9) if student is not None else None

    def train_step(compute_loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with env.autocast():
                loss = compute_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    if student is not None:
        student.train()
        if STUDENT in names:
            steps[STUDENT] = train_step(lambda: F.cross_entropy(student(x), y))

    frozen = None
    if teacher is not None:
        s_cfg = resolve_data_config(model=student if student is not None else teacher)
        # one Teacher shared by every online workload (compiled once); same input size for both models
        frozen = Teacher(
            teacher,
            input_mean=s_cfg["mean"],
            input_std=s_cfg["std"],
            num_classes=num_classes,
            adapt_resolution=False,
            channels_last=cl,
            compile=args.compile,
            verbose=False,
        )
        net: Callable = teacher
        if args.compile:
            with env.autocast():
                frozen(x)  # compiles now, or warns and stays eager where torch.compile does not work
            net = frozen._compiled if frozen._compiled is not None else teacher

        if TEACHER in names:

            def teacher_forward() -> None:
                with torch.inference_mode(), env.autocast():
                    net(x)

            steps[TEACHER] = teacher_forward

        if TIMM in names and student is not None:
            from timm.task import LogitDistillationTask

            task = LogitDistillationTask(
                student, teacher, criterion=nn.CrossEntropyLoss(), temperature=4.0, device=dev, verbose=False
            )
            if net is not teacher:
                task.teacher.model = net  # the same compiled network
            task.train()
            steps[TIMM] = train_step(lambda: task(x, y)["loss"])

    for loss in args.losses:
        if online(loss) in names:
            wrapper = DistillWrapper(student, frozen, loss=loss, check_inputs=False, verbose=False)
            wrapper.train()
            steps[online(loss)] = train_step(lambda w=wrapper: w(x, y, epoch=EPOCH)["loss"])
        if cached(loss) in names:
            if frozen is not None:
                with env.autocast():
                    z_t = frozen(x)
            else:  # a memory child: no teacher in memory, as in a cached run
                z_t = torch.randn(batch_size, num_classes, device=dev) * 3
            store = compress_logits(z_t, min(args.topk, num_classes))
            columns = {f"teacher_{k}": v for k, v in store.items()}  # what a cached batch carries
            # the cache's tail prior (a real build stores one up to TAIL_PRIOR_MAX_CLASSES classes): its
            # values do not change the cost of rebuilding the logits, its shape does
            prior = None
            if num_classes <= TAIL_PRIOR_MAX_CLASSES:
                prior = torch.randn(num_classes, num_classes, device=dev).log_softmax(dim=1)
            teacher_c = CachedTeacher.from_prior(num_classes, prior)
            wrapper = DistillWrapper(student, teacher_c, loss=loss, check_inputs=False, verbose=False)
            wrapper.train()
            steps[cached(loss)] = train_step(lambda w=wrapper, c=columns: w(x, y, epoch=EPOCH, **c)["loss"])
    return steps, models


def time_steps(
    env: Env, steps: dict[str, Callable[[], None]], repeats: int, warmup: int, label: str = ""
) -> dict[str, list[float]]:
    """Seconds per step, ``repeats`` samples per workload, interleaved with a rotating order."""
    return interleaved_times(steps, repeats, warmup, clock=env.clock, sync=env.sync, progress=label)


# --------------------------------------------------------------------------------------------------
# memory: one fresh process per workload


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: the peak memory of one workload, printed as ``MEMORY {json}``."""
    env = Env(args)
    name = args._memory
    batch_size, num_classes = (int(v) for v in args._point.split(","))
    base = 0 if env.cuda else status_kb("VmRSS")
    steps, models = build_steps(args, env, [name], batch_size, num_classes)
    step = steps[name]
    step()  # warm-up: optimizer state, allocator pools, cached logits
    env.sync()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    step()
    step()
    env.sync()
    peak = torch.cuda.max_memory_allocated(env.device) if env.cuda else (status_kb("VmHWM") - base) * 1024
    out = {"peak_mb": peak / 2**20, "weights_mb": {k: nbytes(m) / 2**20 for k, m in models.items()}}
    print("MEMORY " + json.dumps(out))


def memory_all(argv: list[str], names: list[str], batch_size: int, num_classes: int) -> dict[str, float]:
    out = {}
    for i, name in enumerate(names):
        print(f"\rmemory {i + 1}/{len(names)}: {name}        ", end="", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        cmd += ["--_memory", name, "--_point", f"{batch_size},{num_classes}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY ")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"memory run for {name!r} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(line[-1][len("MEMORY ") :])["peak_mb"]
    print(file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# report


def _med(times: dict[str, list[float]], name: str) -> float:
    return statistics.median(times[name])


def _paired(times: dict[str, list[float]], num: str, den: list[str]) -> float:
    """Median over rounds of ``num / sum(den)`` (the same round shares the machine's load)."""
    return statistics.median(
        a / sum(parts) for a, *parts in zip(times[num], *(times[d] for d in den))
    )


def main_table(
    args: argparse.Namespace, times: dict[str, list[float]], mem: dict[str, float]
) -> tuple[list[str], dict]:
    b = args.batch_size
    med = {k: _med(times, k) for k in times}
    med[SUM] = med[STUDENT] + med[TEACHER]
    if STUDENT in mem and TEACHER in mem:
        mem = {**mem, SUM: mem[STUDENT] + mem[TEACHER]}
    s_t, s_m = med[STUDENT], mem.get(STUDENT)
    rows = [STUDENT, TEACHER, SUM, TIMM]
    for loss in args.losses:
        rows += [online(loss), cached(loss)]
    lines = [
        "| workload | step ms | x student | images/s | x student | peak MB | x student |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = {TEACHER: "teacher forward (no grad)", TIMM: "timm LogitDistillationTask (KL, T=4)"}.get(r, r)
        if r.startswith("cached "):
            label += f" (top-{args.topk})"
        t = med[r]
        m = mem.get(r)
        mcol = f"{m:.0f} | {m / s_m:.2f}" if m is not None and s_m else "- | -"
        lines.append(f"| {label} | {t * 1e3:.1f} | {t / s_t:.2f} | {b / t:.1f} | {s_t / t:.2f} | {mcol} |")

    targets = [
        "",
        "| loss | online / (student + teacher fwd) | online / timm task | cached / student | targets |",
        "|---|---:|---:|---:|:---:|",
    ]
    summary = {}
    for loss in args.losses:
        a = _paired(times, online(loss), [STUDENT, TEACHER])
        t = _paired(times, online(loss), [TIMM])
        c = _paired(times, cached(loss), [STUDENT])
        ok = a <= 1.05 and t <= 1.0 and c <= 1.10
        summary[loss] = {"online_over_budget": a, "online_over_timm": t, "cached_over_student": c, "met": ok}
        marks = "met" if ok else "**missed**"
        targets.append(f"| {loss} | {a:.3f} | {t:.3f} | {c:.3f} | {marks} |")
    return lines + targets, {"median_s": med, "peak_mb": mem, "ratios": summary}


def growth(args: argparse.Namespace, env: Env) -> dict:
    """Step time of five workloads vs batch size and vs classes (fresh models per point)."""
    loss = args.growth_loss
    names = [STUDENT, TEACHER, TIMM, online(loss), cached(loss)]
    keep = args.losses
    args.losses = [loss]
    res: dict[str, dict] = {"batch_size": {}, "num_classes": {}}
    try:
        points = [("batch_size", b, b, args.num_classes) for b in args.growth_batch_sizes]
        points += [("num_classes", c, args.batch_size, c) for c in args.growth_classes]
        for axis, value, b, c in points:
            steps, _ = build_steps(args, env, names, b, c)
            t = time_steps(env, steps, args.growth_repeats, 1, label=f"{axis}={value}: ")
            res[axis][value] = {k: _med(t, k) for k in names}
            del steps
    finally:
        args.losses = keep
    return res


def growth_tables(args: argparse.Namespace, res: dict) -> list[str]:
    loss = args.growth_loss
    names = [STUDENT, TEACHER, online(loss), cached(loss), TIMM]
    out = []
    fixed_of = {"batch_size": f"{args.num_classes} classes", "num_classes": f"batch {args.batch_size}"}
    for axis, fixed in fixed_of.items():
        out += ["", f"step ms vs {axis.replace('_', ' ')} ({fixed}; x student alone in brackets)", ""]
        out.append(f"| {axis.replace('_', ' ')} | " + " | ".join(names) + " |")
        out.append("|---:|" + "---:|" * len(names))
        for value, med in res[axis].items():
            cells = [f"{med[n] * 1e3:.1f} ({med[n] / med[STUDENT]:.2f})" for n in names]
            out.append(f"| {value} | " + " | ".join(cells) + " |")
    return out


def plot_growth(args: argparse.Namespace, env: Env, res: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'timm-kd[demo]'): no plot", file=sys.stderr)
        return None
    loss = args.growth_loss
    names = [STUDENT, TEACHER, online(loss), cached(loss), TIMM]
    styles = {STUDENT: "k-o", TEACHER: "C7--s", online(loss): "C0-o", cached(loss): "C2-o", TIMM: "C3:^"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, xlabel in (
        (axes[0], "batch_size", f"batch size ({args.num_classes} classes)"),
        (axes[1], "num_classes", f"classes (batch {args.batch_size})"),
    ):
        xs = list(res[axis])
        for n in names:
            ax.plot(xs, [res[axis][v][n] * 1e3 for v in xs], styles[n], label=n, ms=4)
        budget = [(res[axis][v][STUDENT] + res[axis][v][TEACHER]) * 1e3 for v in xs]
        ax.plot(xs, budget, "C7:", label=SUM)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(v) for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"step time, ms ({env.clock_name} clock)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{args.student} <- {args.teacher}, {args.img_size} px, cache top-{args.topk}; {env.describe()}",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._memory:
        memory_child(args)
        return {}
    env = Env(args)
    names = _workloads(args.losses)
    steps, models = build_steps(args, env, names, args.batch_size, args.num_classes)
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in models.items()}
    print(
        f"student {args.student} ({params['student']:.1f} M params) <- teacher {args.teacher} "
        f"({params['teacher']:.1f} M params), {args.img_size} px, batch {args.batch_size}, "
        f"{args.num_classes} classes, cache top-{args.topk}; {env.describe()}; torch {torch.__version__}, "
        f"timm {timm.__version__}; median of {args.repeats} interleaved rounds"
    )
    sys.stdout.flush()
    times = time_steps(env, steps, args.repeats, args.warmup)
    del steps, models

    mem: dict[str, float] = {}
    if args.memory != "none" and (env.cuda or os.path.exists("/proc/self/clear_refs")):
        want = names if args.memory == "all" else [STUDENT, online(args.losses[0]), cached(args.losses[0])]
        mem = memory_all(argv, want, args.batch_size, args.num_classes)
    lines, result = main_table(args, times, mem)
    print()
    print("\n".join(lines))
    sys.stdout.flush()

    if args.growth:
        res = growth(args, env)
        print("\n".join(growth_tables(args, res)))
        result["growth_s"] = res
        if args.plot:
            path = plot_growth(args, env, res, args.plot)
            if path:
                print(f"\nplot: {os.path.relpath(path)}")
    result["times_s"] = times
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
