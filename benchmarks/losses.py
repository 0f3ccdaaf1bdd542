"""Forward + backward time of every registered loss, as a ratio to plain cross-entropy.

All candidates are timed side by side in one run: after a warm-up, each repeat times every
candidate once, in a rotating order, and the table reports each candidate's median. The ratio is
what matters (the absolute times depend on the machine and its load). The table is information,
not a target: a loss is well under 1 % of a training step (docs/performance.md), so the losses are
written for reading, and ``compile=True`` fuses them.

    python benchmarks/losses.py             # B = 256, C = 1000, on CPU, one thread
    python benchmarks/losses.py --compile   # + each loss through create_loss(..., compile=True)
    python benchmarks/losses.py --batch-size 64 --num-classes 100 --repeats 50
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _bench import interleaved_times

from timm_kd.losses import create_loss, list_losses

EPOCH = 30.0  # past every default warm-up, so the warm-up losses compute all their terms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=256, help="rows of logits (default: 256)")
    p.add_argument("--num-classes", type=int, default=1000, help="columns of logits (default: 1000)")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per candidate (default: 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed repeats first (default: 5)")
    p.add_argument("--inner", type=int, default=1, help="forward+backward passes per timing (default: 1)")
    p.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu",
        help="cpu: CPU time of this process (default; robust when other jobs share the machine);\n"
        "wall: elapsed time (use on an otherwise idle machine)",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: 1 with the cpu clock, which adds up every thread's time and\n"
        "so counts OpenMP's spin-waiting as work; torch's choice with the wall clock)",
    )
    p.add_argument("--losses", nargs="*", default=None, help="names to time (default: every registered loss)")
    p.add_argument(
        "--compile", action="store_true",
        help="also time each loss through create_loss(name, compile=True) (check_inputs=False, as the\n"
        "engine's --compile-loss runs it); compile time is not timed, the ratio stays to eager\n"
        "cross-entropy, and a compiled cross-entropy row is shown for reference",
    )
    args = p.parse_args(argv)
    if args.threads is None and args.clock == "cpu":
        args.threads = 1
    for name in ("batch_size", "num_classes", "repeats", "inner", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_candidates(
    names: list[str],
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    compiled: bool = False,
) -> dict[str, Callable[[], torch.Tensor]]:
    """``{label: fn}``, each fn returning the scalar to backpropagate."""
    cands: dict[str, Callable[[], torch.Tensor]] = {"cross_entropy": lambda: F.cross_entropy(student, target)}
    if compiled:
        ce = torch.compile(F.cross_entropy)
        cands["cross_entropy (compiled)"] = lambda: ce(student, target)
    for name in names:
        for checks in (True, False):
            try:
                loss_fn = create_loss(name, check_inputs=checks)
            except TypeError:  # a plug-in without the check_inputs switch
                if not checks:
                    continue
                loss_fn = create_loss(name)
            label = name if checks else f"{name} (check_inputs=False)"
            cands[label] = lambda f=loss_fn: f(student, teacher, target, epoch=EPOCH)["loss"]
        if compiled:
            loss_fn = create_loss(name, check_inputs=False, compile=True)
            cands[f"{name} (compiled)"] = lambda f=loss_fn: f(student, teacher, target, epoch=EPOCH)["loss"]
    return cands


def time_candidates(
    cands: dict[str, Callable[[], torch.Tensor]],
    student: torch.Tensor,
    repeats: int,
    warmup: int,
    inner: int,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, list[float]]:
    """Seconds per forward+backward, ``repeats`` samples per candidate, interleaved."""

    def passes(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(inner):
                student.grad = None
                fn().backward()

        return run

    times = interleaved_times({k: passes(fn) for k, fn in cands.items()}, repeats, warmup, clock=clock)
    return {k: [t / inner for t in v] for k, v in times.items()}


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, c = args.batch_size, args.num_classes
    student = (torch.randn(b, c) * 3).requires_grad_(True)
    teacher = torch.randn(b, c) * 3 + 2.0
    target = torch.randint(0, c, (b,))
    names = args.losses if args.losses else list_losses()
    cands = make_candidates(names, student, teacher, target, compiled=args.compile)
    if args.compile:  # compile outside the timing (the warm-up would, but one call each says how long)
        for label, fn in cands.items():
            if "compiled" in label:
                t0 = time.perf_counter()
                fn().backward()
                print(f"compiled {label.split(' ')[0]} in {time.perf_counter() - t0:.1f} s", flush=True)
        student.grad = None
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_candidates(cands, student, args.repeats, args.warmup, args.inner, clock)
    base = statistics.median(times["cross_entropy"])
    lines = [
        f"forward+backward on CPU, B={b}, C={c}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"{args.clock} clock, median of {args.repeats} interleaved repeats x {args.inner} passes",
        "",
        "| loss | median ms | ratio to cross-entropy |",
        "|---|---:|---:|",
    ]
    for label, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {label} | {med * 1e3:.3f} | {med / base:.2f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
