"""gradwise under torch.distributed, in real processes: gloo process groups of 2 and 3 ranks on CPU.

Each group is spawned once per module and runs a list of checks in order on every rank; a rank records what
each check returned (or its traceback) in a file, and the tests below assert on those records. The group has
a deadline: ranks still running then are killed and the tests fail with what was recorded so far.

The data: every rank has 6 rows; the loss reads rows 0..3. On rank 1 the padding rows 4..5 are NaN (the
loss never reads them), or, for "genuine" cases, a row the loss reads holds a NaN. The reference for strong
zeros is one process on the clean rows of every rank: the mean over ranks of the per-rank losses, whose
gradient is what DDP's averaging all-reduce gives.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwise as gw
from _memory import NaNEmpty

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

nan = float("nan")
GROUP_TIMEOUT_S = 150  # a whole group (spawn, imports, every check); a hang fails the tests instead of blocking


# ---------------------------------------------------------------------------------------------------------
# The models, the data and the single-process reference
# ---------------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        self.unused = nn.Linear(2, 2) if unused else None  # a parameter no forward uses (find_unused_parameters)

    def forward(self, x):
        return self.body(x)


class _Identity(torch.autograd.Function):
    """A custom Function: a node type gradwise knows nothing about (the path that used to run twice)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _WithCustom(_Net):
    def forward(self, x):
        return self.body[2:](_Identity.apply(self.body[:2](x)))


def _model(cls: type[_Net] = _Net, **kwargs: bool) -> _Net:
    torch.manual_seed(0)
    return cls(**kwargs).double()


def _data(rank: int, step: int = 0, padding: bool = True, genuine: bool = False) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * step + rank), dtype=torch.float64)
    if rank == 1 and padding:
        x[4:] = nan  # rows the loss discards
    if rank == 1 and genuine:
        x[0, 0] = nan  # a row the loss reads
    return x


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[:4].sum()


def _reference(world: int, steps: tuple[int, ...] = (0,)) -> list[torch.Tensor]:
    """Gradients of one process on the clean rows of every rank: mean over ranks, summed over the steps."""
    ref = _model()
    for step in steps:
        (sum(_loss(ref, _data(r, step, padding=False)) for r in range(world)) / world).backward()
    return [p.grad for p in ref.body.parameters()]


def _compare(grads: list[torch.Tensor], world: int, steps: tuple[int, ...] = (0,)) -> dict:
    ref = _reference(world, steps)
    return {"finite": all(bool(g.isfinite().all()) for g in grads),
            "max_err": max(float((g - r).abs().max()) for g, r in zip(grads, ref, strict=True))}


def _grads(model: _Net) -> list[torch.Tensor]:
    return [p.grad for p in model.body.parameters()]


# ---------------------------------------------------------------------------------------------------------
# The checks (run on every rank, in order)
# ---------------------------------------------------------------------------------------------------------


def check_plain_ddp_is_contaminated(rank, world):
    ddp = DDP(_model())
    _loss(ddp, _data(rank)).backward()
    return {"nonfinite": any(not bool(p.grad.isfinite().all()) for p in ddp.parameters())}


def _strong_zeros_run(rank, world, steps=2, backward=None, **ddp_kwargs):
    """Several steps (a static graph and the bucket rebuild differ after the first), gradients zeroed
    between them, the last compared with the reference."""
    model = _model(unused=ddp_kwargs.get("find_unused_parameters", False))
    ddp = DDP(model, **ddp_kwargs)
    for step in range(steps):
        ddp.zero_grad(set_to_none=True)
        loss = _loss(ddp, _data(rank, step))
        if backward is None:
            with gw.strong_zeros():
                loss.backward()
        else:
            backward(loss)
    out = _compare(_grads(model), world, (steps - 1,))
    out["unused_grad"] = None if model.unused is None else model.unused.weight.grad
    out["unruled"] = sorted(op for op in gw.unruled_ops() if "c10d" in op)  # collectives have a rule
    return out


def check_strong_zeros(rank, world):
    return _strong_zeros_run(rank, world)


def check_compiled_ddp(rank, world):
    """torch.compile over a DDP model, NaN padding on rank 1 that the pass inside the compiled graph does not
    annihilate (aot_eager runs no inductor pass; with inductor, a zero crossing a graph boundary): the backward
    must still run once, all-reducing once. A second run under the eager rules used to leave each rank its own,
    un-averaged gradients: finite and wrong."""
    import torch._functorch.config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, on the compiler's first import
        model = _model()
        ddp = DDP(model)
        step = torch.compile(lambda x: _loss(ddp, x), backend="aot_eager")
        with torch._functorch.config.patch(enable_autograd_cache=False):
            for s in range(2):
                ddp.zero_grad(set_to_none=True)
                loss = step(_data(rank, s))
                with gw.strong_zeros():
                    loss.backward()
    torch._dynamo.reset()
    return _compare(_grads(model), world, (1,))


def check_compiled_ddp_buckets(rank, world):
    """Inductor over a DDP model that DDPOptimizer splits into one graph per bucket, after another compiled DDP
    model trained plainly in this process: the strong variant of each bucket's backward is compiled with that
    bucket's own forward metadata (it took a shared counter that PyTorch's backward compiles count down: an
    AssertionError, a 'Please report this graph' warning and op-by-op backwards from then on)."""
    import torch._functorch.config
    import torch._inductor.config

    first = torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 100  # several buckets: several graphs
    try:
        with warnings.catch_warnings(record=True) as caught, \
                torch._functorch.config.patch(enable_autograd_cache=False), \
                torch._inductor.config.patch(fx_graph_cache=False):
            warnings.simplefilter("always")
            for strong in (False, True):
                model = _model()
                step = torch.compile(DDP(model, bucket_cap_mb=1e-4))
                before = gw.compile_stats()
                for s in range(2):
                    model.zero_grad(set_to_none=True)
                    loss = _loss(step, _data(rank, s, padding=strong))
                    with gw.strong_zeros() if strong else contextlib.nullcontext():
                        loss.backward()
            stats = {k: v - before[k] for k, v in gw.compile_stats().items()}
    finally:
        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = first
        torch._dynamo.reset()
    out = _compare(_grads(model), world, (1,))
    out["warnings"] = [str(w.message)[:200] for w in caught if issubclass(w.category, gw.GradwiseWarning)]
    out["stats"] = stats
    return out


def check_gw_backward(rank, world):
    return _strong_zeros_run(rank, world, backward=gw.backward)


def check_find_unused_parameters(rank, world):
    return _strong_zeros_run(rank, world, find_unused_parameters=True)


def check_static_graph(rank, world):
    return _strong_zeros_run(rank, world, steps=3, static_graph=True)


def check_gradient_as_bucket_view(rank, world):
    return _strong_zeros_run(rank, world, gradient_as_bucket_view=True)


def check_no_sync_accumulation(rank, world):
    model = _model()
    ddp = DDP(model)
    with ddp.no_sync(), gw.strong_zeros():
        _loss(ddp, _data(rank, 0)).backward()  # accumulated locally, not reduced
    with gw.strong_zeros():
        _loss(ddp, _data(rank, 1)).backward()  # reduced, with the accumulated gradient
    return _compare(_grads(model), world, (0, 1))


def _counting_hook(calls: list):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook


def check_one_allreduce_with_unknown_nodes(rank, world):
    """A custom Function in the graph: each rank runs its backward once, so every bucket is all-reduced
    once, with strong zeros (contaminated rows) and with a genuine NaN (same NaN gradients on every rank)."""
    out = {}
    for case, genuine in (("contaminated", False), ("genuine", True)):
        model = _model(_WithCustom)
        ddp = DDP(model)
        calls: list = []
        ddp.register_comm_hook(None, _counting_hook(calls))
        with gw.strong_zeros():
            _loss(ddp, _data(rank, genuine=genuine)).backward()
        grads = torch.cat([p.grad.flatten() for p in model.body.parameters()])
        gathered = [None] * world
        dist.all_gather_object(gathered, grads)
        same = all(torch.equal(g.nan_to_num(7.0), grads.nan_to_num(7.0)) for g in gathered)
        out[case] = {"calls": calls, "same_on_all_ranks": same, "finite": bool(grads.isfinite().all()),
                     **({} if genuine else {"max_err": _compare(_grads(model), world)["max_err"]})}
    return out


def check_fsdp2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)  # resharded after forward: the saved weights are freed until backward
    fully_shard(model, mesh=mesh)
    with gw.strong_zeros():
        _loss(model, _data(rank)).backward()
    return _compare([p.grad.full_tensor() for p in model.body.parameters()], world)


class _AttnBlock(nn.Module):
    """Causal attention and a channel permutation (index_select): facts the plan reads from saved values."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.register_buffer("perm", torch.tensor([2, 0, 3, 1]))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).transpose(1, 3).unbind(2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        return torch.tanh(out).index_select(-1, self.perm)


class _AttnNet(nn.Module):
    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(4, 4), _AttnBlock(), nn.Linear(4, 1)
        self.checkpointed = checkpointed

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.head(h)


def _sequences(rank: int, clean: bool = False) -> torch.Tensor:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    if rank == 1 and not clean:
        x[2] = nan  # a sequence the loss discards
    return x


def check_fsdp2_checkpointed_attention(rank, world):
    """FSDP2 blocks under activation checkpointing (torch.utils.checkpoint and the composable one): the plan
    read causal attention's saved q/k (packed by the checkpoint: AttributeError) and an index_select's index
    (a second recomputation of the block outside the backward, whose all-gathers and checkpoint context then
    broke the backward's own)."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    ref = _AttnNet().double()
    (sum(ref(_sequences(r, clean=True)[:2]).sum() for r in range(world)) / world).backward()
    out = {}
    for kind in ("utils", "composable"):
        torch.manual_seed(0)
        model = _AttnNet(checkpointed=kind == "utils").double()
        mesh = init_device_mesh("cpu", (world,))
        if kind == "composable":
            checkpoint(model.block)
        fully_shard(model.block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with gw.strong_zeros():
            model(_sequences(rank))[:2].sum().backward()
        grads = [p.grad.full_tensor() for p in model.parameters()]
        out[kind] = {"finite": all(bool(g.isfinite().all()) for g in grads),
                     "max_err": max(float((g - r.grad).abs().max())
                                    for g, r in zip(grads, ref.parameters(), strict=True))}
    return out


def check_fsdp2_trace(rank, world):
    """gw.trace() under FSDP2, an optimizer step on sharded DTensor parameters included."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.body[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.trace() as report:
        _loss(model, _data(rank, padding=False, genuine=True)).backward()
        opt.step()
    merged = gw.gather_reports(report)
    return {"ranks": None if merged is None else merged.ranks}


def _fsdp2_guarded(world, policy):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, gw.nonfinite_guard(model, policy=policy)


def _full_params(model):
    return [p.detach().full_tensor().clone() for p in model.parameters()]


def check_fsdp2_guard_skip(rank, world):
    """A genuine NaN on rank 1 only, between two finite steps: every rank skips that step, and only that one."""
    model, guard = _fsdp2_guarded(world, "skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(model.parameters(), lr=0.1), guard)
    params, skips, bad = [_full_params(model)], [], []
    for step, genuine in enumerate((False, True, False)):
        opt.zero_grad()
        _loss(model, _data(rank, step, padding=False, genuine=genuine)).backward()
        opt.step()
        skips.append(guard.should_skip())
        bad.append(guard.bad)
        params.append(_full_params(model))
    return {"skips": skips, "bad": bad, "skipped": opt.skipped, "counts": (guard.steps, guard.nonfinite_steps),
            "params": params}


def check_fsdp2_guard_raise(rank, world):
    model, guard = _fsdp2_guarded(world, "raise")
    out: dict = {"raised": None}
    try:
        _loss(model, _data(rank, 0, padding=False, genuine=True)).backward()
    except gw.NonfiniteGradientError as e:
        out = {"raised": str(e), "bad": e.bad}
    model.zero_grad(set_to_none=True)
    _loss(model, _data(rank, 1, padding=False)).backward()  # the next step still works: nothing hangs
    out["next_finite"] = all(bool(p.grad.full_tensor().isfinite().all()) for p in model.parameters())
    out["counts"] = (guard.steps, guard.nonfinite_steps)
    return out


def check_fsdp2_guard_warn_and_strong_zeros(rank, world):
    """"warn" warns on every rank; under strong zeros, NaN padding that the loss never reads is no reason to
    warn (the guard sees the strong-zero gradients)."""
    model, _guard = _fsdp2_guarded(world, "warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gw.strong_zeros():
            _loss(model, _data(rank, 0)).backward()  # padding NaN on rank 1
        padded = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        model.zero_grad(set_to_none=True)
        _loss(model, _data(rank, 1, padding=False, genuine=True)).backward()
    genuine = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)][len(padded):]
    return {"padded": padded, "genuine": genuine}


def check_guard_refusals(rank, world):
    """FSDP1 and plain modules are refused with the fix; the old name is the same function."""
    out = {}
    for name, make in (("plain", lambda: _model()), ("ddp_register_false", None)):
        try:
            if make is None:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                gw.nonfinite_guard(fully_shard(_model(), mesh=init_device_mesh("cpu", (world,))), register=False)
            else:
                gw.nonfinite_guard(make())
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def check_fsdp1(rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 is deprecated in favour of fully_shard
        model = FSDP(_model(), device_id=torch.device("cpu"), use_orig_params=True,
                     auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
        with gw.strong_zeros():
            _loss(model, _data(rank)).backward()
        with FSDP.summon_full_params(model, with_grads=True):
            grads = [p.grad.clone() for p in model.body.parameters()]
    return _compare(grads, world)


def _guarded(rank, policy, register=True):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=1e-4)  # several buckets once DDP rebuilds them (after the first step)
    # the old name on one path, the new on the other: the same function
    guard = (gw.nonfinite_guard if register else gw.ddp_nonfinite_hook)(ddp, policy=policy, register=register)
    if not register:
        ddp.register_comm_hook(guard, guard.hook)
    return model, ddp, guard


def check_skip_policy(rank, world):
    model, ddp, guard = _guarded(rank, "skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _loss(ddp, _data(rank, 0, padding=False, genuine=True)).backward()
    opt.step()
    after_bad = [p.detach().clone() for p in model.parameters()]
    skipped, bad = guard.should_skip(), guard.bad
    opt.zero_grad()
    _loss(ddp, _data(rank, 1, padding=False)).backward()
    opt.step()
    return {"skipped": skipped, "bad": bad, "skipped_count": opt.skipped, "then_skip": guard.should_skip(),
            "unchanged": all(torch.equal(a, b) for a, b in zip(after_bad, before, strict=True)),
            "params_after_bad": after_bad, "params_after_good": [p.detach().clone() for p in model.parameters()]}


def check_raise_policy(rank, world):
    model, ddp, guard = _guarded(rank, "raise")
    _loss(ddp, _data(rank, 0, padding=False)).backward()  # finite; DDP rebuilds its buckets after this step
    out: dict = {"raised": None}
    ddp.zero_grad(set_to_none=True)
    try:
        _loss(ddp, _data(rank, 1, padding=False, genuine=True)).backward()
    except gw.NonfiniteGradientError as e:
        out = {"raised": str(e), "bad": e.bad}
    ddp.zero_grad(set_to_none=True)
    _loss(ddp, _data(rank, 2, padding=False)).backward()  # the next step still works: nothing hangs
    out["next_finite"] = all(bool(p.grad.isfinite().all()) for p in model.parameters())
    out["counts"] = (guard.steps, guard.nonfinite_steps)
    return out


def check_warn_policy(rank, world):
    _m, ddp, _guard = _guarded(rank, "warn", register=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(ddp, _data(rank, 0, padding=False, genuine=True)).backward()
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}


def check_hook_with_strong_zeros(rank, world):
    """The hook sees the strong-zero gradients: contaminated padding is no step to skip."""
    model, ddp, guard = _guarded(rank, "skip")
    with gw.strong_zeros():
        _loss(ddp, _data(rank)).backward()
    return {"skip": guard.should_skip(), **_compare(_grads(model), world)}


def check_trace_merged_report(rank, world):
    model = _model()
    ddp = DDP(model)
    with gw.trace() as report:
        loss = _loss(ddp, _data(rank, padding=False, genuine=True))
        loss.backward()
    report.notes += ["a note of every rank", f"a note of rank {rank}"]  # (what gw.watch() and the trace leave)
    merged = gw.gather_reports(report)
    return {"local_ranks": [f.rank for f in report.findings], "local_kinds": [f.kind for f in report.findings],
            "merged": None if merged is None else {"text": str(merged), "ranks": merged.ranks,
                                                   "json": merged.to_json(), "notes": merged.notes,
                                                   "finding_ranks": [f.rank for f in merged.findings]}}


def check_trace_buckets_from_nan_garbage(rank, world):
    """DDP's buckets made by empty under the trace, holding NaN garbage until the all-reduce writes them: the NaN
    that rank 1 sends is received through the all-reduce, not born in empty's garbage."""
    model = _model()
    with NaNEmpty(), gw.trace() as report:
        ddp = DDP(model)
        _loss(ddp, _data(rank, padding=False, genuine=True)).backward()
    merged = gw.gather_reports(report)
    return {"ranks": None if merged is None else merged.ranks, "born": sorted({f.born_op for f in report.findings})}


def _received_run(rank, mode, nan_at):
    """Three steps of DDP with the skip guard inside one gw.trace() (or gw.watch()) block, zero_grad each step;
    ``nan_at``: the (rank, step) pairs whose batch holds a genuine NaN. The reference for what a rank received:
    the NaN/Inf its .grad held right after each backward (``seen``)."""
    model = _model()
    seen = {}
    with (gw.trace() if mode == "trace" else gw.watch()) as report:
        ddp = DDP(model)  # (its set-up broadcast is no collective of the NaN step)
        guard = gw.nonfinite_guard(ddp, policy="skip")
        opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
        for step in range(3):
            opt.zero_grad()
            x = _data(rank, step, padding=False)
            if (rank, step) in nan_at:
                x[0, 0] = nan
            _loss(ddp, x).backward()
            bad = {n: int((~p.grad.isfinite()).sum()) for n, p in model.named_parameters()}
            if any(bad.values()):
                seen[step] = {n: c for n, c in bad.items() if c}
            opt.step()
    merged = gw.gather_reports(report)
    return {"seen": seen, "ranks": None if merged is None else merged.ranks,
            "received": [(f.rank, f.step, f.count, f.occurrences, f.reaches) for f in report.findings
                         if f.born_op == "c10d.allreduce_"]}


def check_received_before_zero_grad(rank, world):
    """Rank 1's NaN at step 1: the receipt was looked for only in the .grad left at the block's end, which
    zero_grad had cleared."""
    return {mode: _received_run(rank, mode, {(1, 1)}) for mode in ("trace", "watch")}


def check_received_after_introducing(rank, world):
    """Rank 1's NaN at step 1, rank 0's at step 2: rank 1 received rank 0's at step 2 and was not told so (DDP's
    buckets, rebuilt after step 0, then persist, and the provenance of rank 1's step-1 NaN that they kept made
    its gradients look reached by its own NaN again)."""
    return _received_run(rank, "trace", {(1, 1), (0, 2)})


CHECKS: dict[str, list[Callable]] = {
    "two": [check_plain_ddp_is_contaminated, check_strong_zeros, check_compiled_ddp, check_compiled_ddp_buckets,
            check_gw_backward,
            check_find_unused_parameters,
            check_static_graph, check_gradient_as_bucket_view, check_no_sync_accumulation,
            check_one_allreduce_with_unknown_nodes, check_fsdp2, check_fsdp2_checkpointed_attention,
            check_fsdp2_trace, check_fsdp1,
            check_fsdp2_guard_skip, check_fsdp2_guard_raise, check_fsdp2_guard_warn_and_strong_zeros,
            check_guard_refusals,
            check_skip_policy, check_raise_policy, check_warn_policy, check_hook_with_strong_zeros,
            check_received_before_zero_grad, check_received_after_introducing],
    "three": [check_plain_ddp_is_contaminated, check_strong_zeros, check_trace_merged_report, check_skip_policy,
              check_fsdp2_guard_skip, check_trace_buckets_from_nan_garbage],
}


# ---------------------------------------------------------------------------------------------------------
# Spawning a group with a deadline
# ---------------------------------------------------------------------------------------------------------


def _worker(rank: int, world: int, store: str, scenario: str, out: str, module: str = __name__) -> None:
    import importlib

    checks = importlib.import_module(module).CHECKS  # another test module's checks run in the same harness
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no hostname lookup, no network
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results: dict = {}
    try:
        for check in checks[scenario]:
            try:
                results[check.__name__] = check(rank, world)
            except Exception:
                results[check.__name__] = {"error": traceback.format_exc()}
            Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is on disk and the group is gone: leave without the interpreter's finalization, where PyTorch's
    # autograd engine and gloo threads can race the GIL's teardown and abort a rank that finished (SIGABRT, exit
    # -6; pytorch/pytorch#190489): seen once in CI with both ranks' results complete. An error before this point
    # (init, a check's crash of the process) still exits non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_group(scenario: str, world: int, tmp: Path, timeout: float = GROUP_TIMEOUT_S,
               module: str = __name__) -> list[dict]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp / "store"), scenario, str(tmp), module),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    results = [pickle.loads(f.read_bytes()) if (f := tmp / f"rank{r}.pkl").exists() else {} for r in range(world)]
    if hung:
        pytest.fail(f"{world}-rank group timed out after {timeout:.0f} s; ranks {hung} killed; checks done per rank: "
                    f"{[list(r) for r in results]}")
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        pytest.fail(f"ranks {failed} exited with {[procs[r].exitcode for r in failed]}; results: {results}")
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run_group("two", 2, tmp_path_factory.mktemp("ddp2"))


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    return _run_group("three", 3, tmp_path_factory.mktemp("ddp3"))


def _per_rank(results: list[dict], check: str) -> list:
    got = []
    for rank, r in enumerate(results):
        value = r.get(check)
        assert value is not None, f"rank {rank} did not run {check}"
        assert not (isinstance(value, dict) and "error" in value), f"rank {rank}, {check}:\n{value['error']}"
        got.append(value)
    return got


# ---------------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["two", "three"])
def test_plain_ddp_spreads_one_ranks_unused_nan_to_every_rank(group, request):
    for got in _per_rank(request.getfixturevalue(group), "check_plain_ddp_is_contaminated"):
        assert got["nonfinite"]


@pytest.mark.parametrize("group,check", [
    ("two", "check_strong_zeros"), ("two", "check_compiled_ddp"), ("two", "check_gw_backward"),
    ("two", "check_find_unused_parameters"),
    ("two", "check_static_graph"), ("two", "check_gradient_as_bucket_view"), ("two", "check_no_sync_accumulation"),
    ("three", "check_strong_zeros"),
])
def test_strong_zeros_under_ddp_equal_the_clean_single_process_gradients(group, check, request):
    for got in _per_rank(request.getfixturevalue(group), check):
        assert got["finite"]
        assert got["max_err"] < 1e-12
        assert got.get("unruled", []) == []
        if check == "check_find_unused_parameters":
            assert got["unused_grad"] is None  # DDP leaves an unused parameter's gradient alone


def test_compiled_ddp_split_into_buckets_takes_the_pass(two):
    for got in _per_rank(two, "check_compiled_ddp_buckets"):
        assert got["warnings"] == []
        assert got["finite"] and got["max_err"] < 1e-12  # float64; inductor may sum in another order
        # both strong backwards ran the buckets' strong variants (compiled with the pass), none was opaque
        assert got["stats"]["compiled"] == 2 and got["stats"]["opaque"] == 0, got["stats"]


def test_unknown_nodes_run_one_backward_so_each_bucket_is_all_reduced_once(two):
    for got in _per_rank(two, "check_one_allreduce_with_unknown_nodes"):
        clean, genuine = got["contaminated"], got["genuine"]
        assert clean["calls"] == [0] and clean["finite"] and clean["max_err"] < 1e-12 and clean["same_on_all_ranks"]
        assert genuine["calls"] == [0] and not genuine["finite"] and genuine["same_on_all_ranks"]


@pytest.mark.parametrize("check", ["check_fsdp2", "check_fsdp1"])
def test_strong_zeros_under_fsdp_on_cpu(two, check):
    for got in _per_rank(two, check):
        assert got["finite"] and got["max_err"] < 1e-12


def test_strong_zeros_under_fsdp2_with_activation_checkpointing(two):
    for got in _per_rank(two, "check_fsdp2_checkpointed_attention"):
        for kind in ("utils", "composable"):
            assert got[kind]["finite"] and got[kind]["max_err"] < 1e-12, kind


def test_trace_under_fsdp2_names_the_origin(two):
    ranks = _per_rank(two, "check_fsdp2_trace")
    assert ranks[0]["ranks"][0].startswith("rank 1 introduced the NaN at ") and ranks[1]["ranks"] is None


@pytest.mark.parametrize("group", ["two", "three"])
def test_fsdp2_guard_skips_the_nan_step_on_every_rank_together(group, request):
    """NaN on rank 1 only: every rank skips step 1 (and only it), and every rank's full parameters are equal
    and finite after each step; the finite steps did update them."""
    ranks = _per_rank(request.getfixturevalue(group), "check_fsdp2_guard_skip")
    for got in ranks:
        assert got["skips"] == [False, True, False] and got["skipped"] == 1 and got["counts"] == (3, 1)
        assert got["bad"] == [[], [(1, ["body.4.weight", "body.4.bias"]), (1, ["body.2.weight", "body.2.bias"]),
                                   (1, ["body.0.weight", "body.0.bias"])], []]
        before, after_good, after_bad, after_next = got["params"]
        assert all(bool(p.isfinite().all()) for ps in got["params"] for p in ps)
        assert all(torch.equal(a, b) for a, b in zip(after_bad, after_good, strict=True))  # the NaN step skipped
        assert not any(torch.equal(a, b) for a, b in zip(after_good, before, strict=True))  # finite steps updated
        assert not any(torch.equal(a, b) for a, b in zip(after_next, after_bad, strict=True))
    for got in ranks[1:]:
        for mine, first in zip(got["params"], ranks[0]["params"], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine, first, strict=True))


def test_fsdp2_guard_raise_on_every_rank_then_goes_on(two):
    for got in _per_rank(two, "check_fsdp2_guard_raise"):
        assert got["raised"] is not None, "every rank raises, not only the one with the NaN"
        assert "before the reduce-scatter (rank 1: body.4.weight, body.4.bias, body.2.weight" in got["raised"]
        assert {rank for rank, _ in got["bad"]} == {1}
        assert got["next_finite"] and got["counts"] == (2, 1)


def test_fsdp2_guard_warns_on_every_rank_and_sees_strong_zero_gradients(two):
    for got in _per_rank(two, "check_fsdp2_guard_warn_and_strong_zeros"):
        assert got["padded"] == []
        assert len(got["genuine"]) == 1 and "rank 1: body.4.weight" in got["genuine"][0]


def test_guard_refuses_what_it_cannot_watch(two):
    for got in _per_rank(two, "check_guard_refusals"):
        assert got["plain"].startswith("TypeError: gw.nonfinite_guard(model, ...): model must be a Distributed")
        assert got["ddp_register_false"].startswith("ValueError: gw.nonfinite_guard: register=False is for DDP")


@pytest.mark.parametrize("group", ["two", "three"])
def test_skip_policy_skips_the_step_on_every_rank_together(group, request):
    ranks = _per_rank(request.getfixturevalue(group), "check_skip_policy")
    for got in ranks:
        assert got["skipped"] and got["skipped_count"] == 1 and not got["then_skip"]
        assert got["unchanged"]  # the NaN step left every parameter as it was
        assert [rank for rank, _ in got["bad"]] == [1]
    for got in ranks[1:]:  # identical on every rank, after the skipped step and after the next real one
        assert all(torch.equal(a, b) for a, b in zip(got["params_after_bad"], ranks[0]["params_after_bad"],
                                                     strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got["params_after_good"], ranks[0]["params_after_good"],
                                                     strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["params_after_good"], ranks[0]["params_after_bad"],
                                                     strict=True))


def test_raise_policy_raises_on_every_rank_with_rank_and_parameter_names(two):
    for got in _per_rank(two, "check_raise_policy"):
        assert got["raised"] is not None, "every rank raises, not only the one with the NaN"
        assert "rank 1: " in got["raised"] and "body.0.weight" in got["raised"]
        assert {rank for rank, _ in got["bad"]} == {1} and len(got["bad"]) > 1  # one entry per bad bucket
        names = [name for _, names in got["bad"] for name in names]
        assert "body.0.weight" in names and len(names) == len(set(names))
        assert got["next_finite"] and got["counts"] == (3, 1)


def test_warn_policy_warns_on_every_rank(two):
    for got in _per_rank(two, "check_warn_policy"):
        assert len(got["warnings"]) == 1 and "rank 1: " in got["warnings"][0]


def test_hook_sees_strong_zero_gradients(two):
    for got in _per_rank(two, "check_hook_with_strong_zeros"):
        assert not got["skip"] and got["finite"] and got["max_err"] < 1e-12


def test_trace_reports_rank_1_as_origin_and_the_others_as_receivers(three):
    ranks = _per_rank(three, "check_trace_merged_report")
    for rank, got in enumerate(ranks):
        assert got["local_ranks"] and set(got["local_ranks"]) == {rank}
        assert (got["merged"] is not None) == (rank == 0)  # merged on rank 0 only
    merged = ranks[0]["merged"]
    [line] = merged["ranks"]
    assert line.startswith("rank 1 introduced the NaN at ") and "test_distributed.py:" in line
    assert line.endswith("; ranks 0,2 received it through the all-reduce")
    assert line in merged["text"] and "rank 0: received" in merged["text"] and "rank 1: genuine NaN" in merged["text"]
    # DDP copying the averaged bucket back into .grad is the collective's write, not a step after backward
    assert "wrote NaN into it afterwards" not in merged["text"] and "clip_grad_norm_" not in merged["text"]
    assert sorted(set(merged["finding_ranks"])) == [0, 1, 2]
    # the ranks' notes were dropped: kept, once when every rank has it
    assert merged["notes"] == ["a note of every rank", *(f"rank {r}: a note of rank {r}" for r in range(3))]
    assert '"rank": 1' in merged["json"] and '"ranks"' in merged["json"]


def test_a_bucket_of_nan_garbage_does_not_hide_the_all_reduce(three):
    ranks = _per_rank(three, "check_trace_buckets_from_nan_garbage")
    [line] = ranks[0]["ranks"]
    assert line.startswith("rank 1 introduced the NaN at ")
    assert line.endswith("; ranks 0,2 received it through the all-reduce"), line
    for rank in (0, 2):
        assert "aten.empty" not in ranks[rank]["born"], ranks[rank]


@pytest.mark.parametrize("mode", ["trace", "watch"])
def test_receipt_of_a_nan_step_that_zero_grad_cleared_before_the_block_ended(two, mode):
    r0, r1 = (got[mode] for got in _per_rank(two, "check_received_before_zero_grad"))
    assert list(r0["seen"]) == list(r1["seen"]) == [1]  # the NaN step, on both ranks (the all-reduce)
    [line] = r0["ranks"]
    assert line.startswith("rank 1 introduced the NaN at ")
    assert line.endswith("; rank 0 received it through the all-reduce"), line
    assert r1["received"] == []  # rank 1's gradients were its own NaN
    [(rank, step, count, occurrences, reaches)] = r0["received"]
    seen = r0["seen"][1]
    assert (rank, step, occurrences, count) == (0, 1, 1, sum(seen.values()))
    assert len(reaches) == len(seen) and all(any(r.endswith(n) for r in reaches) for n in seen), (reaches, seen)


def test_a_rank_that_introduced_a_nan_is_told_when_it_later_receives_one(two):
    r0, r1 = _per_rank(two, "check_received_after_introducing")
    assert list(r0["seen"]) == list(r1["seen"]) == [1, 2]
    [line] = r0["ranks"]
    assert line.startswith("rank 0 introduced the NaN at ") and "; rank 1 introduced the NaN at " in line, line
    assert line.endswith("; ranks 0,1 received it through the all-reduce"), line
    for rank, got, step in ((0, r0, 1), (1, r1, 2)):  # each received the other's, once
        [(r, s, count, occurrences, _reaches)] = got["received"]
        assert (r, s, occurrences, count) == (rank, step, 1, sum(got["seen"][step].values())), got


# ---------------------------------------------------------------------------------------------------------
# In this process: the merged story, rendering, and the errors (no process group needed)
# ---------------------------------------------------------------------------------------------------------


def _finding(kind: str, rank: int | None, where: str, received: bool = False) -> gw.Finding:
    op = "c10d.allreduce_" if received else "aten.mm"
    return gw.Finding(kind, op, where, 1, born_op=op, born_location=where, rank=rank)


def test_rank_story_names_origins_and_receivers():
    from gradwise._distributed import rank_story

    recv = [_finding("nan", r, "train.py:9", received=True) for r in (0, 2, 3)]
    assert rank_story([_finding("nan", 1, "data.py:41"), *recv]) == [
        "rank 1 introduced the NaN at data.py:41; ranks 0,2,3 received it through the all-reduce"]
    assert rank_story([_finding("inf", 1, "a.py:1"), *recv[:1]]) == [
        "rank 1 introduced the Inf at a.py:1; rank 0 received it through the all-reduce"]
    assert rank_story([_finding("contamination", 2, "a.py:1"), _finding("nan", 2, "a.py:2"),
                       _finding("contamination", 0, "b.py:3")]) == [
        "rank 0 introduced a NaN/Inf that the loss never used (contamination) at b.py:3; "
        "rank 2 introduced the NaN at a.py:2"]
    assert rank_story([_finding("nan", r, "t.py:9", received=True) for r in range(4)])[0].startswith(
        "ranks 0-3 received NaN/Inf through the all-reduce, but no traced rank saw it born")
    assert rank_story([_finding("kink", 1, "a.py:1"), _finding("nan", None, "a.py:2")]) == []


def test_rank_in_rendering_and_json_only_when_set():
    report = gw.Report(findings=[_finding("nan", 1, "data.py:41"), _finding("nan", 0, "t.py:9", received=True)],
                       ranks=["rank 1 introduced the NaN at data.py:41; rank 0 received it through the all-reduce"])
    text = str(report)
    assert text.splitlines()[1] == "  " + report.ranks[0]
    assert "1. rank 1: genuine NaN" in text and "2. rank 0: received: a NaN/Inf that another rank" in text
    assert '"rank": 1' in report.to_json() and '"ranks"' in report.to_json()
    plain = gw.Report(findings=[_finding("nan", None, "data.py:41")])
    assert "rank" not in str(plain) and '"ranks"' not in plain.to_json() and '"rank": null' in plain.to_json()


def test_single_process_use_is_unchanged_and_misuse_is_explained():
    x = torch.tensor([1.0, nan], requires_grad=True)
    with gw.trace() as report:
        x[:1].sum().mul(x[1:].sum()).backward()
    assert report.findings and all(f.rank is None for f in report.findings)
    with pytest.raises(RuntimeError, match="init_process_group"):
        gw.gather_reports(report)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        gw.ddp_nonfinite_hook(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fully_shard"):
        gw.nonfinite_guard(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="policy"):
        gw.nonfinite_guard(nn.Linear(2, 2), policy="ignore")
