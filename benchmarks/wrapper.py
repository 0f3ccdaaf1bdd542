"""What does DistillWrapper cost on top of the two models it runs? Time and peak memory, on CPU.

Three workloads, measured side by side in one run:

* **student step**: ``student(x)``, cross-entropy, backward, SGD step: training without a teacher;
* **teacher forward**: the bare teacher network under ``torch.inference_mode()`` on the tensor it
  sees (already resized / re-normalized, so the adapters are *not* in this number);
* **wrapper step**: ``DistillWrapper(...)(x, y)``, backward, SGD step: adapters, teacher, student,
  distillation loss.

Target: wrapper step <= 1.05 x (student step + teacher forward).

Time: the three are run interleaved (rotating order) for ``--repeats`` rounds after ``--warmup``
rounds; the table shows medians and the min-max range.

Memory: each workload runs in a *fresh* Python process that records its resident set size (RSS)
after imports, builds only the models it needs, runs one warm-up step (optimizer state is
allocated there), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs two more
steps and reads the peak (``VmHWM``). "peak above imports" = that peak - RSS after imports: weights,
gradients, optimizer state, activations and the allocator's retained free blocks. PyTorch's CPU
allocations go through malloc, so ``tracemalloc`` cannot see them; RSS can. Linux only. Target:
wrapper <= student step + teacher forward (whose figure is the teacher's weights plus one forward's
activations).

    python benchmarks/wrapper.py                                   # resnet18 <- resnet50, 224 px
    python benchmarks/wrapper.py --student resnet18 --teacher vit_small_patch16_224 --img-size 160
    python benchmarks/wrapper.py --batch-size 32 --repeats 20 --threads 2

Models are randomly initialized (no download): the arithmetic is the same as with trained weights.
Timings depend on the machine and its load; they are reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F
from _bench import interleaved_times, nbytes, status_kb
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from timm_kd import DistillWrapper
from timm_kd.teacher import Teacher

WORKLOADS = ("student step", "teacher forward", "wrapper step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="resnet18", help="timm model name of the student (default: resnet18)")
    p.add_argument("--teacher", default="resnet50", help="timm model name of the teacher (default: resnet50)")
    p.add_argument("--loss", default="kd", help="distillation loss name (default: kd)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="student input size in px (default: the student's pretrained_cfg); when it differs from the "
        "teacher's, the wrapper resizes for the teacher",
    )
    p.add_argument("--num-classes", type=int, default=1000, help="classes of both models (default: 1000)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--teacher-channels-last", action="store_true", help="run the teacher channels-last")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--_memory", default=None, choices=WORKLOADS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, need_student: bool = True, need_teacher: bool = True):
    """Student, teacher, wrapper, a batch, and the tensor the teacher sees; random weights."""
    torch.manual_seed(0)
    # the student's input format, without building it (the teacher-only process must not hold it)
    student_cfg = resolve_data_config(pretrained_cfg=get_pretrained_cfg(args.student).to_dict())
    size = args.img_size or student_cfg["input_size"][-1]
    x = torch.randn(args.batch_size, 3, size, size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    student = timm.create_model(args.student, num_classes=args.num_classes) if need_student else None
    teacher = timm.create_model(args.teacher, num_classes=args.num_classes) if need_teacher else None
    wrapper = x_teacher = None
    if need_teacher:
        adapters = Teacher(
            teacher, input_mean=student_cfg["mean"], input_std=student_cfg["std"], verbose=False
        )
        with torch.inference_mode():
            x_teacher = adapters.adapt(x).clone()
        if args.teacher_channels_last:
            x_teacher = x_teacher.contiguous(memory_format=torch.channels_last)
        if need_student:
            wrapper = DistillWrapper(
                student,
                teacher,
                loss=args.loss,
                data_config=student_cfg,
                teacher_channels_last=args.teacher_channels_last,
                verbose=False,
            )
    return student, teacher, wrapper, x, y, x_teacher


def make_steps(args, student, teacher, wrapper, x, y, x_teacher) -> dict:
    steps = {}
    if student is not None:
        opt_s = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)

        def student_step():
            student.train()
            loss = F.cross_entropy(student(x), y)
            loss.backward()
            opt_s.step()
            opt_s.zero_grad(set_to_none=True)

        steps["student step"] = student_step
    if teacher is not None:
        teacher.eval()

        def teacher_forward():
            with torch.inference_mode():
                teacher(x_teacher)

        steps["teacher forward"] = teacher_forward
    if wrapper is not None and student is not None:
        opt_w = torch.optim.SGD(wrapper.parameters(), lr=1e-4, momentum=0.9)

        def wrapper_step():
            wrapper.train()
            out = wrapper(x, y)
            out["loss"].backward()
            opt_w.step()
            opt_w.zero_grad(set_to_none=True)

        steps["wrapper step"] = wrapper_step

        # What the wrapper adds besides the two networks, measured alone: the input adapters, and
        # the distillation loss's forward+backward on fixed logits.
        def adapters():
            with torch.inference_mode():
                wrapper.teacher.adapt(x)

        z_s = torch.randn(x.shape[0], args.num_classes, requires_grad=True)
        z_t = torch.randn(x.shape[0], args.num_classes)

        def loss_only():
            wrapper.loss_fn(z_s, z_t, y)["loss"].backward()
            z_s.grad = None

        steps["adapters"] = adapters
        steps["loss fwd+bwd"] = loss_only
    return steps


# --------------------------------------------------------------------------------------------------
# time


def time_all(args) -> dict[str, list[float]]:
    steps = make_steps(args, *build(args))
    return interleaved_times(steps, args.repeats, args.warmup, progress="")


# --------------------------------------------------------------------------------------------------
# memory (one fresh process per workload)


def memory_child(args) -> None:
    """Runs in a fresh process: prints JSON with the peak RSS above the post-import baseline."""
    name = args._memory
    base = status_kb("VmRSS")
    need_student = name != "teacher forward"
    need_teacher = name != "student step"
    parts = build(args, need_student=need_student, need_teacher=need_teacher)
    steps = make_steps(args, *parts)
    if name == "wrapper step":
        del steps["student step"], steps["teacher forward"]  # only the wrapper runs here
    step = steps[name]
    step()  # warm-up: optimizer state, allocator pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    step()
    peak = status_kb("VmHWM")
    student, teacher = parts[0], parts[1]
    out = {
        "peak_above_imports_mb": (peak - base) / 1024,
        "teacher_weights_mb": nbytes(teacher) / 2**20 if teacher is not None and need_teacher else 0.0,
        "student_weights_mb": nbytes(student) / 2**20 if student is not None else 0.0,
    }
    print("MEMORY " + json.dumps(out))


def memory_all(args, argv: list[str]) -> dict[str, dict]:
    results = {}
    env = dict(os.environ)
    for name in WORKLOADS:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_memory", name]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("MEMORY ")]
        if res.returncode != 0 or not line:
            raise RuntimeError(f"memory run for {name!r} failed:\n{res.stderr[-3000:]}")
        results[name] = json.loads(line[-1][len("MEMORY ") :])
    return results


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        memory_child(args)
        return

    _, _, wrapper, x, _, x_teacher = build(args)
    t = wrapper.teacher
    if t.renormalize or t.input_size != tuple(x.shape[-2:]):
        print(f"adapters: {t.extra_repr()}")
    print(
        f"student {args.student} ({sum(p.numel() for p in wrapper.student.parameters()) / 1e6:.1f} M params) "
        f"<- teacher {args.teacher} ({sum(p.numel() for p in t.parameters()) / 1e6:.1f} M params), "
        f"loss {args.loss}, batch {args.batch_size}, student input {tuple(x.shape[-2:])}, teacher input "
        f"{tuple(x_teacher.shape[-2:])}, re-normalize {t.renormalize}, torch {torch.__version__}, "
        f"timm {timm.__version__}, {torch.get_num_threads()} threads"
    )
    del wrapper

    times = time_all(args)
    med = {k: statistics.median(v) for k, v in times.items()}
    budget = med["student step"] + med["teacher forward"]
    ratio = med["wrapper step"] / budget
    # rounds are interleaved, so each round's three numbers share the machine's load of that moment
    paired = statistics.median(
        w / (s + t) for w, s, t in zip(times["wrapper step"], times["student step"], times["teacher forward"])
    )

    print()
    print("| workload | median ms | min-max ms |")
    print("|---|---:|---:|")
    for k in (*WORKLOADS, "adapters", "loss fwd+bwd"):
        label = {
            "teacher forward": "teacher forward (network only)",
            "adapters": "(in wrapper step) adapters",
            "loss fwd+bwd": "(in wrapper step) loss fwd+bwd",
        }.get(k, k)
        print(f"| {label} | {med[k] * 1e3:.1f} | {min(times[k]) * 1e3:.1f}-{max(times[k]) * 1e3:.1f} |")
    print(f"| student step + teacher forward | {budget * 1e3:.1f} | |")
    verdict = "meets" if ratio <= 1.05 else "MISSES"
    print(
        f"\nwrapper / (student + teacher): ratio of medians **{ratio:.3f}** ({verdict} the 1.05 target), "
        f"median of per-round ratios {paired:.3f}; {args.repeats} rounds. Expected from the parts: "
        f"{(budget + med['adapters'] + med['loss fwd+bwd']) / budget:.3f}."
    )

    result = {"args": vars(args), "times_s": times, "median_s": med, "ratio": ratio, "paired_ratio": paired}
    if not args.no_memory:
        mem = memory_all(args, argv)
        s, tf, w = (mem[k]["peak_above_imports_mb"] for k in WORKLOADS)
        print()
        print("| workload (fresh process) | peak RSS above imports, MB |")
        print("|---|---:|")
        print(f"| student step | {s:.0f} |")
        print(
            f"| teacher forward (weights {mem['teacher forward']['teacher_weights_mb']:.0f} MB "
            f"+ activations) | {tf:.0f} |"
        )
        print(f"| student step + teacher forward | {s + tf:.0f} |")
        print(f"| wrapper step | {w:.0f} |")
        verdict = "meets" if w <= s + tf else "MISSES"
        print(
            f"\nwrapper peak / (student step + teacher forward) = **{w / (s + tf):.3f}** "
            f"({verdict} the target)"
        )
        result["memory_mb"] = mem
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
