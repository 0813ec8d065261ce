"""Review of the distributed guard (gloo, 2 CPU processes): the guard's verdict and its naming of the rank that
brought a NaN in must hold for every ordering of the program's collectives and gradient zeroing.

The ground truth is built into each scenario: which rank's batch holds a NaN the loss reads, and which .grad holds
NaN before the all-reduce (read on each rank, plain PyTorch).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradwise as gw
from test_distributed import _data, _loss, _model, _Net, _per_rank, _run_group, pytestmark  # noqa: F401


def _batch(rank: int, step: int, nan_rank: int | None) -> torch.Tensor:
    x = _data(rank, step, padding=False)
    if rank == nan_rank:
        x[0, 0] = float("nan")  # a row the loss reads: every gradient of this rank is NaN
    return x


def check_zero_grad_after_forward(rank, world):
    """``loss = model(x); opt.zero_grad(); loss.backward()`` (zero_grad between forward and backward). Step 0:
    rank 1's NaN, skipped. Step 1: the gradients were zeroed before its backward, and rank 0's batch holds a NaN:
    rank 0 brought this one in."""
    ddp = DDP(_model())
    guard = gw.nonfinite_guard(ddp, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
    bad = []
    for step, nan_rank in ((0, 1), (1, 0)):
        loss = _loss(ddp, _batch(rank, step, nan_rank))
        opt.zero_grad()
        loss.backward()
        bad.append((guard.should_skip(), sorted({r for r, _ in guard.bad})))
        opt.step()
    return bad


def check_no_sync_after_nan_step(rank, world):
    """Step 0: rank 1's NaN, skipped, gradients zeroed. Step 1: micro-batch 0 under no_sync() holds a NaN on rank 0
    (only rank 0's .grad holds NaN before the synchronised micro-batch 1, which is finite)."""
    import contextlib

    ddp = DDP(_model())
    guard = gw.nonfinite_guard(ddp, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
    out = {"bad": [], "held": []}
    opt.zero_grad()
    _loss(ddp, _batch(rank, 0, 1)).backward()
    out["bad"].append((guard.should_skip(), sorted({r for r, _ in guard.bad})))
    opt.step()
    opt.zero_grad()
    for micro in (0, 1):
        with ddp.no_sync() if micro == 0 else contextlib.nullcontext():
            _loss(ddp, _batch(rank, 1 + micro, 0 if micro == 0 else None)).backward()
        if micro == 0:  # the ground truth: which rank's .grad holds NaN before the all-reduce
            out["held"] = any(not bool(p.grad.isfinite().all()) for p in ddp.parameters())
    out["bad"].append((guard.should_skip(), sorted({r for r, _ in guard.bad})))
    return out


def check_join_find_unused(rank, world):
    """DDP.join() with find_unused_parameters=True: rank 1 has one batch more, with a NaN the loss reads. The
    joined rank 0 shadows the bucket all-reduces, the decision's all-reduce and the unused-parameter map's
    all-reduce, which must come in the order rank 1's backward runs them."""
    ddp = DDP(_model(_Net, unused=True), find_unused_parameters=True)
    guard = gw.nonfinite_guard(ddp, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.SGD(ddp.parameters(), lr=0.1), guard)
    skips = []
    with ddp.join():
        for step in range(2 + rank):
            opt.zero_grad()
            _loss(ddp, _batch(rank, step, 1 if step == 2 else None)).backward()
            opt.step()
            skips.append(guard.should_skip())
    return {"skips": skips, "finite": all(bool(p.isfinite().all()) for p in ddp.parameters())}


def check_lbfgs_later_evaluation(rank, world):
    """LBFGS under policy "skip": the closure's second evaluation (LBFGS's own) holds rank 1's NaN."""
    ddp = DDP(_model())
    guard = gw.nonfinite_guard(ddp, policy="skip")
    opt = gw.SkipNonfiniteStep(torch.optim.LBFGS(ddp.parameters(), lr=0.1, max_iter=3), guard)
    calls = [0]

    def closure():
        opt.zero_grad()
        calls[0] += 1
        loss = _loss(ddp, _batch(rank, 0, 1 if calls[0] == 2 else None))
        loss.backward()
        return loss

    opt.step(closure)
    return {"flagged": guard.should_skip(), "finite": all(bool(p.isfinite().all()) for p in ddp.parameters())}


CHECKS = {"review2": [check_zero_grad_after_forward, check_no_sync_after_nan_step, check_lbfgs_later_evaluation],
          "join": [check_join_find_unused]}  # its own group: a collective mismatch aborts the processes


@pytest.fixture(scope="module")
def review2(tmp_path_factory):
    return _run_group("review2", 2, tmp_path_factory.mktemp("review2"), timeout=90, module=__name__)


@pytest.fixture(scope="module")
def join(tmp_path_factory):
    return _run_group("join", 2, tmp_path_factory.mktemp("join"), timeout=90, module=__name__)


def test_zero_grad_between_forward_and_backward_names_the_new_rank(review2):
    """The forward pre-hook took the NaN .grad of the skipped step as 'still held' although zero_grad() cleared
    it before the backward: rank 0's new NaN was hidden and rank 1 (the earlier step's) was named."""
    for got in _per_rank(review2, "check_zero_grad_after_forward"):
        assert got == [(True, [1]), (True, [0])], got


def test_a_no_sync_nan_after_a_nan_step_is_named_alike_on_every_rank(review2):
    """The NaN that rank 0's no_sync micro-batch left in its .grad was taken for the earlier step's: rank 0 named
    rank 1 (the earlier step), rank 1 named no rank ('their sum overflowed')."""
    r0, r1 = _per_rank(review2, "check_no_sync_after_nan_step")
    assert r0["held"] and not r1["held"]  # the ground truth: only rank 0 holds NaN before the all-reduce
    for got in (r0, r1):
        assert got["bad"] == [(True, [1]), (True, [0])], got


def test_join_with_find_unused_parameters_and_a_nan_step(join):
    """The joined rank ran the decision's all-reduce from its last bucket's hook, before DDP's join hook shadowed
    the unused-parameter map's all-reduce; rank 1 ran them the other way round: a collective mismatch (gloo
    aborted rank 0, rank 1 crashed)."""
    r0, r1 = _per_rank(join, "check_join_find_unused")
    assert r0["skips"] == [False, False] and r1["skips"] == [False, False, True]
    assert r0["finite"] and r1["finite"]


@pytest.mark.xfail(strict=True, reason="open (documented in docs/distributed.md): an optimizer that evaluates the "
                   "closure again (LBFGS) runs those backwards unguarded; raising there: a design choice")
def test_lbfgs_under_skip_never_applies_a_flagged_nan(review2):
    """The guard flagged the NaN of LBFGS's second closure evaluation (should_skip() is True on every rank), yet
    LBFGS stepped with it: NaN weights on every rank under policy "skip"."""
    for got in _per_rank(review2, "check_lbfgs_later_evaluation"):
        assert got["flagged"]  # the guard saw it
        assert got["finite"], "a flagged NaN step was applied"
