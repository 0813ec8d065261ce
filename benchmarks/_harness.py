"""Shared measurement code for the benchmarks: same-process, interleaved, median-of-repeats ratios.

Every benchmark in this folder compares gradwise against plain PyTorch *in the same process*, running the
candidates round-robin (A, B, A, B, ...) so that drift in clock speed or cache state hits all of them alike,
and reports the median time of each and the ratio to the baseline.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Median wall time in seconds of each callable, measured interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Render a result table with rich (plain text when not on a terminal)."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row])
    Console(width=140).print(table)
