"""A/B of `gw.watch()`'s per-backward code: ``_Watcher.backward`` of another source tree (a commit checked out
elsewhere) against this tree's, plus an A/A copy of this tree's, all three exec'ed from their source into the same
module globals (the rest of the watch is this tree's). Interleaved with plain training steps (zero_grad, forward,
backward, SGD with momentum, lr 0; blocks of 8 steps as bench_trace's training column), the order rotated each
block; prints the backward call's median thread CPU time and each block's median ratio to plain (process time).

    python benchmarks/watch_ab.py OTHER_SRC [relu_mlp|mlp|...] [blocks]

Why the A/A copy: a function loaded a second time (importlib, exec) was measured 1.2% slower than the imported
module's on the 1 ms ReLU MLP step (session 35), more than most changes to this code; only a difference larger than
the A/A spread of the same run means anything.
"""
from __future__ import annotations

import ast
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

import bench_trace
import gradwise as gw
from gradwise._trace import _watching

STEPS = 8


def method_source(src: str) -> str:
    """``_Watcher.backward``'s source in the tree ``src`` (the folder that holds ``gradwise``), dedented."""
    text = (Path(src) / "gradwise" / "_trace" / "_watching.py").read_text()
    cls = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "_Watcher")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "backward")
    return textwrap.dedent("".join(text.splitlines(keepends=True)[fn.lineno - 1:fn.end_lineno]))


def build(source: str):
    namespace = dict(_watching.__dict__)
    exec(source, namespace)  # (the measuring tool's own input: a source file of this project)
    return namespace["backward"]


def main() -> None:
    other = sys.argv[1]
    row = sys.argv[2] if len(sys.argv) > 2 else "relu_mlp"
    blocks = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    torch.set_num_threads(1)
    here = method_source(str(Path(_watching.__file__).parents[2]))
    variants = {"other": build(method_source(other)), "this": build(here), "this (A/A)": build(here)}
    model, loss = getattr(bench_trace, row)()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    calls: dict[str, list[int]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    real = _watching._Watcher.backward

    def plain() -> None:
        for _ in range(STEPS):
            model.zero_grad(set_to_none=True)
            loss().backward()
            sgd.step()

    def watched(name: str) -> float:
        _watching._Watcher.backward = variants[name]
        try:
            t0 = time.process_time()
            with gw.watch():
                for _ in range(STEPS):
                    model.zero_grad(set_to_none=True)
                    out = loss()
                    t = time.thread_time_ns()
                    out.backward()
                    calls[name].append(time.thread_time_ns() - t)
                    del out
                    sgd.step()
            return time.process_time() - t0
        finally:
            _watching._Watcher.backward = real

    names = list(variants)
    for i in range(blocks):
        t0 = time.process_time()
        plain()
        base = time.process_time() - t0
        for name in names[i % 3:] + names[:i % 3]:  # each variant in each slot as often (in ABBA order the
            # middle one was always in the middle: identical code read 0.8-1% apart)
            ratios[name].append(watched(name) / base)
    for name in names:
        print(f"{row} {name:10s} backward call {statistics.median(calls[name][10 * STEPS:]) / 1e3:7.1f} us   "
              f"block / plain {statistics.median(ratios[name][10:]):.4f}")


if __name__ == "__main__":
    main()
