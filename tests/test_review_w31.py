"""Review (session 31) of gw.watch()'s nested backwards (wc31): the reference is gw.trace() of the same step, and
the gradients PyTorch computes without gradwise (bitwise)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.utils.checkpoint as cp

import gradwise as gw

nan = float("nan")
_PAD = torch.tensor([False, False, True, True])[:, None]


class _InnerBackward(torch.autograd.Function):
    """Identity whose backward runs a backward of its own on ``block`` (``inputs``: None or [block.weight])."""

    @staticmethod
    def forward(ctx, h, block, inputs):
        ctx.save_for_backward(h)
        ctx.block, ctx.inputs = block, inputs
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        with torch.enable_grad():
            out = ctx.block(h.detach())[:2].sum()
            torch.autograd.backward(out, inputs=None if ctx.inputs is None else [ctx.block.weight])
        return g, None, None


def _case(name):
    """(step, parameters, the leaf whose .grad only holds the NaN): padding rows NaN before a nested backward's
    block, sliced away after it (contamination of that leaf only)."""
    torch.manual_seed(0)
    lin2, block, scale = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Parameter(torch.ones(()))
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(4, 3)

    def step():
        h = torch.where(_PAD, nan, lin2(x))
        if name == "reentrant, a plain tensor leaf":
            y = cp.checkpoint(lambda h: h @ w, h, use_reentrant=True)
        else:
            y = _InnerBackward.apply(h, block, [0] if name == "custom backward(inputs=)" else None)
        return (y[:2] * scale).sum()

    return step, [*lin2.parameters(), *block.parameters(), scale, w], \
        w if name == "reentrant, a plain tensor leaf" else block.weight


@pytest.mark.parametrize("name", ["reentrant, a plain tensor leaf", "custom backward(inputs=)",
                                  "custom backward"])
def test_watch_checks_leaves_of_a_nested_backward(name):
    """SILENT (the first two): the watch recorded a nested backward's leaves only without ``inputs=`` and only
    Parameters: a tensor leaf a reentrant checkpoint's block holds (``h @ w``), or a custom Function's backward
    running ``torch.autograd.backward(out, inputs=[block.weight])``, got a NaN gradient and the watch said "No
    NaN/Inf gradients" (gw.trace(): contamination reaching it). The third (no ``inputs=``) was replayed: the
    replay ran the inner backward again (see the next test) and told "1 genuine NaN" born at an "input". Now each
    is one finding not explained, reaching that leaf."""
    step, params, leaf = _case(name)
    with gw.trace() as traced:
        step().backward()
    name_ = traced.findings[0].reaches
    assert [f.kind for f in traced.findings] == ["contamination"]
    for p in params:
        p.grad = None
    with gw.watch() as report:
        step().backward()
    assert not leaf.grad.isfinite().all()
    assert [(f.kind, f.born_op, f.reaches) for f in report.findings] == [("nan", "backward", name_)], str(report)
    assert ", 0 genuine NaN," in report.summary() and "1 not explained" in report.summary()


def test_watch_replay_does_not_run_a_nested_backward_again():
    """SILENT wrong number (on the base too): a custom Function's backward that runs torch.autograd.backward of its
    own, in a step whose outer loss is NaN: the watch's replay ran that inner backward a second time, which added
    to block.bias.grad again: 8 where PyTorch gives 4. The replay now stops before that backward runs (as before a
    hook of the user's): the step is not explained, the gradients are PyTorch's."""
    torch.manual_seed(0)
    lin2, block, scale = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), torch.nn.Parameter(torch.ones(()))
    x = torch.randn(4, 3)

    def step():
        y = _InnerBackward.apply(lin2(x), block, None)
        return (y * scale).sum() * torch.tensor(nan)

    grads = []
    for block_ in (None, gw.watch):
        for p in (*lin2.parameters(), *block.parameters(), scale):
            p.grad = None
        if block_ is None:
            step().backward()
        else:
            with block_() as report:
                step().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for plain, watched in zip(*grads, strict=True):
        assert torch.equal(plain, watched), (plain, watched)
    assert "a backward of its own" in report.notes[0], report.notes[0]


def test_watch_ignores_a_reentrant_checkpoints_detached_inputs():
    """The checkpoint's own leaves (its detached inputs, whose gradients it hands back) are not checked: the
    gradient of ``h * h`` at NaN padding rows is NaN there, zeroed by the ``where`` before it reaches a
    parameter. gw.trace() has no finding; neither has the watch."""
    torch.manual_seed(0)
    lin2, scale = torch.nn.Linear(3, 3), torch.nn.Parameter(torch.ones(()))
    x = torch.randn(4, 3)

    def step():
        h = torch.where(_PAD, nan, lin2(x))
        return (cp.checkpoint(lambda h: h * h, h, use_reentrant=True)[:2] * scale).sum()

    with gw.trace() as traced:
        step().backward()
    assert not [f for f in traced.findings if f.kind != "contamination" or f.reaches], str(traced)
    with gw.watch() as report:
        step().backward()
    assert not report.findings, str(report)



def test_watch_still_replays_a_custom_backward_that_calls_autograd_grad():
    """The replay stops at a nested torch.autograd.backward only: a custom Function's backward that runs
    torch.autograd.grad (create_graph, no .grad written) is replayed and explained as gw.trace() explains it (a
    NaN input, genuine), not told as not explained. (Fixed in wc32: the replay passed over the custom backward's
    ``h.detach()`` of the saved NaN, whose provenance it knew by storage only, and told the NaN its nested
    autograd.grad read as a second birth, "aten.tanh or an op before it".)"""
    torch.manual_seed(0)
    lin2, scale = torch.nn.Linear(3, 3), torch.nn.Parameter(torch.ones(()))
    x = torch.randn(4, 3)
    x[1, 1] = nan

    class TanhByGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            ctx.save_for_backward(h)
            return torch.tanh(h)

        @staticmethod
        def backward(ctx, g):
            (h,) = ctx.saved_tensors
            with torch.enable_grad():
                hd = h.detach().requires_grad_()
                return torch.autograd.grad(torch.tanh(hd), hd, g, create_graph=True)[0]

    kinds = []
    for block_ in (gw.trace, gw.watch):
        for p in (*lin2.parameters(), scale):
            p.grad = None
        with block_() as report:
            (TanhByGrad.apply(lin2(x)) * scale).sum().backward()
        kinds.append({(f.kind, f.born_op) for f in report.findings})
    assert kinds[0] == kinds[1] == {("nan", "input")}, kinds
    assert "was explained from its backward" in report.notes[0], report.notes[0]


def test_watch_checks_a_nested_backwards_leaves_under_autograd_grad():
    """SILENT: torch.autograd.grad(loss, [lin2.weight]) whose custom Function's backward runs .backward() of its
    own: block.weight.grad NaN (padding rows, 0 x NaN), and the watch checked only what autograd.grad returned:
    "No NaN/Inf gradients" (gw.trace(): contamination reaching block.weight). Now one finding not explained."""
    torch.manual_seed(0)
    lin2, block = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)
    found = []
    for block_ in (gw.trace, gw.watch):
        for p in (*lin2.parameters(), *block.parameters()):
            p.grad = None
        with block_() as report:
            h = torch.where(_PAD, nan, lin2(x))
            torch.autograd.grad(_InnerBackward.apply(h, block, None)[:2].sum(), [lin2.weight])
        assert not block.weight.grad.isfinite().all()
        found.append([(f.kind, f.born_op, f.reaches) for f in report.findings])
    assert found[0] == [("contamination", "aten.scalar_tensor", ["block.weight"])], found
    assert found[1] == [("nan", "backward", ["block.weight"])], found

def test_nested_backward_on_another_thread():
    """SILENT (fixed in wc32): a custom backward that runs a backward on a thread of its own (and joins it): the
    watch and the trace are per thread, block.weight.grad was NaN and both reports were empty. The watch now
    checks that backward's leaves with the running one (and its replay stops where the backward starts a thread,
    which would run the inner backward again); the trace counts it as run untraced."""
    import threading

    torch.manual_seed(0)
    lin2, block = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)

    class OnThread(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            ctx.save_for_backward(h)
            return h.clone()

        @staticmethod
        def backward(ctx, g):
            (h,) = ctx.saved_tensors

            def work():
                with torch.enable_grad():
                    block(h.detach())[:2].sum().backward()

            th = threading.Thread(target=work)
            th.start()
            th.join()
            return g

    grads = []
    for block_ in (None, gw.watch, gw.trace):
        for p in (*lin2.parameters(), *block.parameters()):
            p.grad = None
        with block_() if block_ is not None else contextlib.nullcontext() as report:
            OnThread.apply(torch.where(_PAD, nan, lin2(x)))[:2].sum().backward()
        assert not block.weight.grad.isfinite().all()
        grads.append(block.bias.grad.clone())
        if block_ is gw.watch:  # not explained, reaching block.weight (the replay stops at the thread's start)
            assert [(f.born_op, f.reaches) for f in report.findings] == [("backward", ["block.weight"])], str(report)
            assert "starts a thread" in report.notes[0], report.notes
        elif block_ is gw.trace:  # not examined: never "No NaN/Inf gradients"
            assert report.untraced_backwards == 1 and "another thread" in str(report), str(report)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2]), grads  # (not run twice)
