"""Where gradwise's time goes on one strong-zeros workload: cProfile over repeated steps, top entries.
``--what strong``: gw.backward after an untimed forward; ``--what trace``: forward and backward under gw.trace().

    python benchmarks/profile_backward.py [--only SDPA] [--device cuda] [--repeats 50] [--what trace]
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
    parser.add_argument("--what", choices=("strong", "trace"), default="strong")
    args = parser.parse_args()
    with torch.device(args.device):
        case = next(c for c in bench_strong_zeros.cases() if args.only in c.name)
    profile = cProfile.Profile()
    if args.what == "trace":
        def step():
            with gw.trace():
                case.loss(case.net).backward()

        for _ in range(3):
            step()
        profile.enable()
        for _ in range(args.repeats):
            step()
    else:
        losses = [case.loss(case.net) for _ in range(args.repeats + 3)]
        for loss in losses[:3]:
            gw.backward(loss)
        profile.enable()
        for loss in losses[3:]:
            gw.backward(loss)
    if args.device != "cpu":
        torch.cuda.synchronize()
    profile.disable()
    print(f"{case.name}, {args.device}, {args.repeats} x {args.what}")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
