"""Shared timer for the benchmark scripts: median milliseconds of a callable, CUDA events after warm-up.

On a machine without CUDA it falls back to wall-clock time (a dry run of the script, not a measurement).
"""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, reps: int = 5, warmup: int = 2) -> float:
    """Run fn `warmup` times, reset the CUDA peak-memory counter, then time `reps` runs; return the median in ms."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
