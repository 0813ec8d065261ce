"""Cost of ``gw.nonfinite_guard`` under FSDP2: per-step time of plain FSDP2 and FSDP2 with the guard.

    python benchmarks/bench_fsdp_guard.py [--repeats 15] [--world 2]

Spawns ``--world`` processes (gloo on CPU, one thread each). Each times whole training steps (``zero_grad``,
forward, backward with FSDP2's all-gathers and reduce-scatters, ``optimizer.step()``) on finite data, two
candidates round-robin (`_harness.median_times`): ``plain FSDP2``, and ``guard``: a copy of the same model with
``gw.nonfinite_guard(policy="skip")`` and ``gw.SkipNonfiniteStep`` (two min/max passes per reduce-scatter, one
4-byte-per-flag all-reduce and one host read per step). Every Linear and the whole model are ``fully_shard``ed.
Rank 0 prints the medians and the ratio. Target: <= 1.15x.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwise as gw
from _harness import free_port, median_times, print_table
from bench_strong_zeros import mlp

TARGET = 1.15


def _sharded(net: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for module in net.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def _worker(rank: int, world: int, port: int, repeats: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = mlp()
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(rank))
    plain, guarded = _sharded(copy.deepcopy(net), world), _sharded(copy.deepcopy(net), world)
    guard = gw.nonfinite_guard(guarded, policy="skip")
    opts = {"plain FSDP2": torch.optim.SGD(plain.parameters(), lr=1e-4),
            "guard": gw.SkipNonfiniteStep(torch.optim.SGD(guarded.parameters(), lr=1e-4), guard)}

    def step(model, opt):
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        return run

    times = median_times({"plain FSDP2": step(plain, opts["plain FSDP2"]), "guard": step(guarded, opts["guard"])},
                         repeats=repeats, warmup=5)
    assert guard.steps > 0 and guard.nonfinite_steps == 0, "finite data: the guard must have run and not fired"
    if rank == 0:
        ratio = times["guard"] / times["plain FSDP2"]
        print_table(f"FSDP2 training step, {world} gloo ranks x 1 thread, median of {repeats} interleaved repeats "
                    f"on rank 0; target <= {TARGET}x",
                    ["workload", "plain FSDP2 ms", "guard ms", "x", "met"],
                    [["MLP 6x256+GELU b256", times["plain FSDP2"] * 1e3, times["guard"] * 1e3, ratio,
                      "yes" if ratio <= TARGET else "NO"]])
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    mp.spawn(_worker, args=(args.world, free_port(), args.repeats), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
