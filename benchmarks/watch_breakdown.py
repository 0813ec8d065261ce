"""Where gw.watch()'s cost over plain training goes, on one bench_trace row: the watch with each of its parts
removed (monkeypatched out), against plain training steps (zero_grad, forward, backward, SGD with momentum, lr 0;
8 steps per sample in one block, as bench_trace's training column), all interleaved in one process, CPU time on
one thread, median of per-sample ratios to plain. Then the gradient check's alternatives, timed alone on the
row's gradients (warm, interleaved). Rows move by a few % run to run on a loaded machine: compare rows of one run.

    python benchmarks/watch_breakdown.py [relu_mlp|mlp] [repeats]

A measuring tool, not a test: the removed parts make a watch that checks or frees nothing.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import torch

import _harness
import bench_trace
import gradwise as gw
from gradwise import _strong_zeros
from gradwise._trace import _watching

STEPS = 8


def variants() -> dict[str, dict[str, Any]]:
    """Each variant: the watch's parts swapped for stand-ins that do nothing (the walk's leaves cached from the
    first call: a walk that costs nothing and finds what the real one would on these fixed graphs)."""
    graph_parts, cache = _strong_zeros._graph_parts, {}

    def cached_walk(roots, compiled=None):
        if "leaves" not in cache:
            cache["leaves"] = graph_parts(roots, compiled)[0]
        return cache["leaves"], []

    def entry(retain: bool):
        def backward(self, orig, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                     grad_variables=None, inputs=None):
            self.depth += 1  # (as the watch: a backward of its own, which the engine hook passes over)
            try:
                return orig(tensors, grad_tensors, retain or retain_graph, create_graph, grad_variables, inputs)
            finally:
                self.depth -= 1
        return backward

    def nothing(*_):
        return None

    def finite(_):
        return True

    return {
        "watch: entry + block only": {"backward": entry(False)},
        "... + graph kept (retain_graph)": {"backward": entry(True)},
        "... + watch's glue (no walk, check, release)": {"walk": cached_walk, "release": nothing, "finite": finite},
        "... + check (no walk, release)": {"walk": cached_walk, "release": nothing},
        "... + walk + release (no check)": {"finite": finite},
        "watch (all of it)": {},
    }


def patch(parts: dict[str, Any]) -> Callable[[], None]:
    """Install a variant's stand-ins; returns what puts the watch back."""
    saved = (_strong_zeros._graph_parts, _strong_zeros._release, _watching._finite, _watching._Watcher.backward)
    _strong_zeros._graph_parts = parts.get("walk", saved[0])
    _strong_zeros._release = parts.get("release", saved[1])
    _watching._finite = parts.get("finite", saved[2])
    _watching._Watcher.backward = parts.get("backward", saved[3])

    def restore() -> None:
        (_strong_zeros._graph_parts, _strong_zeros._release, _watching._finite,
         _watching._Watcher.backward) = saved
    return restore


def check_alternatives(grads: list[torch.Tensor]) -> dict[str, float]:
    """us per check of ``grads`` (warm), for each way of telling whether all are finite."""
    big = [g for g in grads if g.dim() > 1]
    small = [g for g in grads if g.dim() <= 1]
    one = torch.ones(())

    def per_gradient():  # the watch's: a sum per large gradient, the small vectors in one sum
        ok = all(math.isfinite(g.sum().item()) for g in big)
        return ok and math.isfinite(torch.cat(small).sum().item())

    candidates = {
        "watch's _finite": lambda: _watching._finite(grads),
        "sum per gradient, small ones concatenated": per_gradient,
        "sums stacked, one read": lambda: math.isfinite(torch.stack([g.sum() for g in grads]).sum().item()),
        "torch.cat of all, one sum": lambda: math.isfinite(torch.cat([g.reshape(-1) for g in grads]).sum().item()),
        "_foreach_norm (2), stacked": lambda: math.isfinite(torch.stack(torch._foreach_norm(grads)).sum().item()),
        "_foreach_norm (1), stacked": lambda: math.isfinite(torch.stack(torch._foreach_norm(grads, 1)).sum().item()),
        "_foreach_max, stacked (misses -Inf)": lambda: torch.stack(torch._foreach_max(grads)).sum().item(),
        "_amp_foreach_non_finite_check_and_unscale_ (writes)":
            lambda: torch._amp_foreach_non_finite_check_and_unscale_(grads, torch.zeros(()), one),
    }
    if hasattr(torch, "_foreach_powsum"):
        candidates["_foreach_powsum (2), stacked"] = \
            lambda: math.isfinite(torch.stack(torch._foreach_powsum(grads, 2)).sum().item())
    best = dict.fromkeys(candidates, math.inf)
    for _ in range(40):  # round-robin: the machine's load moves between rounds, not within one
        for name, fn in candidates.items():
            best[name] = min(best[name], timeit.timeit(fn, number=20) / 20 * 1e6)
    return best


def main() -> None:
    row = sys.argv[1] if len(sys.argv) > 1 else "relu_mlp"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 41
    torch.set_num_threads(1)
    model, loss = getattr(bench_trace, row)()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def plain():
        for _ in range(STEPS):
            model.zero_grad(set_to_none=True)
            loss().backward()
            sgd.step()

    def watched():
        with gw.watch():
            plain()

    def run(parts):
        restore = patch(parts)
        try:
            watched()
        finally:
            restore()

    fns = {"plain": plain} | {name: (lambda parts=parts: run(parts)) for name, parts in variants().items()}
    for _ in range(3):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            samples[name].append(time.process_time() - t0)
    step = statistics.median(samples["plain"]) / STEPS
    rows = []
    for name in fns:
        ratio = statistics.median(a / b for a, b in zip(samples[name], samples["plain"], strict=True))
        rows.append([name, ratio, (ratio - 1) * step * 1e6])
    title = (f"gw.watch() parts, {row}, training steps, plain step {step * 1e6:.0f} us (CPU time, one thread, "
             f"median of {repeats} per-sample ratios)")
    _harness.print_table(title, ["variant", "/ plain", "+us per step"], rows)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    checks = check_alternatives(grads)
    _harness.print_table(f"checking the {len(grads)} gradients once (warm, best of 40 interleaved rounds of 20)",
                         ["how", "us"], [[name, us] for name, us in checks.items()])


if __name__ == "__main__":
    print(f"allocator: {_harness.keep_freed_memory()}")
    main()
