"""A strong-zero pass whose nodes run on another autograd engine thread.

The engine runs a backward's nodes off the calling thread in two places: CUDA's device threads run every CUDA
node of every backward, and a reentrant backward nested deeper than 60 runs on a pool thread. It carries the
dispatch mode stack there, not gradwise's per-thread state (strong zeros on, the outputs finite, create_graph),
whose defaults there said "outputs finite": a NaN output's exp(-inf) zero was taken for structural, a genuine
NaN gradient hidden. CI has no GPU; the pool thread is the same mechanism on the CPU: each program here runs at
the bottom of a chain of custom Functions whose backwards call ``torch.autograd.grad``, shallow (the calling
thread) and 70 deep (a pool thread). References are independent of gradwise: plain PyTorch where the NaN is
genuine, the program with the unused values deleted where it is contamination.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
import torch

import gradwise as gw

inf, nan = float("inf"), float("nan")


class _Chain(torch.autograd.Function):
    """Identity whose backward differentiates the next link with torch.autograd.grad; the last link's backward
    returns ``bottom(x)`` (the gradient of the program under test) times the incoming sensitivity."""

    @staticmethod
    def forward(ctx, x, depth, bottom, threads):
        ctx.save_for_backward(x)
        ctx.depth, ctx.bottom, ctx.threads = depth, bottom, threads
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xi = x.detach().requires_grad_()
            if ctx.depth == 0:  # where the program's backward is called, and where its nodes run
                ctx.threads.append(threading.get_ident())
                xi.register_hook(lambda gx: ctx.threads.append(threading.get_ident()))
                return ctx.bottom(xi) * g, None, None, None
            (gx,) = torch.autograd.grad(_Chain.apply(xi, ctx.depth - 1, ctx.bottom, ctx.threads), xi, g)
        return gx, None, None, None


def _at_depth(depth: int, bottom: Callable, x: torch.Tensor, strong: bool) -> tuple[torch.Tensor, tuple]:
    """The gradient ``bottom`` computes, reached through ``depth`` nested backwards, and whether its backward was
    called, and whether its nodes ran, on a thread other than this one."""
    threads: list[int] = []
    leaf = x.clone().requires_grad_()
    out = _Chain.apply(leaf, depth, bottom, threads).sum()
    if strong:
        with gw.strong_zeros():
            out.backward()
    else:
        out.backward()
    here = threading.get_ident()
    return leaf.grad, (threads[0] != here, threads[-1] != here)


def _genuine_exp(x):
    """exp(-inf) = 0 times inf: the output is NaN, so is its gradient (genuine)."""
    (g,) = torch.autograd.grad((torch.exp(x) * torch.tensor([inf, 1.0])).sum(), x)
    return g


def _sliced_exp(x):
    """The NaN weight multiplies an element the slice discards: contamination."""
    (g,) = torch.autograd.grad((torch.exp(x) * torch.tensor([nan, 1.0]))[1:].sum(), x)
    return g


def _sliced_exp_deleted(x):
    (g,) = torch.autograd.grad((torch.exp(x[1:]) * torch.tensor([1.0])).sum(), x)
    return g


def _double_sqrt(x):
    """create_graph: sqrt(-1) is discarded by the slice; the second derivative too."""
    (g,) = torch.autograd.grad(x.sqrt()[1:].sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    return gg


def _double_sqrt_deleted(x):
    (g,) = torch.autograd.grad(x[1:].sqrt().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    return gg


def _softmax_genuine(x):
    """A softmax weight exp(-inf) = 0 against an inf: the output is NaN (genuine)."""
    (g,) = torch.autograd.grad((torch.softmax(x, 0) * torch.tensor([inf, 1.0, 2.0])).sum(), x)
    return g


def _sliced_genuine_exp(x):
    """Both at once (the pass runs: the slice makes zeros): exp(-inf) x inf reaches the output, the NaN weight of
    the last element does not."""
    (g,) = torch.autograd.grad((torch.exp(x) * torch.tensor([inf, 1.0, nan]))[:2].sum(), x)
    return g


def _sliced_genuine_exp_deleted(x):
    (g,) = torch.autograd.grad((torch.exp(x[:2]) * torch.tensor([inf, 1.0])).sum(), x)
    return g


# name -> (program, reference, x)
CASES = {
    "genuine exp(-inf) x inf": (_genuine_exp, _genuine_exp, torch.tensor([-inf, 0.0])),
    "genuine softmax weight 0 x inf": (_softmax_genuine, _softmax_genuine, torch.tensor([-inf, 0.0, 1.0])),
    "genuine exp(-inf) x inf beside a NaN sliced away": (_sliced_genuine_exp, _sliced_genuine_exp_deleted,
                                                         torch.tensor([-inf, 0.0, 1.0])),
    "contamination: a slice discards exp x NaN": (_sliced_exp, _sliced_exp_deleted, torch.tensor([-inf, 0.0])),
    "contamination, create_graph: sqrt(-1) sliced away": (_double_sqrt, _double_sqrt_deleted,
                                                         torch.tensor([-1.0, 4.0])),
}


# depth -> (the program's backward called off this thread, its nodes run off this thread): the engine sends a
# reentrant backward past depth 60 to a pool thread, which runs the deeper ones itself
DEPTHS = {3: (False, False), 60: (False, True), 70: (True, True)}


@pytest.mark.parametrize("depth", list(DEPTHS), ids=["calling thread", "nodes on a pool thread (as CUDA's)",
                                                     "called and run on a pool thread"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_pass_gives_the_same_gradients_on_every_engine_thread(name, depth):
    program, reference, x = CASES[name]
    got, elsewhere = _at_depth(depth, program, x, strong=True)
    assert elsewhere == DEPTHS[depth]  # (the engine's reentrant limit: the case tests what it says)
    expected, _ = _at_depth(depth, reference, x, strong=False)
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("depth", [60, 70], ids=["nodes on a pool thread (as CUDA's)",
                                                 "called and run on a pool thread"])
def test_a_compiled_backward_on_another_engine_thread_runs_with_the_pass(depth):
    """A torch.compile'd function's backward run by another engine thread: its compiled variant with the
    strong-zero pass is switched in per thread (``_compile._PerThread``), and must be the one that runs there."""
    f = torch.compile(lambda v: (v.exp() * torch.tensor([nan, 1.0, 2.0]))[1:].sum(), backend="aot_eager")

    def program(x):
        (g,) = torch.autograd.grad(f(x), x)
        return g

    def deleted(x):
        (g,) = torch.autograd.grad((x[1:].exp() * torch.tensor([1.0, 2.0])).sum(), x)
        return g

    x = torch.tensor([0.0, 1.0, 2.0])
    got, elsewhere = _at_depth(depth, program, x, strong=True)
    assert elsewhere == DEPTHS[depth]
    expected, _ = _at_depth(3, deleted, x, strong=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _count_dispatches(monkeypatch) -> list[int]:
    """[how many ops the strong-zero modes have seen], counted from now on."""
    from gradwise._strong_zeros._mode import _StrongZeroMode

    seen = [0]
    dispatch = _StrongZeroMode.__torch_dispatch__

    def counted(self, func, types, args=(), kwargs=None):
        seen[0] += 1
        return dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(_StrongZeroMode, "__torch_dispatch__", counted)
    return seen


def test_nested_passes_under_a_trace_each_run_their_own_rules_once(monkeypatch):
    """A backward started inside a strong pass (a custom backward's torch.autograd.grad) runs as its own pass,
    outside the outer pass's mode. Under gw.trace() the trace's recorder sits on top of that mode, and the outer
    mode stayed on the stack below the nested one: every op of the nested pass's rules ran through the outer
    pass's rules again, one more layer per level (depth 10: 33 s, ~2.3x per level; ~51,000 dispatches at depth
    7). Counted here: the ops the strong-zero modes see grow with the depth, not exponentially."""
    seen = _count_dispatches(monkeypatch)
    program, reference, x = CASES["contamination: a slice discards exp x NaN"]
    counts = {}
    for depth in (4, 8):
        seen[0] = 0
        with gw.trace():
            got, _ = _at_depth(depth, program, x, strong=True)
        expected, _ = _at_depth(depth, reference, x, strong=False)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        counts[depth] = seen[0]
    assert counts[8] <= 3 * counts[4], counts


def _kinds(report) -> dict:
    """Elements per finding kind (how findings are grouped may differ with the thread; what they count may not)."""
    totals: dict = {}
    for f in report.findings:
        totals[f.kind] = totals.get(f.kind, 0) + f.count
    return totals


@pytest.fixture
def deep_stack():
    """A trace adds Python frames to each nested backward: 60 of them need more than the default 1000."""
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(6000)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.parametrize("strong", [False, True], ids=["trace", "trace and strong zeros"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_trace_tells_the_same_on_every_engine_thread(name, strong, deep_stack):
    """Under gw.trace() (and with gw.strong_zeros() inside it): the same gradients and the same findings when the
    program's backward runs on another engine thread. The trace's wrapper of torch.autograd.grad called there
    found no tracer of that thread (the findings of a contamination became 'NaN' of unknown birth), and a
    strong-zero mode entered again there by PyTorch took that thread's state for the pass's (a genuine NaN
    hidden)."""
    import warnings

    program, _, x = CASES[name]
    got = {}
    for depth in DEPTHS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (what a report warns of is the same at every depth: compared below)
            with gw.trace() as report:
                grad, _ = _at_depth(depth, program, x, strong=strong)
        got[depth] = (grad, _kinds(report))
    for depth in DEPTHS:
        torch.testing.assert_close(got[depth][0], got[3][0], equal_nan=True, rtol=0, atol=0)
        assert got[depth][1] == got[3][1], (depth, got[depth][1], got[3][1])


def _nested_checkpoints(depth: int, bottom: Callable, x: torch.Tensor) -> torch.Tensor:
    """``bottom(x)`` inside ``depth`` nested reentrant checkpoints: their backwards nest as deep (a pool thread
    past 60), and a trace's shadow stays valid through them (their recomputed forwards are passed over)."""
    from torch.utils.checkpoint import checkpoint

    if depth == 0:
        return bottom(x)
    return checkpoint(lambda v: _nested_checkpoints(depth - 1, bottom, v) * 1.0, x, use_reentrant=True)


@pytest.mark.parametrize("depth", [3, 70], ids=["calling thread", "nodes on a pool thread (as CUDA's)"])
def test_a_traces_shadow_on_another_engine_thread_keeps_the_outputs_it_was_given(depth, deep_stack):
    """The trace's shadow (the strong-zero pass beside a traced backward) sets 'outputs finite' on the thread
    that runs each op and then enters its mode; its mode, made on the calling thread, set that thread's state
    over it on the pool thread ('outputs finite': exp(-inf) = 0 taken for structural), so a genuine
    exp(-inf) x inf was told as contamination (2 elements where 1 is). Reference: the elements whose plain
    gradient is non-finite and finite in the program with the unused values deleted."""
    import warnings

    weights = torch.tensor([inf, 1.0, nan])
    x = torch.tensor([-inf, 0.0, 1.0], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the report's warnings: what it counts is compared below)
        with gw.trace() as report:
            _nested_checkpoints(depth, lambda v: (v.exp() * weights)[:2], leaf).sum().backward()
    deleted = x.clone().requires_grad_()
    (deleted.exp()[:2] * weights[:2]).sum().backward()
    contamination = int((~leaf.grad.isfinite() & deleted.grad.isfinite()).sum())
    assert contamination == 1
    assert _kinds(report).get("contamination", 0) == contamination, _kinds(report)


class _UserChain(_Chain):
    """A _Chain whose backward runs under a user's dispatch mode of its own (entered inside the backward, above
    the strong-zero pass's mode)."""

    @staticmethod
    def backward(ctx, g):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Passing(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        n = torch._C._len_torch_dispatch_stack()
        with Passing():
            got = _Chain.backward(ctx, g)
        assert torch._C._len_torch_dispatch_stack() == n
        return got


@pytest.mark.parametrize("traced", [False, True], ids=["strong zeros", "strong zeros under a trace"])
def test_nested_passes_under_a_users_mode_each_run_their_own_rules_once(traced, monkeypatch):
    """As above, with a user's dispatch mode entered inside each custom backward around its torch.autograd.grad:
    the outer pass's mode sat below it and was not taken off, so every op of the nested pass's rules ran through
    the outer pass's rules again (~2x per level: 9 levels 165,000 dispatches, 20 s, with or without a trace)."""
    seen = _count_dispatches(monkeypatch)
    monkeypatch.setattr(_Chain, "apply", _UserChain.apply)
    program, reference, x = CASES["genuine exp(-inf) x inf beside a NaN sliced away"]
    counts = {}
    for depth in (4, 8):
        seen[0] = 0
        n = torch._C._len_torch_dispatch_stack()
        with gw.trace() if traced else contextlib.nullcontext():
            got, _ = _at_depth(depth, program, x, strong=True)
        assert torch._C._len_torch_dispatch_stack() == n
        expected, _ = _at_depth(depth, reference, x, strong=False)
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
        counts[depth] = seen[0]
    assert counts[8] <= 3 * counts[4], counts


def test_a_compiled_graphs_mask_read_between_ops_takes_the_passs_outputs_finite():
    """A compiled backward run op by op reads ``outputs_finite`` between ops (``_graph_forms._mask_again``: a
    formula's saved mask is meaningful only where True while the outputs are not finite), outside the mode's
    handler, so on another engine thread it read that thread's default ("finite") and took a NaN's False for a
    decided one. Simulated as the engine does it: the pass's mode, made on this thread with non-finite outputs,
    on another thread's dispatch stack."""
    import threading

    from gradwise._strong_zeros._graph_forms import _mask_again
    from gradwise._strong_zeros._mode import _StrongZeroMode
    from gradwise._strong_zeros._supports import _STATE

    before = _STATE.outputs_finite
    _STATE.outputs_finite = False
    try:
        mode = _StrongZeroMode()
    finally:
        _STATE.outputs_finite = before
    mask = torch.tensor([True, False, True])
    got: list = []

    def elsewhere():
        with mode:
            got.append(_mask_again(mask))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert got and got[0] in mode.supports.selections  # meaningful only where True (recorded with its mask)


# -- the nonsmooth calls, made at the bottom of the chain -----------------------------------------------------


def _kinky(x):
    return (torch.relu(x) - torch.relu(-x)).sum() + torch.maximum(x, -2 * x).sum() + x.abs().amax()


_X0, _D0 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64)

NONSMOOTH_CALLS = {  # name -> what the call tells, as plain values
    "directional_derivative": lambda x: float(gw.directional_derivative(_kinky, x, _D0)),
    "generalized_grad": lambda x: gw.generalized_grad(_kinky, x, seed=1)[0].tolist(),
    "subdifferential": lambda x: sorted(tuple(e[0].tolist()) for e in gw.subdifferential(_kinky, x).elements),
    "stationarity": lambda x: (lambda c: (c.stationary, c.min_norm, [k.op for k in c.kinks]))(
        gw.stationarity(_kinky, x)),
    "gradcheck": lambda x: str(gw.gradcheck(_kinky, (x.requires_grad_(),), raise_exception=False)),
    "generalized_grad through a gradient penalty": lambda x: gw.generalized_grad(_penalised, x, seed=1)[0].tolist(),
}


def _penalised(x):
    (g,) = torch.autograd.grad((x**3).sum() / 3, x, create_graph=True)
    return (g.abs() + torch.relu(x)).sum()


@pytest.mark.parametrize("depth", [60, 70], ids=["nodes on a pool thread (as CUDA's)",
                                                 "called and run on a pool thread"])
@pytest.mark.parametrize("name", list(NONSMOOTH_CALLS))
def test_the_nonsmooth_calls_tell_the_same_on_every_engine_thread(name, depth):
    """Session 30: gw's nonsmooth calls made inside a backward whose nodes (gradwise's own reverse pass, the one
    f runs inside) run on a pool thread, or made from it: their per-thread state (open passes, lazy tangents, the
    call's random state) is set on the thread that makes the call, and every value and kink is the same as on
    the calling thread. Reference: the same call at depth 3 (a regression guard; no defect was found)."""
    told: dict[int, object] = {}
    for at in (3, depth):
        def bottom(xi, at=at):
            told[at] = NONSMOOTH_CALLS[name](xi.detach().clone())
            return torch.zeros_like(xi)
        _, elsewhere = _at_depth(at, bottom, _X0, strong=False)
        assert elsewhere[0] == DEPTHS[at][0]  # (at 60 the reverse passes the call runs nest one deeper: the pool's)
    assert told[depth] == told[3]
