"""gradwise in DDP training, on CPU with gloo:  torchrun --nproc_per_node=2 examples/ddp_example.py

Every rank pads its batch to 6 rows; the loss reads the first 4. On rank 1 the padding is NaN.

1. Plain DDP: rank 1's unused NaN reaches every rank through the all-reduce.
2. ``gw.strong_zeros()``: every rank's gradients are finite (those of the program without the padding).
3. ``gw.ddp_nonfinite_hook(policy="skip")``: a genuine NaN on rank 1; every rank skips the step together.
4. ``gw.trace()`` + ``gw.gather_reports``: which rank introduced the NaN and which only received it.
"""

import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwise as gw


def batch(rank: int, genuine: bool = False) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[4:] = float("nan")  # padding rows the loss never reads
        if genuine:
            x[0, 0] = float("nan")  # a row the loss does read
    return x


def say(rank: int, message: str) -> None:
    """Print every rank's line on rank 0, in rank order (a collective: every rank calls it)."""
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, f"rank {rank}: {message}")
    if rank == 0:
        print("\n".join(lines), flush=True)


def finite(model: nn.Module) -> bool:
    return all(bool(p.grad.isfinite().all()) for p in model.parameters())


def main() -> None:
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)))

    # 1. plain DDP: one rank's padding NaN poisons every rank
    model(batch(rank))[:4].mean().backward()
    say(rank, f"plain DDP gradients finite: {finite(model)}")

    # 2. strong zeros: what DDP all-reduces is the gradient of the rows the loss reads
    model.zero_grad(set_to_none=True)
    with gw.strong_zeros():
        model(batch(rank))[:4].mean().backward()
    say(rank, f"gw.strong_zeros gradients finite: {finite(model)}")

    # 3. the hook: a genuine NaN on rank 1; every rank skips the optimizer step together
    guard = gw.ddp_nonfinite_hook(model, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(model.parameters(), lr=0.1), guard)
    opt.zero_grad()
    with gw.strong_zeros():
        model(batch(rank, genuine=True))[:4].mean().backward()
    opt.step()
    say(rank, f"step skipped: {guard.should_skip()} ({guard.bad})")

    # 4. trace every rank, merge on rank 0: who introduced the NaN, who received it
    opt.zero_grad()
    with gw.trace() as report:
        model(batch(rank, genuine=True))[:4].mean().backward()
    merged = gw.gather_reports(report)
    if merged is not None:
        print(merged, flush=True)
    # DDP's reducer, the hook and the report sit in reference cycles that hold gloo's work handles: freed by the
    # interpreter's final teardown, after the group is gone, they abort the process now and then ("terminate
    # called without an active exception"). Free them while Python and the group are alive.
    del model, guard, opt, report, merged
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
