"""Review (session 30) of the compiled backwards run op by op: graph patterns matched by name must be PyTorch's
own ops, and a forward op recomputed in the backward keeps the forward's value.

References: plain eager PyTorch on the same program (the NaNs below reach the output: genuine), and eager strong
zeros on the same program.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradwise as gw
from _compiling import fresh_dynamo  # noqa: F401 (an autouse fixture: every test here)

with warnings.catch_warnings():  # inductor's first import warns from torch.jit (torch's own deprecation)
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._inductor.compile_fx

nan = float("nan")


@torch.library.custom_op("gw_review_c30::exp", mutates_args=())
def _user_exp(x: torch.Tensor) -> torch.Tensor:
    """A user's op that shares exp's name: a clamp, whose backward multiplies by its result."""
    return x.clamp(min=0)


@_user_exp.register_fake
def _(x):
    return torch.empty_like(x)


def _save_result(ctx, inputs, output):
    ctx.save_for_backward(output)


def _times_result(ctx, g):
    (r,) = ctx.saved_tensors
    return g * r


_user_exp.register_autograd(_times_result, setup_context=_save_result)


@torch.library.custom_op("gw_review_c30::addmm", mutates_args=())
def _user_addmm(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A user's op that shares addmm's name, whose own backward scales the products by a literal 0."""
    return torch.addmm(m, a, b, alpha=0)


@_user_addmm.register_fake
def _(m, a, b):
    return torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)


def _save_operands(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _zero_scaled(ctx, g):
    a, b = ctx.saved_tensors
    return g, (g @ b.mT) * 0, (a.mT @ g) * 0


_user_addmm.register_autograd(_zero_scaled, setup_context=_save_operands)


def _grads(f, xs, backend=None):
    xs = [x.clone().requires_grad_(True) for x in xs]
    fn = f if backend is None else torch.compile(f, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.CompiledBackwardWarning)  # (a compiled NaN warns: not what is tested)
        with gw.strong_zeros():
            return torch.autograd.grad(fn(*xs), xs)


def _plain(f, xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    return torch.autograd.grad(f(*xs), xs)


def _exp_of_user(x):
    return torch.ops.gw_review_c30.exp(x).sqrt().sum()  # sqrt's infinite slope at 0 meets the user's result 0


def _addmm_of_user(m, a, b):
    return torch.ops.gw_review_c30.addmm(m, a, b).sum()


_A = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
_A[0, 0] = nan

# a program, its inputs: a user's custom op named as one of PyTorch's whose backward a graph rewrite reads
NAMED_LIKE_TORCH = {
    "exp": (_exp_of_user, [torch.tensor([-1.0, 0.0, 4.0], dtype=torch.float64)]),
    "addmm": (_addmm_of_user, [torch.ones(3, 4, dtype=torch.float64), _A,
                               torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]),
}


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
@pytest.mark.parametrize("name", list(NAMED_LIKE_TORCH))
def test_a_users_op_named_like_torchs_keeps_its_own_backward(name, backend):
    """SILENT (compile30): dynamo names a call of ``torch.ops.mylib.exp`` ``exp`` as it names ``torch.exp``'s, so
    the rewrites took the custom op's backward (``g * result``; ``(g @ b.T) * 0``) for exp's (addmm's alpha = 0)
    and gave 0 where plain PyTorch and eager strong zeros give NaN (the user's formula: inf x 0, 0 x NaN). The
    call's target must be PyTorch's op."""
    f, xs = NAMED_LIKE_TORCH[name]
    want = _plain(f, xs)
    assert any(w.isnan().any() for w in want)  # (the user's formula makes the NaN)
    eager = _grads(f, xs)
    got = _grads(f, xs, backend)
    for g, e, w in zip(got, eager, want, strict=True):
        assert torch.equal(e.isnan(), w.isnan())
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)


_KEEP = torch.tensor([True, False, True])

# how the forward makes the 0 that meets y's NaN in xlogy(0, NaN) = NaN, which reaches the output
FORWARD_ZEROS = {
    "zeros": lambda u: torch.zeros(3, dtype=torch.float64),
    "masked_fill": lambda u: u.masked_fill(~_KEEP, 0.0),
    "where": lambda u: torch.where(_KEEP, u, 0.0),
    "relu": torch.relu,
}


def _xlog_of_zeros(xlog, zeros):
    def f(u, y, w):
        return (xlog(zeros(u), y) * w).sum() + u.sum()

    return f


@pytest.mark.parametrize("backend", ["aot_eager", "aot_eager_decomp_partition"])
@pytest.mark.parametrize("zeros", list(FORWARD_ZEROS))
@pytest.mark.parametrize("xlog", [torch.xlogy, torch.special.xlog1py], ids=["xlogy", "xlog1py"])
def test_a_recomputed_forward_op_reads_forward_zeros_as_values(xlog, zeros, backend):
    """SILENT (base): ``v = xlogy(zeros(3), y)`` with a NaN in y, ``(v * w).sum()``: the partitioner recomputes v
    in the backward, where its ``zeros`` (a forward value) ran as a formula's structural zero, so xlogy's rule
    made v's NaN a 0 and w.grad (= v) was 0 where PyTorch's is NaN (the output is NaN). So did a masked_fill's 0
    (aot_eager's partition recomputes it: it ran as a formula's fill, a structural zero). A forward op recomputed
    in the backward now runs as a forward op, and reads the forward's zeros as values."""
    u = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([0.5, nan, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    f = _xlog_of_zeros(xlog, FORWARD_ZEROS[zeros])
    want = _plain(f, [u, y, w])
    assert want[2][1].isnan()
    got = _grads(f, [u, y, w], backend)  # (decomposed xlog1py rounds otherwise: the NaNs are what is tested)
    for g, e in zip(got, _grads(f, [u, y, w]), strict=True):
        torch.testing.assert_close(g, e, equal_nan=True)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, equal_nan=True)


def test_watch_tells_a_write_between_backwards_under_aot_eager(functorch_config):
    """compile30 told every NaN .grad that a replay found finite, in a graph with any compiled backward, as "its
    compiled backward runs in generated kernels ... run with backend='aot_eager'", also under aot_eager, whose
    replay runs the graph's ops as they are (and sees them): a program that wrote NaN into .grad between two
    backwards of a step was told to use the backend it used. Only an opaque compiled backward (inductor's) is."""
    functorch_config(donated_buffer=False)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    fn = torch.compile(lambda x: torch.tanh(lin(x)).sum(), backend="aot_eager")
    with gw.watch() as report:
        for step in range(3):
            opt.zero_grad()
            fn(torch.randn(6, 4)).backward()
            if step == 1:
                with torch.no_grad():
                    lin.weight.grad[0, 0] = nan  # the program's own write, between the step's backwards
            fn(torch.randn(6, 4)).backward()
            opt.step()
    text = str(report)
    assert "the program wrote it between backwards" in text, text
    assert "generated kernels" not in text, text
