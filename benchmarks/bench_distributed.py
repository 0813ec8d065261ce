"""Cost of gradwise in DDP training: per-step time of plain DDP, DDP with strong zeros, and DDP with the hook.

    python benchmarks/bench_distributed.py [--repeats 15] [--world 2] [--json FILE]

Spawns ``--world`` processes (gloo on CPU, one thread each). Each times whole training steps
(``zero_grad``, forward, backward with DDP's all-reduce, ``optimizer.step()``) on finite data for three
candidates, run round-robin so drift hits all alike (`_harness.median_times`):

- ``plain DDP``: ``loss.backward()``;
- ``strong zeros``: the same DDP, ``with gw.strong_zeros(): loss.backward()``;
- ``hook``: a DDP with ``gw.ddp_nonfinite_hook(policy="skip")`` and ``gw.SkipNonfiniteStep``.

Every rank runs the same sequence (the all-reduces keep them in step); the table shows rank 0's medians and
the ratios to plain DDP. Workloads: those of the strong-zeros benchmark (MLP 6 x Linear(256) + GELU, batch 256;
TransformerEncoderLayer d_model 128, 4 heads, 8 x 64), per rank. Target: <= 1.15x.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwise as gw
from _harness import free_port, median_times, print_table
from bench_strong_zeros import mlp

TARGET = 1.15


def workloads(rank: int) -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)  # the same initial parameters on every rank (DDP broadcasts rank 0's anyway)
    layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, dropout=0.0, batch_first=True)
    g = torch.Generator().manual_seed(rank)  # each rank its own finite batch
    return [("MLP 6x256+GELU b256", mlp(), torch.randn(256, 256, generator=g)),
            ("Transformer d128 h4 8x64", layer, torch.randn(8, 64, 128, generator=g))]


def _step(ddp: nn.Module, opt, x: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        backward(ddp(x).square().mean())
        opt.step()

    return step


def _strong_backward(loss: torch.Tensor) -> None:
    with gw.strong_zeros():
        loss.backward()


def _worker(rank: int, world: int, port: int, repeats: int, out: str | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for name, net, x in workloads(rank):
        plain = DDP(copy.deepcopy(net))
        guarded = DDP(copy.deepcopy(net))
        guard = gw.ddp_nonfinite_hook(guarded, policy="skip")
        sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1e-4)
        plain_opt = sgd(plain)
        fns = {
            "plain DDP": _step(plain, plain_opt, x, torch.Tensor.backward),
            "strong zeros": _step(plain, plain_opt, x, _strong_backward),
            "hook": _step(guarded, gw.SkipNonfiniteStep(sgd(guarded), guard), x, torch.Tensor.backward),
        }
        times = median_times(fns, repeats=repeats, warmup=5)
        assert not guard.should_skip() and guard.nonfinite_steps == 0, "finite data: the guard must not fire"
        base = times["plain DDP"]
        rows.append({"workload": name, "plain_ms": base * 1e3, "strong_zeros_ms": times["strong zeros"] * 1e3,
                     "hook_ms": times["hook"] * 1e3, "strong_zeros_ratio": times["strong zeros"] / base,
                     "hook_ratio": times["hook"] / base})
    if rank == 0:
        print_table(f"DDP training step (forward + backward + all-reduce + SGD step), {world} gloo ranks x 1 "
                    f"thread, median of {repeats} interleaved repeats on rank 0; target <= {TARGET}x",
                    ["workload", "plain DDP ms", "strong zeros ms", "x", "hook ms", "x", "met"],
                    [[r["workload"], r["plain_ms"], r["strong_zeros_ms"], r["strong_zeros_ratio"], r["hook_ms"],
                      r["hook_ratio"],
                      "yes" if max(r["strong_zeros_ratio"], r["hook_ratio"]) <= TARGET else "NO"] for r in rows])
        if out:
            Path(out).write_text(json.dumps({"torch": torch.__version__, "world": world, "repeats": repeats,
                                             "target": TARGET, "rows": rows}, indent=2))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args()
    mp.spawn(_worker, args=(args.world, free_port(), args.repeats, str(args.json) if args.json else None),
             nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
