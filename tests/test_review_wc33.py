"""Review of wc33 (session 33): gw.watch()'s fold of its replayed step into a later traced step, and another
thread's backward beside a watched one. Reference: gw.trace() of the same program (one root cause per bug, each at
the step and line it was born)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import gradwise as gw
from gradwise._trace import _session

nan = float("nan")


def _log_then_arrival(block):
    """Step 0: log of a negative (a domain error); steps 1, 2: x arrives with a NaN (log's input is finite)."""
    w = torch.ones(2, requires_grad=True)
    xs = [torch.tensor([-1.0, 2.0]), torch.tensor([nan, 2.0]), torch.tensor([nan, 2.0])]
    with block() as report:
        for s in range(3):
            w.grad = None
            torch.log(xs[s] * w).sum().backward()
    return report


def _log_at_two_lines(block):
    """Step 0: the log at the first line is NaN; steps 1, 2: the log at the second line."""
    w = torch.ones(2, requires_grad=True)
    with block() as report:
        for a, b in [(3.0, 0.0), (0.0, 3.0), (0.0, 3.0)]:
            w.grad = None
            y = w * 2
            p = torch.log(y - a)
            q = torch.log(y - b)
            (p + q).sum().backward()
    return report


def _arrival_then_write(block):
    """x arrives with a NaN (written before the block); from step 1 the program writes x[0] = nan itself."""
    w = torch.ones(3, requires_grad=True)
    x = torch.tensor([1.0, 1.0, 2.0])
    x[0] = nan
    with block() as report:
        for s in range(3):
            w.grad = None
            if s:
                x[0] = nan
            (x * w).sum().backward()
    return report


def _log_then_sqrt(block):
    """Step 0: log of a negative (sqrt of its NaN); later steps: log is finite and negative, sqrt's NaN. The replay
    saw sqrt's saved NaN result: "aten.sqrt or an op before it"."""
    w = torch.ones(2, requires_grad=True)
    with block() as report:
        for a in (3.0, 1.5, 1.5):
            w.grad = None
            torch.sqrt(torch.log(w * 2 - a)).sum().backward()
    return report


@pytest.mark.parametrize("program", [_log_then_arrival, _log_at_two_lines, _arrival_then_write, _log_then_sqrt],
                         ids=["log then arrival", "log at two lines", "arrival then write", "log then sqrt"])
def test_watch_does_not_fold_a_replayed_birth_into_another_later_one(program):
    """SILENT (two bugs told as one): gw.trace() tells two root causes, step 0's and step 1's. wc33 gave a value the
    replay could not name ("aten.sum or an op before it", "x arrived") the birth the trace gave the same value at the
    later traced step, and folded: one finding, "root cause at step 0: x arrived" (x was finite at step 0), "aten.log
    at the second line" (it was the first's), "aten.copy_" (nothing was written at step 0); "aten.sqrt or an op
    before it" was taken for aten.sqrt ("root of 2 negative values" where log made the NaN). The later step's birth
    says nothing of the earlier one's: the replayed finding stays its own."""
    trace, watch = program(gw.trace), program(gw.watch)
    assert len(trace.causes) == 2, str(trace)
    assert len(watch.causes) == 2 and sorted(f.step for f in watch.findings) == [0, 1], str(watch)
    later = [(f.kind, f.op, f.location, f.count, f.born_op) for r in (trace, watch) for f in r.findings if f.step == 1]
    assert later[0] == later[1], later


def test_watch_still_folds_a_replayed_op_its_node_names():
    """What wc33 keeps: ``y / n`` with n = 0 (DivBackward saved y and n: the replay names aten.div) over 3 steps is
    one finding at the division's line from step 0, as gw.trace() tells it (the base told two)."""

    def run(block):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        x, n = torch.randn(4, 3), torch.zeros(())
        with block() as report:
            for _ in range(3):
                m.zero_grad()
                y = m(x)
                z = y / n
                (z * y).sum().backward()
        return report

    told = [[(f.kind, f.op, f.location, f.count, f.born_op, f.step) for f in r.findings] for r in (run(gw.trace),
                                                                                                  run(gw.watch))]
    assert told[0] == told[1] and len(told[0]) == 1, told


def test_watch_checks_a_backward_a_hook_hands_to_a_pool_without_waiting():
    """SILENT (a NaN .grad hidden): a tensor hook of the watched backward submits a backward (NaN .grad of another
    model) to a pool and returns; the watched backward goes on in the engine. The base told it ("not explained"); wc33
    checked another thread's backward only while the watched thread ran Python at that moment, so the watch said
    "No NaN/Inf gradients"."""
    torch.manual_seed(0)
    big = [torch.nn.Linear(256, 256) for _ in range(40)]
    other = torch.nn.Linear(3, 1)
    xo = torch.tensor([[1.0, nan, 2.0]])
    xb = torch.randn(512, 256)
    pool = ThreadPoolExecutor(1)
    for _ in range(5):  # until the pool's backward starts while the watched one runs (a loaded machine)
        other.zero_grad()
        futures, beside = [], []

        def off(beside=beside):
            beside.append(any(w.depth for w in list(_session._WATCHERS.values())))
            other(xo).sum().backward()

        with gw.watch() as report:
            h = xb
            for i, lin in enumerate(big):
                h = torch.tanh(lin(h))
                if i == 37:
                    h.register_hook(lambda g, futures=futures: futures.append(pool.submit(off)))
            h.sum().backward()
            futures[0].result()
        if beside[0]:
            break
    pool.shutdown()
    assert beside[0], "the pool's backward never ran inside the watched one"
    assert not torch.isfinite(other.weight.grad).all()
    assert report.findings, str(report)

