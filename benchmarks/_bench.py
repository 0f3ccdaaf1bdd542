"""What the benchmark scripts share: interleaved timing and process memory.

Imported by the scripts in this folder (``python benchmarks/x.py`` puts the folder on the path).
"""
from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Callable

import torch


def interleaved_times(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    progress: str | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each step, ``repeats`` samples each after ``warmup`` untimed rounds.

    Every round calls every step once, in an order shuffled each round (seeded: the same runs give
    the same orders), so no step always runs first or right after the same other step (a step's
    cost depends on what its predecessor left in the caches); ratios between steps taken this way
    share the machine's load. ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before each clock read. ``progress`` prints
    ``"{progress}round r/n"`` to stderr.
    """
    order = list(steps)
    times: dict[str, list[float]] = {k: [] for k in order}
    total = warmup + repeats
    rng = random.Random(0)
    for r in range(total):
        rng.shuffle(order)
        for name in order:
            if sync is not None:
                sync()
            t0 = clock()
            steps[name]()
            if sync is not None:
                sync()
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
        if progress is not None:
            print(f"\r{progress}round {r + 1}/{total}   ", end="", file=sys.stderr, flush=True)
    if progress is not None:
        print(file=sys.stderr)
    return times


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS`` now, ``VmHWM`` the peak so far; Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def nbytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
