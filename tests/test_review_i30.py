"""Review (session 30) of integ30: a backward nested in a strong pass hands its results' structural zeros to the
pass (_engine._nested, _export), the FSDP2 guard's decision after FSDP's end-of-backward callback, the trace's
parts ops with the modes off, Logger.getEffectiveLevel never a hook, sparse gradients in the callbacks.

References are independent of gradwise: plain PyTorch in float64 where the path to the gradient compared is finite
(the NaN that makes the pass strong sits in a term of its own), or where the NaN is genuine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import gradwise as gw

nan = float("nan")


def _nested_grad_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.autograd.grad of a function of rows :2 of x alone: rows 2.. are structural zeros of that backward."""
    with torch.enable_grad():
        xd = x.detach().requires_grad_()
        (n,) = torch.autograd.grad((xd[:2] * 3).sum(), xd)
    return n


def _zeros_like_rows(x: torch.Tensor) -> torch.Tensor:
    n = torch.zeros_like(x)  # a backward's own zeros: structural
    n[:2] = 3.0
    return n


def _scaled_by(factor: Callable[[torch.Tensor], torch.Tensor]) -> type[torch.autograd.Function]:
    class Scaled(torch.autograd.Function):
        """Identity whose backward scales the sensitivity by exp(n): exp of a structural zero is 1."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * torch.exp(factor(x))

    return Scaled


def _program(fn: type[torch.autograd.Function], inp: torch.Tensor, w: torch.Tensor, p: torch.Tensor,
             seed_nan: bool) -> torch.Tensor:
    """The custom backward on inp @ w, plus a term whose NaN a slice drops (the pass runs strong)."""
    weights = torch.tensor([1.0, 1.0, 1.0, nan if seed_nan else 1.0], dtype=torch.float64)[:, None]
    return (fn.apply(inp @ w) * weights).sum() + (torch.tensor([1.0, nan], dtype=torch.float64) * p)[:1].sum()


def _w_grad(fn: type[torch.autograd.Function], inp: torch.Tensor, strong: bool, seed_nan: bool = False
            ) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, dtype=torch.float64, requires_grad=True)
    loss = _program(fn, inp, w, p, seed_nan)
    if strong:
        gw.backward(loss)
    else:
        loss.backward()
    return w.grad


FACTORS = {"zeros_like in the backward": _zeros_like_rows, "nested torch.autograd.grad": _nested_grad_rows}


@pytest.mark.parametrize("name", FACTORS)
def test_exp_of_a_structural_zero_is_one_on_a_finite_path(name):
    """exp's rule kept its input's support: g * exp(n) at n's structural zeros was annihilated to 0 (finite weight
    gradient off by 0.74; reached through a nested backward's results since integ30)."""
    inp = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fn = _scaled_by(FACTORS[name])
    assert torch.equal(_w_grad(fn, inp, strong=True), _w_grad(fn, inp, strong=False))


@pytest.mark.parametrize("name", FACTORS)
def test_exp_of_a_structural_zero_keeps_a_genuine_nan(name):
    """The sensitivity of row 3 is NaN (the loss weighs it by NaN) and exp(0) = 1 passes it on to a NaN input row:
    the weight gradient is NaN, as in PyTorch (it was all finite)."""
    inp = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inp[3] = nan
    fn = _scaled_by(FACTORS[name])
    plain = _w_grad(fn, inp, strong=False, seed_nan=True)
    assert bool(plain.isnan().all())
    assert bool(_w_grad(fn, inp, strong=True, seed_nan=True).isnan().all())


class _FuncGradBackward(torch.autograd.Function):
    """A custom backward that computes its input gradient with torch.func.grad (seeds of the transform: wrappers)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x[:2] * 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.func.grad(lambda t: (t[:2] * 3 * g).sum())(x)


def test_torch_func_grad_inside_a_custom_backward_of_a_strong_pass():
    """torch.func.grad called in a custom backward, in a strong pass: the plan's test of the nested backward's
    seeds for the pass's structural zeros read a functorch wrapper's storage and raised NotImplementedError
    ('Cannot access storage of TensorWrapper') from inside gradwise. On a finite path: PyTorch's bits."""
    inp = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def w_grad(strong: bool) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
        p = torch.randn(2, dtype=torch.float64, requires_grad=True)
        loss = _FuncGradBackward.apply(inp @ w).pow(2).sum() + \
            (torch.tensor([1.0, nan], dtype=torch.float64) * p)[:1].sum()
        gw.backward(loss) if strong else loss.backward()
        return w.grad

    assert torch.equal(w_grad(True), w_grad(False))


def test_trace_reads_no_structural_zero_as_lost_under_a_strong_pass():
    """gw.trace() around gw.strong_zeros(): the trace's own check of each backward op's output (a sum and its
    .item()) ran below the trace, in the strong pass's mode. The where's gradient for the branch it never selects
    is all structural zeros: .item() of its sum was taken for structural zeros lost in an op with no rule, and with
    a genuine NaN the pass warned "structural zeros reached aten._local_scalar_dense.default ... the NaN/Inf may
    be contamination". The NaN is genuine (the loss reads x[1, 0] through V): a finding, no such warning."""
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = nan
    never = torch.zeros(4, 3, dtype=torch.bool)
    with gw.trace() as report:
        loss = torch.where(never, torch.tanh(x.nan_to_num() @ w), x @ v).sum()
        with gw.strong_zeros():
            loss.backward()  # (an OpaqueBackwardWarning is an error here)
    assert bool(v.grad.isnan().any()) and bool(w.grad.eq(0).all())
    assert "nan" in [f.kind for f in report.findings]


class _Log(torch.autograd.Function):
    """log with a hand-written backward g / x: a 0 input (zero padding) gives 0/0 = NaN there, which the plan
    cannot see (its saved tensors are finite): the pass runs 'check'."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


def _keep_two_rows(nested: bool) -> type[torch.autograd.Function]:
    class Keep(torch.autograd.Function):
        """3 * x[:2]; the backward by torch ops, or through a nested torch.autograd.grad."""

        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return 3 * x[:2]

        @staticmethod
        def backward(ctx, g):
            if not nested:
                out = torch.zeros(ctx.shape, dtype=g.dtype)
                out[:2] = 3 * g
                return out
            with torch.enable_grad():
                xd = torch.zeros(ctx.shape, dtype=g.dtype, requires_grad=True)
                (out,) = torch.autograd.grad(3 * xd[:2], xd, g)
            return out

    return Keep


@pytest.mark.parametrize("nested", [False, True])
def test_zero_padding_through_a_custom_backward_in_a_check_pass(nested):
    """In a 'check' pass the nested backward ran plain and handed no structural zeros down: rows 2: of its result
    met g / x = 0/0 in _Log's backward, and w.grad was NaN, silently (fixed in nest31: its plan finds the slice's
    zeros reaching its result as made, so it runs strong and exports them)."""
    torch.manual_seed(0)
    w0 = torch.rand(3, 3, dtype=torch.float64) + 0.5
    inp = torch.rand(4, 3, dtype=torch.float64) + 0.5
    keep = _keep_two_rows(nested)
    w = w0.clone().requires_grad_()
    keep.apply(_Log.apply(inp[:2] @ w)).sum().backward()  # the program with the padding rows deleted
    want = w.grad
    inp[2:] = 0.0  # zero padding: log(0) = -inf in rows the loss drops
    w = w0.clone().requires_grad_()
    gw.backward(keep.apply(_Log.apply(inp @ w)).sum())
    torch.testing.assert_close(w.grad, want, rtol=1e-12, atol=1e-12)


class _NestedExp(torch.autograd.Function):
    """exp, differentiated in its backward by a nested torch.autograd.grad."""

    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t.exp()

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        with torch.enable_grad():
            td = t.detach().requires_grad_()
            (r,) = torch.autograd.grad(td.exp(), td, g)
        return r


def _exp_reentrant(h: torch.Tensor) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(torch.exp, h, use_reentrant=True)


@pytest.mark.parametrize("block", [_exp_reentrant, _NestedExp.apply], ids=["reentrant checkpoint", "custom backward"])
def test_exp_minus_inf_times_inf_stays_nan_through_a_nested_backward(block):
    """The loss is exp(-inf) * inf = NaN: x's gradient there is NaN (plain PyTorch, and gradwise without the
    nested backward). The nested backward, forced strong since integ30, read its own outputs (exp(h): 0, finite)
    as the program's and took exp's 0 for a masked entry's structural zero: x.grad[0] was 0.0, silently."""
    inf = float("inf")
    x = torch.tensor([-inf, 0.5], dtype=torch.float64, requires_grad=True)
    gw.backward((block(x * 1.0) * torch.tensor([inf, 1.0], dtype=torch.float64)).sum())
    assert math.isnan(x.grad[0].item()) and x.grad[1].item() == pytest.approx(math.exp(0.5), rel=1e-15)


class _OwnLevelLogger(logging.Logger):
    """A logger class of the application's (logging.setLoggerClass before torch is imported) with its own
    getEffectiveLevel."""

    def getEffectiveLevel(self) -> int:
        return super().getEffectiveLevel()


@pytest.mark.parametrize("level", [logging.WARNING, logging.DEBUG])
def test_watch_explains_a_nan_step_whatever_torchs_autograd_logger(monkeypatch, level):
    """4dda596 told torch's read of its logger's level apart from a user's hook by Logger.getEffectiveLevel's code
    object: with the logger an instance of a subclass that defines its own, the replay of the first NaN step stopped
    there again ('its backward runs your hook _OwnLevelLogger.getEffectiveLevel'), the step unexplained; at DEBUG
    (TORCH_LOGS="+torch.autograd") at the log.debug of torch's own graph hooks ('your hook Logger.debug')."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_hunt_integrations import N, _data, _hand_written_checkpoint, _net

    logger = _OwnLevelLogger("torch.autograd.graph")
    logger.setLevel(level)
    logger.addHandler(logging.NullHandler())
    monkeypatch.setattr(torch.autograd.graph, "log", logger)
    m = _net()
    with gw.watch() as report:
        for step in range(2):
            m.zero_grad()
            loss = _hand_written_checkpoint(m, _data(genuine=step == 1), N)
            with gw.strong_zeros():
                loss.backward()
    notes = " ".join(report.notes)
    assert "getEffectiveLevel" not in notes and "that step was explained" in notes, notes
