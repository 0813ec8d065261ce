"""`gw.trace()` over a long training run that goes NaN: memory, per-step time and report time vs step count.

A small MLP is trained with plain backward on NaN-padded batches (the padding rows are sliced away after the
model, so every backward is contaminated and the parameters are NaN after the first optimizer step). Each step
count runs in a fresh subprocess under one `gw.trace()` block; measured there:

- RSS growth: resident memory after the last step minus before the first (``/proc/self/statm``), in MB;
- per-step time: median of the first 10% of steps and of the last 10% (a flat trace keeps them equal);
- report time: leaving the ``with`` block (the report is built then), and rendering it with ``str()``.

Targets (issue #16): at 1,000 steps RSS growth <= 300 MB and the report built in <= 5 s; per-step cost flat.
On a machine shared with other jobs, ``--cpu-time --threads 1`` times this process's CPU time instead of wall time.

    python benchmarks/bench_trace_long.py [--steps 100 1000 10000] [--cpu-time --threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _harness import print_table


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(steps: int, cpu_time: bool = False, threads: int | None = None) -> dict:
    """One measured run (in this process)."""
    import torch

    import gradwise as gw

    if threads is not None:
        torch.set_num_threads(threads)
    clock = time.process_time if cpu_time else time.perf_counter
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pad = torch.full((4, 16), float("nan"))
    times = []
    rss0 = _rss_mb()
    block = gw.trace()
    report = block.__enter__()
    for _ in range(steps):
        t0 = clock()
        x = torch.cat((torch.randn(8, 16), pad))  # 4 NaN padding rows
        loss = (model(x)[:8] - torch.randn(8, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(clock() - t0)
    rss1 = _rss_mb()
    t0 = clock()
    block.__exit__(None, None, None)
    t_exit = clock() - t0
    t0 = clock()
    text = str(report)
    t_render = clock() - t0
    k = max(1, steps // 10)
    return {"steps": steps, "rss_growth_mb": rss1 - rss0, "first_ms": statistics.median(times[:k]) * 1e3,
            "last_ms": statistics.median(times[-k:]) * 1e3, "report_s": t_exit, "render_s": t_render,
            "findings": len(report.findings), "lines": text.count("\n") + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--cpu-time", action="store_true", help="time in this process's CPU time, not wall time "
                        "(on a machine shared with other jobs; with --threads 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in the measured process")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: the measured child process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run(args.one, args.cpu_time, args.threads)))
        return
    rows = []
    for n in args.steps:
        options = ["--cpu-time"] * args.cpu_time + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run([sys.executable, __file__, "--one", str(n), *options], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append([r["steps"], r["rss_growth_mb"], r["first_ms"], r["last_ms"], r["report_s"], r["render_s"],
                     r["findings"]])
    print_table("gw.trace() over a long NaN-poisoned run (small MLP, NaN-padded batches, fresh process per row; "
                f"{'CPU' if args.cpu_time else 'wall'} time)",
                ["steps", "RSS growth MB", "step ms (first 10%)", "step ms (last 10%)", "report s (exit)",
                 "render s", "findings"], rows)


if __name__ == "__main__":
    main()
