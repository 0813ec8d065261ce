"""Hunt (session 31, nest31): a backward nested in a 'check' pass (a custom backward's torch.autograd.grad, a reentrant
checkpoint's block) hands the structural zeros of its results to the pass where they reach them as they were made
(_planning._results_reach: a slice, select, pad, index through anything; relu's, where's zeros through views and
elementwise ops), and runs plain otherwise (a Linear+ReLU block: their zeros reach its input as a matmul's whole
rows at most), naming itself in the pass's OpaqueBackwardWarning if the gradients end NaN/Inf.

The NaN/Inf of these programs is made after the nested backward, by a custom backward's g / (2 sqrt(x)) at a zero
padding row (0/0): the plan sees finite saved data, so the pass is 'check'. References are independent of gradwise,
float64: the same program with the padding rows deleted, or plain PyTorch where the data is finite or the NaN genuine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _planning

nan = float("nan")
D = torch.float64
W2 = torch.linspace(0.5, 1.5, 9, dtype=D).reshape(3, 3)
# a reentrant checkpoint inside another's forward (run under no_grad) warns that its inputs need no gradient (PyTorch's
# own warning: the outer one's backward recomputes it with grad on)
pytestmark = pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True:UserWarning")


class _Sqrt(torch.autograd.Function):
    """sqrt with a hand-written backward g / (2 sqrt(x)): 0/0 at a zero row, finite in the forward."""

    @staticmethod
    def forward(ctx, x):
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / (2 * y)


def _grad_of(f: Callable[[torch.Tensor], torch.Tensor]) -> type[torch.autograd.Function]:
    """f in the forward; its backward by a nested torch.autograd.grad of f on a fresh graph."""

    class NestedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return f(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            with torch.enable_grad():
                xd = x.detach().requires_grad_()
                (out,) = torch.autograd.grad(f(xd), xd, g)
            return out

    return NestedGrad


def _first_two(h: torch.Tensor) -> torch.Tensor:
    return 3 * h[:2]


def _first_two_linear(h: torch.Tensor) -> torch.Tensor:  # the slice's zero rows reach h through a matmul
    return (h @ torch.linspace(0.5, 1.5, 9, dtype=D).reshape(3, 3))[:2].tanh()


def _first_two_viewed(h: torch.Tensor) -> torch.Tensor:
    return h.t().unsqueeze(0).transpose(1, 2)[0, :2].exp() * 2


class _NonLeafInput(torch.autograd.Function):
    """3 * x[:2]; the backward by a nested torch.autograd.grad with respect to a non-leaf (h = 1.5 * xd)."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return 3 * x[:2]

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            h = torch.zeros(ctx.shape, dtype=g.dtype, requires_grad=True) * 1.5
            (out,) = torch.autograd.grad(3 * h[:2], h, g)
        return out


class _BackwardToInputs(torch.autograd.Function):
    """3 * x[:2]; the backward by a nested torch.autograd.backward(inputs=[xd]) or gw.grad."""

    @staticmethod
    def forward(ctx, x, by_gw):
        ctx.shape, ctx.by_gw = x.shape, by_gw
        return 3 * x[:2]

    @staticmethod
    def backward(ctx, g):
        with torch.enable_grad():
            xd = torch.zeros(ctx.shape, dtype=g.dtype, requires_grad=True)
            if ctx.by_gw:
                return gw.grad(3 * xd[:2], xd, g)[0], None
            torch.autograd.backward(3 * xd[:2], g, inputs=[xd])
        return xd.grad, None


def _crop(h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(h, (0, 0, 0, -2)).sin()


def _reentrant(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: checkpoint(f, h, use_reentrant=True)


# (name, the block that drops rows 2: of its (4, 3) input, how it is applied in the program)
BLOCKS = {
    "custom backward, nested grad of a slice": lambda h: _grad_of(_first_two).apply(h),
    "custom backward, nested grad of a linear then a slice": lambda h: _grad_of(_first_two_linear).apply(h),
    "custom backward, nested grad of views then a slice": lambda h: _grad_of(_first_two_viewed).apply(h),
    "reentrant checkpoint, slice inside": lambda h: checkpoint(_first_two, h, use_reentrant=True),
    "reentrant checkpoint, linear then slice inside": lambda h: checkpoint(_first_two_linear, h, use_reentrant=True),
    "non-reentrant checkpoint, slice inside": lambda h: checkpoint(_first_two, h, use_reentrant=False),
    "reentrant checkpoint, slice outside": lambda h: checkpoint(torch.sin, h, use_reentrant=True)[:2],
    "non-reentrant checkpoint, slice outside": lambda h: checkpoint(torch.sin, h, use_reentrant=False)[:2],
    "reentrant checkpoint in one, slice inside the inner": _reentrant(lambda t: _reentrant(_first_two)(t * 1.0) * 2),
    "reentrant checkpoint in one, slice between": _reentrant(lambda t: _reentrant(torch.sin)(t[:2]) * 2),
    "reentrant checkpoint, index": _reentrant(lambda h: h[torch.tensor([0, 1])] * 3),
    "reentrant checkpoint, index_select": _reentrant(lambda h: h.index_select(0, torch.tensor([0, 1])) ** 2),
    "reentrant checkpoint, selects stacked": _reentrant(lambda h: torch.stack([h[0], h[1]]) * 3),
    "reentrant checkpoint, narrow": _reentrant(lambda h: h.narrow(0, 0, 2).exp()),
    "reentrant checkpoint, negative pad (crop)": _reentrant(_crop),
    "custom backward, nested grad wrt a non-leaf": _NonLeafInput.apply,
    "custom backward, nested backward(inputs=)": lambda h: _BackwardToInputs.apply(h, False),
    "custom backward, nested gw.grad": lambda h: _BackwardToInputs.apply(h, True),
}
DELETED = {"reentrant checkpoint, negative pad (crop)": torch.sin}  # (the others: the same block on the kept rows)


def _w_grad(block: Callable, inp: torch.Tensor, strong: bool) -> torch.Tensor:
    w = (torch.rand(3, 3, dtype=D, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_()
    loss = block(_Sqrt.apply(inp @ w)).sum()
    gw.backward(loss) if strong else loss.backward()
    return w.grad


def _inp(rows: int = 4) -> torch.Tensor:
    return torch.rand(rows, 3, dtype=D, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.parametrize("name", BLOCKS)
def test_zero_padding_dropped_in_a_nested_backward_matches_the_deleted_program(name):
    """Rows 2: of the input are zero padding, which the block drops. Before nest31 the nested backward ran plain in
    the 'check' pass and its results' zero rows met _Sqrt's 0/0: w.grad all NaN, silently (the programs with a
    nested grad or a reentrant checkpoint with the slice inside)."""
    block = BLOCKS[name]
    want = _w_grad(DELETED.get(name, block), _inp()[:2], strong=False)  # the program with the padding rows deleted
    inp = _inp()
    inp[2:] = 0.0
    assert bool(_w_grad(block, inp, strong=False).isnan().all())  # PyTorch: contaminated
    torch.testing.assert_close(_w_grad(block, inp, strong=True), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", BLOCKS)
def test_finite_data_gives_pytorchs_bits(name):
    """No padding: every path (the nested backward strong where its zeros reach its results, plain elsewhere) gives
    PyTorch's gradient bit for bit."""
    block = BLOCKS[name]
    assert torch.equal(_w_grad(block, _inp(), strong=True), _w_grad(block, _inp(), strong=False))


@pytest.mark.parametrize("name", BLOCKS)
def test_a_genuine_nan_in_the_kept_rows_stays(name):
    """A NaN in row 0, which the block keeps: the loss uses it, and w.grad is NaN as in PyTorch, the zero padding
    rows aside (a 'strong' pass: the NaN is saved)."""
    block = BLOCKS[name]
    inp = _inp()
    inp[2:] = 0.0
    inp[0, 1] = nan
    assert bool(_w_grad(block, inp, strong=False).isnan().all())
    assert bool(_w_grad(block, inp, strong=True).isnan().all())


@pytest.mark.parametrize("name", BLOCKS)
def test_a_genuine_infinite_slope_in_the_kept_rows_stays(name):
    """Row 0, which the block keeps, is zero too: sqrt's slope there is infinite (g / 0 with g != 0), made in the
    backward from finite data (a 'check' pass). w.grad holds PyTorch's NaN/Inf, bit for bit."""
    block = BLOCKS[name]
    inp = _inp()
    inp[2:] = 0.0
    inp[0] = 0.0
    want = _w_grad(block, inp, strong=False)
    assert not bool(want.isfinite().all())
    torch.testing.assert_close(_w_grad(block, inp, strong=True), want, equal_nan=True, rtol=0, atol=0)


def _relu_block() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3)).double()


def _results_reach(loss_of: Callable[[torch.Tensor], torch.Tensor], inputs: bool) -> int:
    x = _inp().requires_grad_()
    out = loss_of(x)
    results: list = [(x,) if inputs else ()]
    assert _planning._plan([out], (), None, True, results) == "plain"
    return results[1]


@pytest.mark.parametrize("inputs", [True, False], ids=["autograd.grad", "backward"])
@pytest.mark.parametrize(("loss_of", "reach"), [
    (lambda x: _relu_block()(x).sum(), 1),  # relu's zeros reach x (as a matmul's whole rows at most)
    (lambda x: torch.relu(x).sum(), 1),  # relu's own, through nothing: a flat region's, not padding's
    (lambda x: torch.clamp(x, max=1.0).sum(), 1),
    (lambda x: _relu_block()(x[:2]).sum(), 2),  # the slice's: dropped padding
    (lambda x: _relu_block()(x)[:2].sum(), 2),
    (lambda x: torch.where(x > 1, x, 0.0).mul(2).reshape(-1).sum(), 2),  # where's: masked padding
    (lambda x: x.masked_fill(x < 1, 0.0).matmul(W2).sum(), 2),
    (lambda x: (_relu_block()(x[:2]) + x[:2]).sum(), 2),
    (lambda x: (_relu_block()(x) + x).sum(), 0),  # the residual's sensitivity holds no zero
    (lambda x: torch.tanh(x @ x.t()).sum(), 0),  # no zero made
], ids=["linear-relu-linear", "relu", "clamp", "slice then linear-relu-linear", "linear-relu-linear then slice",
        "where", "masked_fill then matmul", "slice then residual", "residual", "none"])
def test_how_a_nested_backwards_zeros_reach_its_results(loss_of, reach, inputs):
    """The plan of a backward nested in a 'check' pass: 2 runs it strong and exports, 1 runs it plain and names it
    if the pass ends NaN/Inf, 0 runs it plain. A reentrant checkpoint of a Linear+ReLU block (or of a ReLU+Linear
    one) stays plain (1): its backward would otherwise run op by op under the mode on every step."""
    assert _results_reach(loss_of, inputs) == reach


def test_parameters_are_no_results_of_a_checkpoints_backward():
    """A reentrant checkpoint's backward accumulates into the block's parameters too, whose .grad goes into no op
    of the pass: a slice of a weight (an embedding table's first rows) does not make the block strong."""
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(5, 3, dtype=D))
    x = _inp().requires_grad_()
    results: list = [()]
    assert _planning._plan([(x * table[:4]).tanh().sum()], (), None, True, results) == "plain"
    assert results[1] == 0


class _ByRows(torch.autograd.Function):
    """A nested torch.autograd.grad of clamp(x @ w, min=0) (a matmul, then a clamp): at a zero row of x, its 0 slope
    makes the whole row of the sensitivity a structural zero, kept as x's gradient row, which the plan cannot tell
    (relu's whole rows it can: _flat_rows, tests/test_hunt_sz32.py)."""

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


BY_ROWS = {
    "_ByRowsBackward": lambda h: _ByRows.apply(h, W2),
    "CheckpointFunctionBackward": _reentrant(lambda t: torch.clamp(t @ W2, min=0.0)),
}


@pytest.mark.parametrize("node", BY_ROWS)
def test_a_nested_backward_run_plain_is_named_when_the_pass_ends_nan(node):
    """The nested backward ran plain (clamp's zeros reach its result: a flat region's, no padding's): at the zero
    rows of its input (a 0 slope in the whole row) its result's zeros met _Sqrt's 0/0. gradwise changes no number
    there (PyTorch's NaN) and says so, naming the nested backward; on finite data it says nothing, with PyTorch's
    bits. (Known limit: a plain run cannot tell those rows' zeros: the warning stands for them.)"""
    block = BY_ROWS[node]
    assert torch.equal(_w_grad(block, _inp(), True), _w_grad(block, _inp(), False))
    inp = _inp()
    inp[2:] = 0.0
    with pytest.warns(gw.OpaqueBackwardWarning, match=f"nested in {node}"):
        got = _w_grad(block, inp, True)
    want = _w_grad(block, inp, False)
    assert bool(want.isnan().all())
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
