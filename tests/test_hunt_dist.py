"""Hunted cases of gradwise under torch.distributed (gloo, 2 CPU processes): the guard's decision must be the one
for the gradients the optimizer is about to read.

The processes are spawned once for the module by ``test_distributed``'s harness (deadline included), running the
checks below in order on every rank. The reference is one float64 process on the data of every rank, taking only
the optimizer steps that should be taken.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwise as gw
from test_distributed import _data, _loss, _model, _per_rank, _run_group, pytestmark  # noqa: F401


def _fsdp(world: int, **kwargs):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.body:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _full(model) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _reference(world: int, taken: list[list[int]]) -> list[torch.Tensor]:
    """SGD(lr=0.1) in one process: ``taken`` lists, per optimizer step taken, the data steps whose gradients it
    accumulates (the mean over ranks of each)."""
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for micro in taken:
        opt.zero_grad()
        for s in micro:
            (sum(_loss(ref, _data(r, s, padding=False)) for r in range(world)) / world).backward()
        opt.step()
    return _full(ref)


def _closure_run(rank, world, wrap):
    """Three optimizer steps through ``SkipNonfiniteStep.step(closure)``; rank 1's batch of step 1 holds a NaN
    the loss reads. The closure runs the backward, so the guard's decision exists only after it."""
    model, target = wrap(world)
    guard = gw.nonfinite_guard(target, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(target.parameters(), lr=0.1), guard)
    skips = []
    for step in range(3):
        def closure(step=step):
            opt.zero_grad()
            loss = _loss(target, _data(rank, step, padding=False, genuine=step == 1))
            loss.backward()
            return loss

        loss = opt.step(closure)
        skips.append((guard.should_skip(), loss is not None))  # the closure's loss is returned
    params = _full(model)
    ref = _reference(world, [[0], [2]])
    return {"skips": skips, "skipped": opt.skipped, "finite": all(bool(p.isfinite().all()) for p in params),
            "max_err": max(float((p - r).abs().max()) for p, r in zip(params, ref, strict=True))}


def check_closure_step_ddp(rank, world):
    def wrap(world):
        model = _model()
        return model, DDP(model)

    return _closure_run(rank, world, wrap)


def check_closure_step_fsdp2(rank, world):
    def wrap(world):
        model = _fsdp(world)
        return model, model

    return _closure_run(rank, world, wrap)


def check_fsdp2_accumulation(rank, world):
    """FSDP2 reduce-scatters every micro-batch by default and adds the reduced shard to the gradient there: a NaN
    of micro-batch 0 on rank 1 stays in the gradients after a finite micro-batch 1. Then, after zeroing (in
    place, and to None), the next steps are finite and taken."""
    model = _fsdp(world)
    guard = gw.nonfinite_guard(model, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(model.parameters(), lr=0.1), guard)
    out: dict = {"skips": [], "bad": []}
    for micro, set_to_none in (((0, 1), True), ((2, 3), False), ((4, 5), True)):
        opt.zero_grad(set_to_none=set_to_none)
        for s in micro:
            _loss(model, _data(rank, s, padding=False, genuine=s == 0)).backward()
        out["skips"].append(guard.should_skip())
        out["bad"].append(guard.bad)
        opt.step()
    params = _full(model)
    ref = _reference(world, [[2, 3], [4, 5]])
    out["finite"] = all(bool(p.isfinite().all()) for p in params)
    out["max_err"] = max(float((p - r).abs().max()) for p, r in zip(params, ref, strict=True))
    return out


def check_ddp_accumulation_names_the_origin(rank, world):
    """DDP accumulation without no_sync(): every micro-batch is all-reduced, and DDP's buckets hold the
    accumulated .grad. Rank 1's NaN of micro-batch 0 is still in every rank's bucket at micro-batch 1: the guard
    named rank 0 too (as if it had brought a NaN in). Then, zeroed in place and to None, finite steps are taken."""
    model = _model()
    ddp = DDP(model, bucket_cap_mb=1e-4)
    guard = gw.nonfinite_guard(ddp, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
    out: dict = {"skips": [], "bad": []}
    for micro, set_to_none in (((0, 1), True), ((2, 3), False), ((4, 5), True)):
        opt.zero_grad(set_to_none=set_to_none)
        for s in micro:
            _loss(ddp, _data(rank, s, padding=False, genuine=s == 0)).backward()
            out["bad"].append(sorted({r for r, _ in guard.bad}))
        out["skips"].append(guard.should_skip())
        opt.step()
    params = _full(model)
    ref = _reference(world, [[2, 3], [4, 5]])
    out["max_err"] = max(float((p - r).abs().max()) for p, r in zip(params, ref, strict=True))
    return out


def check_ddp_join_uneven_inputs(rank, world):
    """DDP.join() (https://pytorch.org/tutorials/advanced/generic_join.html): rank 1 has one batch more than rank
    0, with a NaN the loss reads. Joined, rank 0 runs the comm hook on zero buckets outside any backward: the
    guard's hook crashed there ('Final callbacks can only be installed during backward pass') before its
    all-reduce, and rank 1 hung waiting for it. Then a static graph (its first all-reduce is delayed to a
    callback) with the same data."""
    out = {}
    for kind, kwargs in (("default", {}), ("static_graph", {"static_graph": True})):
        model = _model()
        ddp = DDP(model, **kwargs)
        guard = gw.nonfinite_guard(ddp, policy="skip")
        opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
        skips = []
        with ddp.join():
            for step in range(2 + rank):
                opt.zero_grad()
                _loss(ddp, _data(rank, step, padding=False, genuine=step == 2)).backward()
                opt.step()
                skips.append(guard.should_skip())
        out[kind] = {"skips": skips, "params": _full(model)}
    return out


def _first_layer_sharded(world: int):
    """FSDP2 on the first Linear only: the other parameters stay plain tensors, each rank's own gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model.body[0], mesh=init_device_mesh("cpu", (world,)))
    return model


def _watched_fsdp2(rank, world, genuine_from, no_sync=False, partly=False):
    """gw.watch() over four FSDP2 steps; from step ``genuine_from`` to step 2, rank 1's batch holds a NaN the loss
    reads; step 3 is finite, its gradients compared with one process on every rank's data (``err``).
    ``expected``: per parameter, the NaN count of this rank's part of the step-1 gradient, from a plain model on
    rank 1's data (rank 0's is finite): its whole gradient without a reduce-scatter (``no_sync``, or a parameter
    FSDP does not manage: ``partly``), else the rows of this rank's shard (FSDP2 chunks dim 0 over the ranks; the
    sum over ranks is NaN where rank 1's is)."""
    model = _first_layer_sharded(world) if partly else _fsdp(world)
    if no_sync:
        model.set_requires_gradient_sync(False)
    with gw.watch() as report:
        for step in range(4):
            model.zero_grad()
            _loss(model, _data(rank, step, padding=False, genuine=genuine_from <= step <= 2)).backward()
    err = None
    if not (no_sync or partly):
        ref = _model()
        (sum(_loss(ref, _data(r, 3, padding=False)) for r in range(world)) / world).backward()
        err = max(float((p.grad.full_tensor() - r.grad).abs().max())
                  for p, r in zip(model.parameters(), ref.parameters(), strict=True))
    plain = _model()
    _loss(plain, _data(1, 1, padding=False, genuine=True)).backward()
    expected = {}
    for name, p in plain.named_parameters():
        mask = ~p.grad.isfinite()
        reduced = not no_sync and (not partly or name.startswith("body.0."))
        if reduced:
            parts = torch.chunk(mask, world, dim=0)
            mask = parts[rank] if rank < len(parts) else mask[:0]
        if rank == 1 or reduced:
            expected[f"model.{name}"] = int(mask.sum())
    return {"findings": [(f.step, f.kind, f.op, f.born_op, f.count, sorted(f.reaches)) for f in report.findings],
            "notes": list(report.notes), "empty": len(report) == 0 and not report.notes, "err": err, "rank": rank,
            "names": [f"model.{name}" for name, p in plain.named_parameters() if not bool(p.grad.isfinite().all())],
            "expected": {k: v for k, v in expected.items() if v}}


def check_fsdp2_watch(rank, world):
    return _watched_fsdp2(rank, world, genuine_from=1)


def check_fsdp2_watch_no_sync(rank, world):
    return _watched_fsdp2(rank, world, genuine_from=1, no_sync=True)


def check_fsdp2_watch_partly_sharded(rank, world):
    return _watched_fsdp2(rank, world, genuine_from=1, partly=True)


def check_fsdp2_watch_finite(rank, world):
    return _watched_fsdp2(rank, world, genuine_from=3)


def check_fsdp2_watch_not_zeroed(rank, world):
    """A NaN backward before the block, gradients not zeroed: the block's first (finite) backward adds to them."""
    model = _fsdp(world)
    _loss(model, _data(rank, 0, padding=False, genuine=True)).backward()
    with gw.watch() as report:
        _loss(model, _data(rank, 1, padding=False)).backward()
    return {"findings": [(f.step, f.kind, f.born_op) for f in report.findings], "notes": list(report.notes)}


def check_fsdp2_no_reshard_strong_zeros(rank, world):
    """Strong zeros under FSDP2 with reshard_after_forward=False (the saved weights keep their storage, so a
    finite rank takes the plain path), NaN padding on rank 1: the clean single-process gradients."""
    from test_distributed import _compare

    model = _fsdp(world, reshard_after_forward=False)
    with gw.strong_zeros():
        _loss(model, _data(rank)).backward()
    return _compare([p.grad.full_tensor() for p in model.body.parameters()], world)


def _accumulated_trace(rank, mode, no_sync):
    """Two micro-batches accumulated into one DDP step inside gw.trace() (or gw.watch()); rank 1's first holds a
    NaN the loss reads, under ``no_sync()`` (only the second is all-reduced) or not. ``seen``: the NaN count of
    this rank's gradients after each backward (the reference for what it holds)."""
    import contextlib

    model = _model()
    ddp = DDP(model)
    seen = []
    with gw.trace() if mode == "trace" else gw.watch() as report:
        for micro in (0, 1):
            with ddp.no_sync() if micro == 0 and no_sync else contextlib.nullcontext():
                _loss(ddp, _data(rank, micro, padding=False, genuine=micro == 0)).backward()
            seen.append(sum(int((~p.grad.isfinite()).sum()) for p in model.parameters()))
    merged = gw.gather_reports(report)
    return {"seen": seen, "ranks": None if merged is None else merged.ranks,
            "received": [(f.step, f.count, f.occurrences) for f in report.findings if f.born_op == "c10d.allreduce_"]}


def check_trace_accumulated_micro_batches(rank, world):
    return {f"{mode}-{'no_sync' if no_sync else 'sync'}": _accumulated_trace(rank, mode, no_sync)
            for mode in ("trace", "watch") for no_sync in (True, False)}


def _traced_fsdp2_steps(rank, world, per_step):
    """FSDP2, three steps (rank 1's data at step 1 holds a NaN the loss reads) under gw.trace() (a block per step or
    one around all), beside the same steps without it. Uninitialised memory is filled with NaN
    (``fill_uninitialized_memory``), so that a read of memory nothing wrote shows, on every run."""
    import contextlib

    from torch.utils import deterministic

    kept = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = True
    try:
        grads, found = {}, []
        for traced in (False, True):
            model = _fsdp(world)
            outer = gw.trace() if traced and not per_step else contextlib.nullcontext()
            grads[traced] = []
            with outer:
                for step in range(3):
                    model.zero_grad()
                    with gw.trace() if traced and per_step else contextlib.nullcontext() as report:
                        _loss(model, _data(rank, step, padding=False, genuine=step == 1)).backward()
                    if report is not None:
                        found.append(len(report.findings))
                    grads[traced].append([p.grad.full_tensor() for p in model.parameters()])
    finally:
        torch.use_deterministic_algorithms(kept[0])
        deterministic.fill_uninitialized_memory = kept[1]
    return {"same": [all(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                         for a, b in zip(plain, traced, strict=True))
                     for plain, traced in zip(grads[False], grads[True], strict=True)],
            "finite": [all(bool(g.isfinite().all()) for g in step) for step in grads[False]], "found": found,
            "diff": [[float((a - b).abs().max()) for a, b in zip(plain, traced, strict=True)]
                     for plain, traced in zip(grads[False], grads[True], strict=True)]}


def check_trace_fsdp2_after_a_nan_step(rank, world):
    return {"per_step": _traced_fsdp2_steps(rank, world, True), "one_block": _traced_fsdp2_steps(rank, world, False)}


CHECKS = {"hunt": [check_closure_step_ddp, check_closure_step_fsdp2, check_fsdp2_accumulation,
                   check_ddp_accumulation_names_the_origin, check_ddp_join_uneven_inputs,
                   check_fsdp2_no_reshard_strong_zeros, check_trace_accumulated_micro_batches],
          # (a group of their own: before the fix the watch crashed a rank under FSDP2, which hung the other)
          "watch_fsdp2": [check_fsdp2_watch_finite, check_fsdp2_watch_not_zeroed, check_fsdp2_watch,
                          check_fsdp2_watch_no_sync, check_fsdp2_watch_partly_sharded],
          "trace_fsdp2": [check_trace_fsdp2_after_a_nan_step]}


@pytest.fixture(scope="module")
def hunt(tmp_path_factory):
    return _run_group("hunt", 2, tmp_path_factory.mktemp("hunt2"), module=__name__)


@pytest.fixture(scope="module")
def watch_fsdp2(tmp_path_factory):
    return _run_group("watch_fsdp2", 2, tmp_path_factory.mktemp("watch_fsdp2"), module=__name__)


@pytest.fixture(scope="module")
def trace_fsdp2(tmp_path_factory):
    return _run_group("trace_fsdp2", 2, tmp_path_factory.mktemp("trace_fsdp2"), module=__name__)


@pytest.mark.parametrize("case", ["per_step", "one_block"])
def test_trace_under_fsdp2_leaves_every_gradient_as_without_it(trace_fsdp2, case):
    """In a backward whose forward met a NaN, the trace reruns each backward op under the strong-zero rules on
    shadow tensors. It reran FSDP's own ops too: fsdp::all_gather_copy_in writes its output although its schema
    says it writes nothing, so the shadow of the all-gather buffer held only this rank's shard (the rest
    uninitialised), and the rerun of fsdp::split_with_sizes_copy wrote that buffer into the real unsharded
    parameters (an ``out=`` list, which the shadow did not copy): the backward's matmuls read garbage, and the NaN
    step's and later finite steps' gradients were NaN or wrong on most runs."""
    for got in _per_rank(trace_fsdp2, "check_trace_fsdp2_after_a_nan_step"):
        assert got[case]["finite"] == [True, False, True], got  # (rank 1's NaN reaches every rank's step 1)
        assert got[case]["same"] == [True, True, True], got
    if case == "per_step":  # the finite steps' reports are empty on both ranks (they told of NaN inputs before)
        r0, r1 = (got[case]["found"] for got in _per_rank(trace_fsdp2, "check_trace_fsdp2_after_a_nan_step"))
        assert r0 == [0, 0, 0] and r1[0] == r1[2] == 0 and r1[1] > 0, (r0, r1)


@pytest.mark.parametrize("check", ["check_closure_step_ddp", "check_closure_step_fsdp2"])
def test_skip_step_with_a_closure_decides_on_the_closures_own_backward(hunt, check):
    """``SkipNonfiniteStep.step(closure)`` read the guard before running the closure: the NaN step was applied
    (NaN weights on every rank) and the next finite one skipped."""
    for got in _per_rank(hunt, check):
        assert got["skips"] == [(False, True), (True, True), (False, True)] and got["skipped"] == 1
        assert got["finite"] and got["max_err"] < 1e-12


def test_fsdp2_guard_sees_a_nan_accumulated_from_an_earlier_micro_batch(hunt):
    """The FSDP2 guard decided on the last backward's reduce-scatter only: the NaN of the first micro-batch, kept
    in the accumulated gradient shards, was applied to the weights of every rank."""
    for got in _per_rank(hunt, "check_fsdp2_accumulation"):
        assert got["skips"] == [True, False, False]
        assert {rank for rank, _ in got["bad"][0]} == {1} and got["bad"][1:] == [[], []]
        assert got["finite"] and got["max_err"] < 1e-12


def test_ddp_guard_names_only_the_rank_whose_nan_the_gradients_accumulated(hunt):
    for got in _per_rank(hunt, "check_ddp_accumulation_names_the_origin"):
        assert got["skips"] == [True, False, False]
        assert got["bad"] == [[1], [1], [], [], [], []], got["bad"]
        assert got["max_err"] < 1e-12


def test_ddp_guard_under_join_with_uneven_inputs(hunt):
    r0, r1 = _per_rank(hunt, "check_ddp_join_uneven_inputs")
    ref = _reference(2, [[0], [1]])
    for kind in ("default", "static_graph"):
        assert r0[kind]["skips"] == [False, False] and r1[kind]["skips"] == [False, False, True], kind
        for got in (r0, r1):  # rank 1's NaN step skipped: both end as the two finite steps left them
            assert max(float((p - r).abs().max()) for p, r in zip(got[kind]["params"], ref, strict=True)) < 1e-12


def test_strong_zeros_under_fsdp2_without_resharding(hunt):
    for got in _per_rank(hunt, "check_fsdp2_no_reshard_strong_zeros"):
        assert got["finite"] and got["max_err"] < 1e-12


@pytest.mark.parametrize("case", ["trace-no_sync", "trace-sync", "watch-no_sync", "watch-sync"])
def test_a_rank_is_not_told_it_received_its_own_accumulated_nan(hunt, case):
    """Rank 1's NaN in micro-batch 0, accumulated into micro-batch 1's all-reduced gradients: the trace took
    rank 1's own NaN, still in its .grad when the collective's backward ended, for a receipt ("ranks 0,1
    received it"), and counted rank 0's receipt again at micro-batch 1."""
    r0, r1 = (got[case] for got in _per_rank(hunt, "check_trace_accumulated_micro_batches"))
    [line] = r0["ranks"]
    assert line.startswith("rank 1 introduced the NaN at ") and line.endswith("; rank 0 received it through the "
                                                                              "all-reduce"), line
    assert r1["received"] == []
    first = 1 if case.endswith("no_sync") else 0  # the micro-batch whose all-reduce brought rank 1's NaN in
    assert r0["received"] == [(first, r0["seen"][first], 1)], r0


@pytest.mark.parametrize("check", ["check_fsdp2_watch", "check_fsdp2_watch_no_sync",
                                   "check_fsdp2_watch_partly_sharded"])
def test_watch_under_fsdp2_names_the_nan_step_and_its_parameters(watch_fsdp2, check):
    """gw.watch() checked the .grad of the graph's leaves, FSDP2's unsharded parameters, whose gradients FSDP
    reduce-scatters into the sharded parameters and sets to None: a NaN step gave an empty report on every rank.
    Without gradient sync the unsharded .grad kept rank 1's NaN, and the watch's replay of that step crashed rank 1
    (SIGSEGV), then hung rank 0. Now each rank checks its own part (its shards: no collective) and reports the step
    and the parameters without replaying it. Then it traces the next steps in full (their gradients stay exact): started
    after that unreplayed step, the trace recorded step 2's ops as step 1's, so that step 2's genuine NaN (rank 1's
    ``x[0, 0] = nan``) read as a second birth of step 1 at an aten.copy_."""
    for got in _per_rank(watch_fsdp2, check):
        expected = got["expected"]
        if not expected:  # (no_sync: rank 0's own gradients are finite and were never reduced)
            assert got["empty"], got
            continue
        unexplained = [f for f in got["findings"] if f[3] == "backward"]
        assert [(f[0], f[1]) for f in unexplained] == [(1, "nan")], got["findings"]
        assert unexplained[0][4] == sum(expected.values()) and unexplained[0][5] == sorted(expected), (got, expected)
        note = got["notes"][0]
        assert note.startswith("gw.watch(): the first non-finite gradient came at step 1; that step could not be "
                               "explained (under FSDP2 (fully_shard) its backward cannot run again"), note
        for name, n in expected.items():
            assert f"{name} (NaN, {n} of this rank's elements)" in note, (note, expected)
        # step 2, traced: rank 1's data holds a NaN the loss reads (born where _data writes it), reaching the
        # parameters whose plain gradient on such data is NaN; rank 0 only receives it through the reduce-scatter,
        # which the trace does not name (distributed.md)
        traced = [f for f in got["findings"] if f[3] != "backward"]
        assert traced == ([(2, "nan", "aten.copy_", "aten.copy_", 1, sorted(got["names"]))] if got["rank"] == 1
                          else []), got["findings"]
        assert ", and the following steps were traced in full" in note, note
        assert got["err"] is None or got["err"] < 1e-12, got["err"]


def test_watch_under_fsdp2_finite_steps_report_nothing(watch_fsdp2):
    for got in _per_rank(watch_fsdp2, "check_fsdp2_watch_finite"):
        assert got["empty"] and got["findings"] == [] and got["notes"] == [], got
        assert got["err"] < 1e-12


def test_watch_under_fsdp2_tells_gradients_held_before_the_block(watch_fsdp2):
    """Sharded gradients NaN before the block (not zeroed): the first backward in it is where the watch sees them,
    and the note says that they were there before it (the leaves' .grad, which the watch compares, showed None)."""
    for got in _per_rank(watch_fsdp2, "check_fsdp2_watch_not_zeroed"):
        assert got["findings"] == [(0, "nan", "backward")], got
        note = got["notes"][0]
        assert note.startswith("gw.watch(): the first non-finite gradient came at step 0"), note
        assert note.count("; held before the block, not zeroed)") == note.count(" of this rank's elements") > 0, note
