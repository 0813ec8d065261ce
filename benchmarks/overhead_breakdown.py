"""Where gw.backward's overhead over a plain backward goes, on one bench_strong_zeros case: variants of the check
before backward swapped in (a bare walk, the walk with the facts and the shape key, the reads, the sums: a minimal
inline replica of the plan's hit path, which returns 'plain' or 'strong' only), all interleaved in one process in
CPU time on one thread, median of per-block ratios to plain. Each patched variant pays a setattr per call (the
'noop patch' row); rows differ by ~+-10 us run to run, so compare rows of one run.

    python benchmarks/overhead_breakdown.py "Transformer" [blocks]

A measuring tool, not a test: the replica knows the plan's hit path only for graphs with one root.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import _harness
import bench_strong_zeros
import gradwise as gw
from gradwise._strong_zeros import _engine, _planning
from gradwise._strong_zeros._node_facts import _NODE_TYPES

_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def replica(shaped: Any, walk: bool = True, facts: bool = True, shape: bool = True, reads: bool = True,
            sums: bool = True, skip: tuple[str, ...] = ()) -> Callable[..., str]:
    """A stand-in for ``_planning._plan`` doing only the parts asked for (``shaped``: the cached plan to use where
    the shape key is not built)."""

    def plan(t_outputs: Any, seeds: Any, watched: Any = None, everyday: bool = False, results: Any = None) -> str:
        if not walk:
            return "plain"
        nodes: dict[Any, int] = {}
        key: list = [1]
        add = key.append if shape else (lambda _: None)
        stack = [t_outputs[0].grad_fn]
        while stack:
            node = stack.pop()
            i = nodes.get(node)
            if i is not None:
                add(i)
                continue
            cls = node.__class__
            nodes[node] = len(nodes)
            add(cls)
            if cls is _ACCUMULATE_GRAD:
                continue
            info = _NODE_TYPES[cls]
            edges = node.next_functions
            if facts and not info[8] and info[10] is not None and cls.__name__ not in skip:
                add(info[10](node))
            for n, slot in edges:
                if n is not None:
                    stack.append(n)
                    add(~slot)
        found = _planning._SHAPED.get(tuple(key)) if shape and facts and not skip else shaped
        order = list(nodes)
        if not reads:
            return "plain"
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        finite = True
        for i, names, _, _ in found.reads:
            for name in names:
                t = getattr(order[i], name).data
                if sums:
                    finite = finite and math.isfinite(t.sum().item())
        torch._C._set_grad_enabled(grad_mode)
        return "plain" if finite else "strong"

    return plan


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else "Transformer"
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    _harness.keep_freed_memory()
    torch.set_num_threads(1)
    case = next(c for c in bench_strong_zeros.cases() if only in c.name)
    gw.backward(case.loss(case.net))  # plans this graph's shape
    shaped = list(_planning._SHAPED.values())[-1]
    fact_types = sorted({type(n).__name__ for n in _planning._walked([case.loss(case.net).grad_fn]).nodes
                         if not _NODE_TYPES[type(n)][8] and _NODE_TYPES[type(n)][10] is not None})
    variants: dict[str, tuple | None] = {
        "gw (as is)": None,
        "noop patch": (_engine, "_entering", _engine._entering),
        "no _choose (plan 'plain')": (_engine, "_choose_untraced", lambda *a, **k: "plain"),
        "no _plan (plan 'plain')": (_engine, "_plan", replica(shaped, walk=False)),
        "bare walk (+index, no facts/shape/reads)": (_engine, "_plan",
                                                     replica(shaped, facts=False, shape=False, reads=False)),
        "walk+facts+shape key, no reads": (_engine, "_plan", replica(shaped, reads=False)),
        "walk+facts+shape+reads, no sums": (_engine, "_plan", replica(shaped, sums=False)),
        "minimal plan (walk+facts+shape+reads+sums)": (_engine, "_plan", replica(shaped)),
        "gw with all_finite -> True": (_planning, "_all_finite", lambda ts: True),
    }
    for name in fact_types:
        variants[f"walk+facts+shape, no reads, no {name} facts"] = (_engine, "_plan",
                                                                    replica(shaped, reads=False, skip=(name,)))

    def patched(p: tuple | None) -> Callable[[torch.Tensor], None]:
        if p is None:
            return gw.backward
        mod, attr, value = p

        def run(loss: torch.Tensor) -> None:
            old = getattr(mod, attr)
            setattr(mod, attr, value)
            try:
                gw.backward(loss)
            finally:
                setattr(mod, attr, old)

        return run

    fns = {"plain": lambda loss: loss.backward(), **{k: patched(v) for k, v in variants.items()}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, f in fns.items():
            block = []
            for _ in range(5):
                loss = case.loss(case.net)
                start = time.process_time()
                f(loss)
                block.append(time.process_time() - start)
            times[k].append(statistics.median(block))
    plain = statistics.median(times["plain"])
    print(f"{case.name}: plain {plain * 1e3:.3f} ms (CPU time, 1 thread, {blocks} blocks of 5)")
    for k, v in times.items():
        r = statistics.median([a / p for a, p in zip(v, times["plain"], strict=True)])
        print(f"  {k:60s} {r:.4f}x  (+{(r - 1) * plain * 1e6:5.1f} us)")


if __name__ == "__main__":
    main()
