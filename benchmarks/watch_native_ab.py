"""gw.watch() with its C++ helper (`gradwise._native`) against its Python twins, in one process: plain training
steps (zero_grad, forward, backward, SGD with momentum, lr 0; 8 per block, as bench_trace's training column), the
watch on the helper, and the watch with ``_native.module`` answering None (the path of a machine without a
compiler, or ``GRADWISE_NATIVE=0``), interleaved with the order rotated each block; CPU time, one thread, the
median block of each over plain's median.

    python benchmarks/watch_native_ab.py [relu_mlp|mlp|transformer|cnn|cnn_max_pool] [blocks]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import bench_trace
import gradwise as gw
from gradwise import _native

STEPS = 8


def main() -> None:
    row = sys.argv[1] if len(sys.argv) > 1 else "relu_mlp"
    blocks = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    torch.set_num_threads(1)
    helper = _native.module() or _native.build()
    model, loss = getattr(bench_trace, row)()
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def steps() -> None:
        for _ in range(STEPS):
            model.zero_grad(set_to_none=True)
            loss().backward()
            sgd.step()

    def helped() -> None:
        with gw.watch():
            steps()

    def twins() -> None:
        _native.module = lambda: None
        try:
            with gw.watch():
                steps()
        finally:
            _native.module = real

    real = _native.module
    assert real() is helper
    variants = {"plain": steps, "watch, C++ helper": helped, "watch, Python twins": twins}
    names = list(variants)
    for run in variants.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        for name in names[b % len(names):] + names[:b % len(names)]:
            start = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - start)
    plain = statistics.median(times["plain"])
    print(f"{row}: plain {plain / STEPS * 1e3:.3f} ms per training step; " + ", ".join(
        f"{name} / plain {statistics.median(times[name]) / plain:.3f}" for name in names[1:]))


if __name__ == "__main__":
    main()
