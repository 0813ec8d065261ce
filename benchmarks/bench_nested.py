"""A reentrant checkpoint's nested backward in a 'check' pass: gw.backward against loss.backward.

Every plan with a reentrant checkpoint (torch.utils.checkpoint(..., use_reentrant=True), a custom autograd.Function)
is a 'check' plan, and each checkpointed block's backward is a backward nested in that pass, planned on its own
(``_engine._nested``). On finite data it runs plain unless its plan finds the zeros of dropped or masked padding
reaching its results (a slice inside the block that drops rows of the block's input): then it runs strong and hands
them to the pass. Workloads: a 4-block MLP, each block Linear + ReLU (+ Linear + ReLU) under a reentrant
checkpoint, finite data; and the same with each block reading only rows :n-1 of its input (a slice inside the
block: its backward runs strong). CPU time of the backward alone (the forward runs untimed before each), one
thread, median of interleaved repeats.

    PYTHONPATH=src python benchmarks/bench_nested.py [--repeats 41]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw


def _net(width: int, blocks: int) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                            torch.nn.ReLU()) for _ in range(blocks))


def _forward(net: torch.nn.ModuleList, x: torch.Tensor, sliced: bool) -> torch.Tensor:
    h = x
    for block in net:
        if sliced:  # the block drops its input's last row and pads it back with zeros (a slice inside the block)
            h = checkpoint(lambda t, b=block: torch.nn.functional.pad(b(t[:-1]), (0, 0, 0, 1)), h,
                           use_reentrant=True)
        else:
            h = checkpoint(block, h, use_reentrant=True)
    return h.pow(2).mean()


def _timed(net: torch.nn.ModuleList, x: torch.Tensor, sliced: bool, backward: Callable[[torch.Tensor], None]
           ) -> Callable[[], float]:
    def run() -> float:
        net.zero_grad(set_to_none=True)
        loss = _forward(net, x, sliced)
        t0 = time.process_time()
        backward(loss)
        return time.process_time() - t0

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = _net(args.width, 4)
    x = torch.randn(args.batch, args.width, requires_grad=True)
    for sliced in (False, True):
        fns = {"torch": _timed(net, x, sliced, lambda loss: loss.backward()),
               "gradwise": _timed(net, x, sliced, gw.backward)}
        for _ in range(3):
            for fn in fns.values():
                fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                samples[name].append(fn())
        med = {name: statistics.median(ts) for name, ts in samples.items()}
        label = "slice inside each block" if sliced else "Linear+ReLU blocks"
        print(f"{label:26s} torch {med['torch'] * 1e3:7.3f} ms  gradwise {med['gradwise'] * 1e3:7.3f} ms  "
              f"ratio {med['gradwise'] / med['torch']:.3f}")


if __name__ == "__main__":
    main()
