"""gw.nonfinite_guard under FSDP2, on CPU with gloo:  torchrun --nproc_per_node=2 examples/fsdp_guard_example.py

Every rank trains the same sharded MLP (``fully_shard`` on each Linear and on the whole) for 3 steps. At step 1
rank 1 alone has a NaN in a row the loss reads: the guard sees it in rank 1's gradients before the
reduce-scatter, and every rank skips that step together. Rank 0 prints what every rank saw.
"""

import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradwise as gw


def batch(rank: int, step: int) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + rank))
    if rank == 1 and step == 1:
        x[0, 0] = float("nan")  # rank 1 only
    return x


def main() -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    guard = gw.nonfinite_guard(model, policy="skip")  # wraps FSDP's reduce-scatter
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(model.parameters(), lr=0.1), guard)
    lines = []
    for step in range(3):
        opt.zero_grad()
        model(batch(rank, step)).mean().backward()
        opt.step()
        full = [p.detach().full_tensor() for p in model.parameters()]  # every rank's whole parameters
        finite = all(bool(t.isfinite().all()) for t in full)
        lines.append(f"rank {rank} step {step}: skipped {guard.should_skip()}, parameters finite {finite}, "
                     f"sum {float(sum(t.sum() for t in full)):.6f}")
        if guard.bad:
            lines.append(f"rank {rank} step {step}: {guard.bad}")
    gathered = [None] * world
    dist.all_gather_object(gathered, lines)
    if rank == 0:
        for rank_lines in gathered:
            print("\n".join(rank_lines))
    # FSDP's modules sit in reference cycles (hooks) that hold its collectives' handles: freed by the interpreter's
    # final teardown, after the group is gone, they abort the process now and then ("terminate called without
    # an active exception"). Free them while Python and the group are alive.
    del model, opt, guard, full
    gc.collect()
    dist.barrier()  # every rank done with its collectives before the group goes (gloo aborts a rank otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
