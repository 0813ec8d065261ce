"""Review (session 31, review_n31) of nest31 (a backward nested in a 'check' pass runs strong and hands its results'
structural zeros to the pass where padding's zeros reach them) and of review_s31's fixes.

The outer programs' NaN is made in a custom backward from finite saved data (_Sqrt's g / (2 sqrt(x)) at x = 0), so
the outer plan is 'check'. References are independent of gradwise: plain PyTorch with the nested backward's result
computed before the pass (a constant there: the same values), float64.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from test_hunt_nest31 import _Sqrt  # sqrt with a hand-written backward g / (2 sqrt(x))

D = torch.float64


_C = [1.0, -1.0, 4.0]


def _aux(h):
    """The gradient of h (unrelated to the outer program) at _C, by a torch.autograd.grad seeded with ones."""
    def run():
        with torch.enable_grad():
            c = torch.tensor(_C, dtype=D, requires_grad=True)
            return torch.autograd.grad(h(c), c)[0]
    return run


AUX = {  # h's structural zero at c[1] (a masked entry; a dropped one)
    "where, finite": _aux(lambda c: torch.where(c > 0, c, 0.0).sum() * 2),
    "where of sqrt (nested plan strong)": _aux(lambda c: torch.where(c > 0, c.sqrt(), 0.0).sum()),
    "index": _aux(lambda c: c[torch.tensor([0, 2])].pow(2).sum()),
    "masked_fill": _aux(lambda c: c.masked_fill(c < 0, 0.0).exp().sum()),
}


def _scaled_by(aux):
    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1.0

        @staticmethod
        def backward(ctx, g):
            return g * aux()

    return Scaled


@pytest.mark.parametrize("name", AUX)
def test_a_nested_grad_of_an_unrelated_function_hands_no_zeros_to_a_check_pass(name):
    """SILENT (nest31): the custom backward scales its sensitivity by the gradient of an unrelated h, whose zero at
    c[1] nest31 handed to the 'check' pass as a structural zero: _Sqrt's 0/0 at w[1] = 0 (w[1] is used by the
    program) gave 0, PyTorch NaN. The base ran it plain (PyTorch's NaN). Now a nested backward in a 'check' pass
    hands zeros only where it is seeded with the custom backward's sensitivity."""
    aux = AUX[name]
    with gw.strong_zeros():
        value = aux()

    def run(fn):
        w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
        return torch.autograd.grad(_scaled_by(fn).apply(_Sqrt.apply(w)).sum(), w)[0]

    ref = run(lambda: value)  # plain PyTorch, the auxiliary gradient a constant
    assert bool(ref[1].isnan()) and bool(ref[[0, 2]].isfinite().all())
    with gw.strong_zeros(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)  # (named: the nested backward handed nothing)
        got = run(aux)
    torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)


def test_the_unseeded_nested_backward_is_named_only_when_the_gradients_end_nonfinite():
    """The nested backward that hands nothing (not seeded with the sensitivity) is named in the pass's
    OpaqueBackwardWarning where the gradients end NaN/Inf, and on finite data nothing is said (PyTorch's bits)."""
    aux = AUX["index"]
    w = torch.tensor([1.0, 2.0, 4.0], dtype=D, requires_grad=True)
    want = torch.autograd.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)[0]
    assert torch.equal(got, want)
    w = torch.tensor([1.0, 0.0, 4.0], dtype=D, requires_grad=True)
    with pytest.warns(gw.OpaqueBackwardWarning, match="nested in ScaledBackward"):
        gw.grad(_scaled_by(aux).apply(_Sqrt.apply(w)).sum(), w)


# -- a plain nested backward inside another nested backward: named by the outermost pass -----------------------------
class _ByRows(torch.autograd.Function):
    """clamp(x @ w, min=0), its backward by a nested torch.autograd.grad: a 0 slope in a zero row of x (a flat region's
    zeros: the nested backward runs plain, and is named if the pass ends NaN/Inf)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.clamp(x @ w, min=0.0)  # (clamp's flat rows are not followed: _flat_rows)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_()
            (out,) = torch.autograd.grad(torch.clamp(xd @ w, min=0.0), xd, g)
        return out, None


_W2 = torch.linspace(0.5, 1.5, 9, dtype=D).reshape(3, 3)


def _reentrant(f):
    return lambda h: torch.utils.checkpoint.checkpoint(f, h, use_reentrant=True)


NESTED_TWICE = {  # (block, the node the warning names)
    "a reentrant checkpoint in one": (_reentrant(lambda t: _reentrant(lambda u: torch.clamp(u @ _W2, min=0.0))(t) * 2),
                                      "CheckpointFunctionBackward"),
    "a nested grad in a reentrant checkpoint": (_reentrant(lambda t: _ByRows.apply(t, _W2) * 2), "_ByRowsBackward"),
}


def _w_grad(block, inp, strong):
    w = (torch.rand(3, 3, dtype=D, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_()
    loss = block(_Sqrt.apply(inp @ w)).sum()
    gw.backward(loss) if strong else loss.backward()
    return w.grad


def _inp():
    return torch.rand(4, 3, dtype=D, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("name", NESTED_TWICE)
def test_a_plain_nested_backward_in_a_nested_one_is_named_when_the_pass_ends_nan(name):
    """The inner backward ran plain (relu's zeros reach its result) inside a nested backward whose results were
    finite; the NaN is made after both, by _Sqrt's 0/0 at the zero rows in the outer pass. nest31 named the inner one
    only to the nested pass, whose results were finite: no warning at all (PyTorch's NaN, unexplained). Now what a
    nested pass could not follow goes on to the pass it is nested in. Finite data: nothing said, PyTorch's bits."""
    block, node = NESTED_TWICE[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        assert torch.equal(_w_grad(block, _inp(), True), _w_grad(block, _inp(), False))
    inp = _inp()
    inp[2:] = 0.0
    want = _w_grad(block, inp, False)
    assert bool(want.isnan().all())
    with pytest.warns(gw.OpaqueBackwardWarning, match=f"nested in {node}"):
        got = _w_grad(block, inp, True)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


# -- the sensitivity read on the engine's pool thread (reentrant depth > 60) ------------------------------------------
class _Id(torch.autograd.Function):
    """x * 1 with a custom backward: each checkpointed level's own graph is a 'check' one."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * 1.0


def _levels(depth):
    if depth == 0:
        return lambda t: 3 * t[:2]
    inner = _levels(depth - 1)
    return _reentrant(lambda t: inner(_Id.apply(t)))


def _stack_depth() -> int:
    frame, n = sys._getframe(), 0
    while frame is not None:
        frame, n = frame.f_back, n + 1
    return n


@pytest.fixture
def deep_stack():
    """Room for 60 reentrant levels on the calling thread (gradwise's hook: ~15 frames a level, PyTorch's ~8)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 2000)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.parametrize("depth", [2, 70])
def test_nested_checkpoints_seeded_by_their_sensitivity_on_the_pool_thread(depth, deep_stack):
    """Reentrant checkpoints nested 70 deep (PyTorch runs the levels past 60 on a pool thread), each level a 'check'
    graph seeded by the level above's sensitivity: the padding rows the innermost slice drops stay structural to the
    outer pass (the program with them deleted), and finite data gives PyTorch's bits."""
    block = _levels(depth)
    want = _w_grad(lambda h: 3 * h, _inp()[:2], strong=False)
    inp = _inp()
    inp[2:] = 0.0
    torch.testing.assert_close(_w_grad(block, inp, True), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(_w_grad(block, _inp(), True), _w_grad(block, _inp(), False))


class _Captured(torch.autograd.Function):
    """3 * x[:2]; its backward differentiates <3 x[:2], g> by a nested grad seeded with ones (g captured, no seed)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return 3 * x[:2]

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            xd = torch.zeros(ctx.shape, dtype=g.dtype, requires_grad=True)
            return torch.autograd.grad((3 * xd[:2] * g).sum(), xd)[0]


def test_a_nested_grad_with_the_sensitivity_captured_keeps_pytorchs_nan_and_says_so():
    """Known limit (review_n31): a nested backward not seeded with the sensitivity (here captured in its graph) cannot
    be told from one of an unrelated function: it hands nothing to a 'check' pass, the padding rows' 0/0 stays
    PyTorch's NaN (not the deleted program's number), and the OpaqueBackwardWarning names it."""
    inp = _inp()
    inp[2:] = 0.0
    want = _w_grad(_Captured.apply, inp, False)
    assert bool(want.isnan().all())
    with pytest.warns(gw.OpaqueBackwardWarning, match="nested in _CapturedBackward"):
        got = _w_grad(_Captured.apply, inp, True)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")
@pytest.mark.xfail(strict=True, raises=RecursionError, reason="pre-existing: each reentrant level's backward runs "
                   "through gradwise's engine hook (_engine_run, _nested, _run_strong, ...), about 15 Python frames "
                   "a level where PyTorch takes 8: 59 levels need ~900 frames, PyTorch's run ~500")
def test_nested_checkpoints_59_deep_need_no_more_stack_than_pytorch():
    block = _levels(59)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 700)
    try:
        want = _w_grad(block, _inp(), False)
        got = _w_grad(block, _inp(), True)
    finally:
        sys.setrecursionlimit(limit)
    assert torch.equal(got, want)
