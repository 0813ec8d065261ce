"""Review of wc32 (session 32): gw.watch()'s stale gradients counted by elements, its replay's stop at a thread
a backward hands work to, and the fold of its replayed step. References: gw.trace() of the same program, and
the gradients PyTorch computes without gradwise (bitwise)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.utils.checkpoint as cp

import gradwise as gw

nan = float("nan")


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, h, z):
        return h * self.w + z * self.w


@pytest.mark.parametrize("reentrant", [True, False])
def test_watch_never_calls_a_new_nan_on_a_stale_one_stale(reentrant):
    """SILENT (wc32): a .grad holding NaN at element 0 from before the block, and this step's checkpointed block
    reads data ``z`` with a NaN that lands on element 0 of the same .grad: the count of NaN elements is unchanged,
    and the watch told only "block.w.grad arrived" (a gradient not zeroed), hiding z's genuine NaN (gw.trace():
    z arrived, and the stale .grad). The watch now reads what the backward brings such a .grad: a NaN there is
    this step's, not explained; a finite one (the helper's test) still stale."""
    found = []
    for block_ in (gw.trace, gw.watch):
        block, a = _Scaled(), torch.nn.Parameter(torch.ones(3))
        block.w.grad = torch.tensor([nan, 0.0, 0.0])
        x, z = torch.ones(4, 3), torch.ones(4, 3)
        z[1, 0] = nan
        with block_() as report:
            cp.checkpoint(block, x * a, z, use_reentrant=reentrant).sum().backward()
        found.append([(f.born_op, f.born.split(" ")[0]) for f in report.findings if "block.w" in f.reaches])
    assert ("input", "z") in found[0], found  # (the reference: the trace tells z)
    assert found[1] != [("input", "block.w.grad")], found  # never told as only the stale gradient
    assert found[1] == [("backward", "backward")], found


def test_watch_stale_check_leaves_the_gradients_bitwise():
    """The watch's hook on a stale .grad (it reads what comes, returns nothing) changes no gradient."""
    grads = []
    for block_ in (None, gw.watch):
        torch.manual_seed(0)
        block, a = _Scaled(), torch.nn.Parameter(torch.randn(3))
        block.w.data = torch.randn(3)
        block.w.grad = torch.tensor([nan, 0.25, -1.5])
        x, z = torch.randn(4, 3), torch.randn(4, 3)
        with block_() if block_ is not None else contextlib.nullcontext():
            cp.checkpoint(block, x * a, z, use_reentrant=False).sum().backward()
        grads.append((block.w.grad.clone(), a.grad.clone()))
    assert all(torch.equal(p.nan_to_num(7.0), q.nan_to_num(7.0)) and torch.equal(p.isnan(), q.isnan())
               for p, q in zip(grads[0], grads[1], strict=True)), grads
    assert not block.w._backward_hooks, block.w._backward_hooks  # (removed after the backward)


_POOL = ThreadPoolExecutor(max_workers=1)


def test_watch_replay_never_runs_a_pools_backward_twice():
    """SILENT (wc32): a custom backward that runs a backward on a thread pool's thread (already started: no
    threading.Thread.start in the replay): wc32 now checks that thread's leaves, found block.weight's NaN, and its
    replay ran the pool's backward a second time: block.bias.grad doubled (8 where PyTorch gives 4). The replay
    now stops where a backward hands work to a pool (ThreadPoolExecutor.submit)."""
    torch.manual_seed(0)
    lin2, block = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)

    class OnPool(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            ctx.save_for_backward(h)
            return h * 2

        @staticmethod
        def backward(ctx, g):
            (h,) = ctx.saved_tensors

            def run():
                with torch.enable_grad():
                    block(h.detach()).sum().backward()

            _POOL.submit(run).result()
            return g * 2

    _POOL.submit(lambda: None).result()  # (its thread runs before the step)
    grads = []
    for block_ in (None, gw.watch):
        for p in (*lin2.parameters(), *block.parameters()):
            p.grad = None
        h = torch.where(torch.arange(4)[:, None] >= 2, nan, lin2(x))
        with block_() if block_ is not None else contextlib.nullcontext() as report:
            OnPool.apply(h)[:2].sum().backward()
        grads.append(block.bias.grad.clone())
    assert torch.equal(grads[0], grads[1]), grads
    assert [(f.born_op, f.reaches) for f in report.findings] == [("backward", ["block.weight"])], str(report)
    assert "ThreadPoolExecutor.submit" in report.notes[0], report.notes


def test_watch_replays_a_step_that_starts_gradwises_own_helper_thread():
    """wc32 stopped the replay at any threading.Thread.start inside a backward, gradwise's own too: the complex
    lstsq's backward runs pinv on gradwise's helper thread (`_modes._without_modes`), started at its first use,
    and the step was "not explained" (the base: v's NaN, an input). Run in a fresh process (the helper thread
    starts once)."""
    code = """
import torch, gradwise as gw
torch.manual_seed(0)
A = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
B = torch.randn(4, 2, dtype=torch.complex64)
v = torch.ones(3, 2); v[0, 0] = float('nan')
with gw.watch() as r:
    X = torch.linalg.lstsq(A, B).solution
    (X.abs() * v).sum().backward()
print([(f.born_op, f.reaches) for f in r.findings], 'explained from its backward' in r.notes[0])
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gw.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "[('input', ['A'])] True", out.stdout + out.stderr


def test_watch_does_not_fold_two_sites_of_the_same_op():
    """SILENT-adjacent (review_wc32): wc32's fold of the replayed step told step 0's sqrt (one line) and steps 1-2's
    sqrt (another line) as one finding at the later line, first at step 0; the step-0 line was never named. The
    replay cannot tell sites apart, so nothing is folded (as gw.trace(): two findings, two root causes)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    got = []
    for block in (gw.trace, gw.watch):
        with block() as report:
            for step in range(3):
                m.zero_grad()
                y = m(x)
                if step == 0:
                    loss = torch.sqrt(y[:, 0] - 100).sum()
                else:
                    loss = torch.sqrt(y[:, 1] - 100).sum()
                loss.backward()
        got.append((len(report.findings), len(report.causes)))
    assert got[0] == (2, 2), got
    assert got[1] == (2, 2), got


def test_watch_tells_data_a_list_holds_as_arrived():
    """wc32 told a value no variable, batch, parameter or buffer holds as born at "an op outside the autograd
    graph": the program's own batches in a list (no DataLoader), ``(data[0] * w)``, were no longer data that
    arrived (gw.trace(): "tensor[3] arrived"). An item of a small list or tuple a frame holds is data again; the
    value nothing holds (log(x) inline) stays off the graph."""
    w = torch.nn.Parameter(torch.ones(3))
    data = [torch.tensor([1.0, nan, 2.0])]
    found = []
    for block_ in (gw.trace, gw.watch):
        w.grad = None
        with block_() as report:
            (data[0] * w).sum().backward()
        found.append([f.born_op for f in report.findings])
    assert found == [["input"], ["input"]], found
    assert report.findings[0].born.startswith("data[0] arrived"), report.findings[0].born
    w.grad = None
    x = torch.tensor([1.0, 0.0, 2.0])
    with gw.watch() as report:
        (torch.log(x) * w).sum().backward()
    assert [f.born_op for f in report.findings] == ["an op outside the autograd graph"], str(report)
