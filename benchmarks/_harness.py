"""Shared measurement code for the benchmarks: same-process, interleaved, median-of-repeats ratios.

Every benchmark in this folder compares gradwise against plain PyTorch *in the same process*, running the
candidates round-robin (A, B, A, B, ...) so that drift in clock speed or cache state hits all of them alike,
and reports the median time of each and the ratio to the baseline.

The ratio of two medians still lets drift land on one candidate: on a shared machine a slow stretch of a few
repeats moves one candidate's median and not the other's (the SDPA block's plain backward moved 6.13 -> 6.95 ms
between two runs, its ratio 1.03 -> 1.10). ``paired_ratios`` divides the candidates' times within each repeat
(run back to back, so drift slower than a repeat cancels) and takes the median of those per-repeat ratios.
"""
from __future__ import annotations

import ctypes
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table


def keep_freed_memory() -> str:
    """Stop glibc from giving freed memory back to the OS between repeats; returns what the run uses.

    With glibc's defaults a freed block of a few MB goes back to the OS (munmap, or a trim of the heap top), and
    the next allocation faults its pages in again (~1 us per 4 kB page). Which candidate those faults land on
    depends on the heap's layout, not on the candidate: on the 4 MB activations of the CNN workloads the plain
    baseline itself moves between 11 and 20 ms from one process to the next. Raising the mmap and trim
    thresholds (what a caching allocator such as jemalloc or tcmalloc does, as PyTorch's CPU performance guide
    recommends) removes that noise from every candidate alike. ``GRADWISE_BENCH_GLIBC_DEFAULT=1`` keeps
    glibc's defaults.
    """
    if os.environ.get("GRADWISE_BENCH_GLIBC_DEFAULT") == "1":
        return "glibc malloc defaults"
    if not sys.platform.startswith("linux"):
        return "the platform's malloc"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "the platform's malloc"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc malloc keeping freed memory (mmap threshold 32 MB, trim threshold 1 GB)"
    return "glibc malloc defaults (mallopt refused)"


def times(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Each callable's time in seconds per repeat, measured interleaved round-robin (the candidates of repeat i
    run back to back): wall time by default; ``clock=time.process_time`` measures this process's CPU time (on a
    machine shared with other jobs, wall time mostly measures them; use it with one thread).

    The order rotates from one repeat to the next (repeat i starts with candidate i mod n), so each candidate
    follows each other one equally often: a candidate that leaves the caches cold (detect_anomaly's stack
    captures) would otherwise always slow the one after it (7-9% on bench_trace's small MLP, 2026-12-07)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(clock() - t0)
    return samples


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time in seconds of each callable (``times``)."""
    return medians(times(fns, repeats, warmup, clock))


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each candidate's times."""
    return {name: statistics.median(ts) for name, ts in samples.items()}


def paired_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Each candidate's time over ``baseline``'s, as the median over repeats of the ratio within a repeat (the
    candidates ran back to back there): drift between repeats cancels, where the ratio of two medians lets a slow
    stretch of repeats land on one candidate."""
    base = samples[baseline]
    return {name: statistics.median(t / b for t, b in zip(ts, base, strict=True)) for name, ts in samples.items()}


def free_port() -> int:
    """A free TCP port on localhost, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Render a result table with rich (plain text when not on a terminal)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=140).print(table)


def times_after(
    cases: dict[str, tuple[Callable[[], object], Callable[[object], object]]],
    repeats: int = 15,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Like `times` (``clock`` too), but each candidate is ``(setup, fn)`` and only ``fn(setup())`` is timed.

    Use it to time a backward alone: ``setup`` runs the forward (untimed) and returns the loss.
    """
    for _ in range(warmup):
        for setup, fn in cases.values():
            fn(setup())
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (setup, fn) in cases.items():
            arg = setup()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = clock()
            fn(arg)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(clock() - t0)
    return samples


def median_times_after(
    cases: dict[str, tuple[Callable[[], object], Callable[[object], object]]],
    repeats: int = 15,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median time in seconds of each candidate (``times_after``)."""
    return medians(times_after(cases, repeats, warmup, clock))


def peak_memory_bytes(fn: Callable[[], object], region: str | None = None) -> tuple[int, int]:
    """CPU memory held at once while ``fn`` runs, from the profiler's allocation events.

    Returns ``(peak, before)``: the running total of bytes allocated minus bytes freed since ``fn`` started,
    its maximum from the start of the first ``torch.profiler.record_function(region)`` block on (the whole
    run when ``region`` is None), and its value when that block started. The profiler does not know the
    size of a block allocated before it started, so its release is not counted: let ``fn`` allocate
    everything the region may free (copy the model and inputs inside ``fn``).
    """
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    start = min((e.start_ns() for e in events if e.name() == region), default=None) if region else 0
    if start is None:
        raise ValueError(f"no record_function({region!r}) block ran inside fn")
    total, before, peak = 0, None, 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if before is None and t >= start:
            before = peak = total
        total += nbytes
        if before is not None:
            peak = max(peak, total)
    return (total, total) if before is None else (peak, before)
