"""Cost of `gw.trace()` over forward+backward against `torch.autograd.detect_anomaly(check_nan=True)`.

Both are measured in the same process against plain forward+backward, interleaved, median of repeats, on the
workloads of the strong-zeros benchmark (same models, inputs and losses), plus one extra CNN whose max-pools tie
on every step, and the issue's 6 x Linear(128)+ReLU MLP. The targets: trace / detect_anomaly <= 1.0 (while
finding more: Inf, contamination vs genuine, kinks), and gw.watch() / plain <= 1.05 on finite steps. The watch
is measured twice: over forward+backward (a block per step: the strictest reading), and over training steps
(zero_grad, forward, backward, an SGD step with momentum, the cheapest common optimizer; lr 0 so that the model
every column sees stays the same), 8 per sample in one block as a watched run holds it, which is what the
issue's "plain training" asks. The watch's C++ helper (`gradwise._native`) is built first if it is not (its
Python twins with GRADWISE_NATIVE=0): the title says which ran.

    python benchmarks/bench_trace.py [--repeats 15] [--device cuda] [--cpu-time --threads 1]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import bench_strong_zeros as strong_zeros_workloads
import gradwise as gw
from _harness import keep_freed_memory, median_times, print_table
from gradwise import _native

TRAINING_STEPS = 8  # per timed sample of the training columns, in one gw.watch() block


def mlp():
    torch.manual_seed(0)
    model, x = strong_zeros_workloads.mlp(), torch.randn(256, 256)
    return model, lambda: model(x).square().mean()


def transformer():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, dropout=0.0, batch_first=True)
    x = torch.randn(8, 64, 128)
    return model, lambda: model(x).square().mean()


def cnn():
    torch.manual_seed(0)
    model, x = strong_zeros_workloads.cnn(), torch.randn(32, 3, 32, 32)
    return model, lambda: model(x).square().mean()


def cnn_max_pool():
    """Beyond the strong-zeros workloads: a classifier whose max-pools tie in ~15% of windows (relu-dead
    windows are all 0), so trace counts and reports kinks on every step."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    x = torch.randn(32, 3, 32, 32)
    return model, lambda: model(x).logsumexp(1).mean()


def relu_mlp():
    """The issue's row: 6 x Linear(128)+ReLU, batch 128 (small ops: the per-op overhead dominates)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    model, x = nn.Sequential(*layers), torch.randn(128, 128)
    return model, lambda: model(x).square().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="where the models and data live (e.g. cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU time (with --threads 1 on a "
                        "machine shared with other jobs), not wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    helper = "its Python twins (GRADWISE_NATIVE=0)"
    if _native.enabled():
        if _native.module() is None:
            _native.build()
        helper = "its C++ helper"
    rows = []
    for name, make in [("MLP 6x Linear(256)+GELU, batch 256", mlp),
                       ("TransformerEncoderLayer d128 h4, seq 64, batch 8", transformer),
                       ("CNN 3 conv layers, 32x32, batch 32", cnn),
                       ("extra: CNN 3 conv + 2 max-pool + linear, batch 32", cnn_max_pool),
                       ("extra: MLP 6x Linear(128)+ReLU, batch 128", relu_mlp)]:
        with torch.device(args.device):
            model, loss = make()

        def plain(model=model, loss=loss):
            model.zero_grad(set_to_none=True)
            loss().backward()

        def anomaly(model=model, loss=loss):
            model.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # detect_anomaly warns that it is slow
                with torch.autograd.detect_anomaly(check_nan=True):
                    loss().backward()

        def traced(model=model, loss=loss):
            model.zero_grad(set_to_none=True)
            with gw.trace():
                loss().backward()

        def watched(model=model, loss=loss):
            model.zero_grad(set_to_none=True)
            with gw.watch():
                loss().backward()

        sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

        def plain_training(model=model, loss=loss, sgd=sgd):
            for _ in range(TRAINING_STEPS):
                model.zero_grad(set_to_none=True)
                loss().backward()
                sgd.step()

        def watched_training(model=model, loss=loss, sgd=sgd):
            with gw.watch():
                for _ in range(TRAINING_STEPS):
                    model.zero_grad(set_to_none=True)
                    loss().backward()
                    sgd.step()

        t = median_times({"plain": plain, "anomaly": anomaly, "trace": traced, "watch": watched,
                          "plain training": plain_training, "watch training": watched_training},
                         repeats=args.repeats, clock=time.process_time if args.cpu_time else time.perf_counter)
        rows.append([name, t["plain"] * 1e3, t["anomaly"] / t["plain"], t["trace"] / t["plain"],
                     t["trace"] / t["anomaly"], t["watch"] / t["plain"], t["watch training"] / t["plain training"]])
    print_table(f"gw.trace() vs detect_anomaly(check_nan=True), gw.watch() vs plain, forward+backward, {args.device}, "
                f"{'CPU' if args.cpu_time else 'wall'} time, {torch.get_num_threads()} threads (same process, "
                f"interleaved, median); the watch with {helper}",
                ["workload", "plain ms", "anomaly / plain", "trace / plain", "trace / anomaly", "watch / plain",
                 "watch / plain, training"], rows)


if __name__ == "__main__":
    print(f"allocator: {keep_freed_memory()}")
    main()
