"""Where gw.backward's time goes on one strong-zeros workload: cProfile over repeated backwards, top entries.

    python benchmarks/profile_backward.py [--only SDPA] [--device cuda] [--repeats 50]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

import bench_strong_zeros
import gradwise as gw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="SDPA block causal")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    with torch.device(args.device):
        case = next(c for c in bench_strong_zeros.cases() if args.only in c.name)
    losses = [case.loss(case.net) for _ in range(args.repeats + 3)]
    for loss in losses[:3]:
        gw.backward(loss)
    profile = cProfile.Profile()
    profile.enable()
    for loss in losses[3:]:
        gw.backward(loss)
    if args.device != "cpu":
        torch.cuda.synchronize()
    profile.disable()
    print(f"{case.name}, {args.device}, {args.repeats} backwards")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
