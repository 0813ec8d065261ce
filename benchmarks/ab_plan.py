"""The plan before backward alone (``_planning._plan``, cold: right after a fresh forward, as in a training step) at
two commits in one process, interleaved, with the plain backward beside it for scale.

A whole backward's ratio moves by ~1% run to run on a loaded machine (``ab_strong_zeros.py``); the plan alone is
~0.2 ms of it, so its change shows here in microseconds where the ratio cannot resolve it. ``plan+seed``: with a
seed of ones, as the engine hook plans ``loss.backward()`` in a ``strong_zeros()`` block.

    python benchmarks/ab_plan.py --base 83c7a5b --only "SDPA block causal" [--repeats 60]

Calibrate before reading a few microseconds: with the working tree equal to the base (an A/A run, 2026-12-07, MLP,
load ~7) the tree's rows read 4-14 us above the base's, medians of 60 (the two packages are not placed alike).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _harness
import bench_strong_zeros
import gradwise as gw
from ab_strong_zeros import import_base


def _planners(package: Any, name: str) -> dict[str, Callable[[torch.Tensor], Any]]:
    plan = package._strong_zeros._planning._plan
    return {f"{name} plan": lambda loss: plan([loss], ()),
            f"{name} plan+seed": lambda loss: plan([loss], (torch.ones_like(loss),))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git ref to compare the working tree with")
    parser.add_argument("--only", default="SDPA block causal")
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    _harness.keep_freed_memory()
    torch.set_num_threads(1)
    clock = time.perf_counter_ns  # (wall: intervals of ~0.2 ms, medians drop the preempted ones)
    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base, Path(tmp))
        case = next(c for c in bench_strong_zeros.cases() if args.only in c.name)
        fns = {**_planners(base, args.base), **_planners(gw, "tree"), "plain backward": lambda loss: loss.backward()}
        for f in fns.values():  # (each shape planned once: the cache is warm, as in a training loop)
            f(case.loss(case.net))
        times: dict[str, list[int]] = {k: [] for k in fns}
        for i in range(args.repeats):
            for k, f in [*fns.items()][::1 if i % 2 else -1]:  # (both orders)
                loss = case.loss(case.net)
                start = clock()
                f(loss)
                times[k].append(clock() - start)
                if k != "plain backward":  # the step's backward, untimed: every plan then follows a forward that
                    loss.backward()  # followed a backward, as in training (a graph left alive moved the next by ~30 us)
        plain = statistics.median(times["plain backward"])
        for k, v in times.items():
            v = sorted(v)
            print(f"{case.name[:24]:24s} {k:22s} median {statistics.median(v) / 1e3:8.1f} us   "
                  f"quartiles {v[len(v) // 4] / 1e3:8.1f} {v[3 * len(v) // 4] / 1e3:8.1f}   "
                  f"{statistics.median(v) / plain * 100:6.2f}% of the plain backward")


if __name__ == "__main__":
    main()
