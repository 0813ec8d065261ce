"""Strong zeros at two commits in one process: ``gw.backward`` of the working tree against the same function at
``--base`` (imported as ``gradwise_base``) and plain ``loss.backward()``, interleaved in blocks, median ratios.

On a shared machine whose speed drifts between runs, comparing two processes run minutes apart measures the
machine; interleaving both versions in one process measures the change.

    python benchmarks/ab_strong_zeros.py --base HEAD~1 --only "SDPA" [--threads 1] [--blocks 60]
    python benchmarks/ab_strong_zeros.py --base HEAD~1 --threads 1 --cpu-time   # on a machine shared with other jobs
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _harness
import bench_strong_zeros

_IMPORTS = re.compile(r"\bgradwise(?=[.\s]|$)", re.MULTILINE)


def import_base(ref: str, into: Path):
    """``src/gradwise`` at git ``ref``, its imports renamed, imported as ``gradwise_base``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "src/gradwise"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    package = into / "gradwise_base"
    (into / "src" / "gradwise").rename(package)
    for path in package.rglob("*.py"):
        path.write_text(_IMPORTS.sub("gradwise_base", path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module("gradwise_base")


def _block(package):
    def backward(loss):
        with package.strong_zeros():
            loss.backward()

    return backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git ref to compare the working tree with")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=60, help="interleaved blocks of 5 backward calls each")
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU time (with --threads 1 on a "
                        "machine shared with other jobs, where wall time mostly measures them)")
    parser.add_argument("--block", action="store_true", help="also time loss.backward() in a strong_zeros() block "
                        "entered per backward")
    args = parser.parse_args()
    _harness.keep_freed_memory()
    torch.set_num_threads(args.threads)
    import gradwise as gw

    clock = time.process_time if args.cpu_time else time.perf_counter

    with tempfile.TemporaryDirectory() as tmp:
        base = import_base(args.base, Path(tmp))
        for case in bench_strong_zeros.cases():
            if args.only not in case.name:
                continue
            fns = {"plain": lambda loss: loss.backward(), "base": base.backward, "tree": gw.backward}
            if args.block:
                fns.update({"base block": _block(base), "tree block": _block(gw)})
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.blocks):
                for name, backward in fns.items():
                    block = []
                    for _ in range(5):
                        loss = case.loss(case.net)
                        start = clock()
                        backward(loss)
                        block.append(clock() - start)
                    times[name].append(statistics.median(block))
            ratio = {k: statistics.median([t / p for t, p in zip(v, times["plain"], strict=True)])
                     for k, v in times.items()}
            blocks = f"   block: {args.base} {ratio['base block']:.3f}x   tree {ratio['tree block']:.3f}x" \
                if args.block else ""
            print(f"{case.name:34s} plain {statistics.median(times['plain']) * 1e3:7.3f} ms   "
                  f"{args.base} {ratio['base']:.3f}x   tree {ratio['tree']:.3f}x{blocks}")


if __name__ == "__main__":
    main()
