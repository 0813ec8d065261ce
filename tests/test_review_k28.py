"""Adversarial review of branch known28: ``out=`` overloads inside a backward whose buffer shares memory with an
input, and the ``"placement"`` family's weights (named, or guessed from the arguments' zeros).

References: plain PyTorch (its errors, its values bit for bit on finite data, its NaN pattern where a NaN is
genuine) and the same program with the unused rows deleted.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

nan, f64, f32 = float("nan"), torch.float64, torch.float32


# ---------------------------------------------------------------------------------------------------------------
# (a) out= buffers aliasing an input: the rule ran on the functional overload and copied its result, so PyTorch's
# overlap errors were lost and an aliased mm (PyTorch: zeros) gave another finite gradient
# ---------------------------------------------------------------------------------------------------------------
def _eye() -> torch.Tensor:
    return torch.eye(3, dtype=f64)


# name -> backward(g, v) writing into a buffer that aliases one of its inputs
ALIASED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add-partial-overlap": lambda g, v: (lambda b: (torch.add(b[:-1], 1.0, out=b[1:]), b)[1])(g * v),
    "index_select-in-place": lambda g, v: (lambda b: (torch.index_select(b, 1, torch.tensor([2, 0, 1]), out=b),
                                                      b)[1])(g * v),
    "mm-in-place": lambda g, v: (lambda b: (torch.mm(b, _eye(), out=b), b)[1])(g * v),
    "cumsum-in-place": lambda g, v: (lambda b: (torch.cumsum(b, 1, out=b), b)[1])(g * v),
    "mul-in-place": lambda g, v: (lambda b: (torch.mul(b, v, out=b), b)[1])(g.clone()),
    "mul-into-a-column": lambda g, v: (lambda b: (torch.mul(b[:, :1], v[:, :1], out=b[:, 1:2]), b)[1])(g * v),
}


def _aliased_program(name: str, nan_rows: bool, table: dict | None = None):
    backward = (ALIASED if table is None else table)[name]

    class Aliased(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, v):
            ctx.save_for_backward(v)
            return a * 1.0

        @staticmethod
        def backward(ctx, g):
            return backward(g, ctx.saved_tensors[0]), None

    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=f64, requires_grad=True)
    v = torch.randn(6, 3, dtype=f64)
    if nan_rows:
        v[4:] = nan
    return x, v, lambda x, v, kept=4: Aliased.apply(torch.tanh(x), v)[:kept].sum()


def _grad_or_error(loss: Callable[[], torch.Tensor], x: torch.Tensor, strong: bool) -> torch.Tensor | str:
    try:
        if strong:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with gw.strong_zeros():
                    return torch.autograd.grad(loss(), x)[0]
        return torch.autograd.grad(loss(), x)[0]
    except RuntimeError as e:
        return str(e).split("\n")[0]


@pytest.mark.parametrize("name", ALIASED)
def test_out_buffer_aliasing_an_input_is_pytorchs(name):
    """Finite data: PyTorch's error (a partial overlap, index_select into its own input) or PyTorch's gradient
    bit for bit (mm into its own operand: zeros). On the base the first two ran without error and the mm gave
    the product of the unaliased operands."""
    x, v, loss = _aliased_program(name, nan_rows=False)
    plain = _grad_or_error(lambda: loss(x, v), x, strong=False)
    got = _grad_or_error(lambda: loss(x, v), x, strong=True)
    if isinstance(plain, str):
        assert got == plain
    else:
        assert isinstance(got, torch.Tensor) and torch.equal(got, plain)


@pytest.mark.parametrize("name", ["cumsum-in-place", "mul-in-place", "mul-into-a-column"])
def test_out_buffer_aliasing_an_input_keeps_strong_zeros(name):
    """NaN in the rows of a saved value only the discarded rows read: the deleted program's gradient."""
    x, v, loss = _aliased_program(name, nan_rows=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            (got,) = torch.autograd.grad(loss(x, v), x)
    kept = x.detach()[:4].clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(kept, v[:4]), kept)
    torch.testing.assert_close(got[:4], ref, rtol=1e-13, atol=1e-15)
    assert (got[4:] == 0).all()


# out= overloads without a rule of their own whose functional overload has one (registered for that overload):
# they ran unruled, so the structural rows lost their support and the NaN of v multiplying them stayed (named by
# an OpaqueBackwardWarning: a kept NaN where the deleted program has none)
_TRI = torch.eye(3, dtype=f64) * 3 + torch.ones(3, 3, dtype=f64).triu()


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=f64)


BORROWED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linalg_solve_triangular.out": lambda g, v: (lambda o: (torch.linalg.solve_triangular(
        _TRI, g.t(), upper=True, out=o), o.t() * v)[1])(_empty()),
    "triangular_solve.X": lambda g, v: (lambda o: (torch.ops.aten.triangular_solve.X(
        g.t(), _TRI, True, False, False, X=o, M=_empty()), o.t() * v)[1])(_empty()),
    "cholesky_solve.out": lambda g, v: (lambda o: (torch.cholesky_solve(
        g.t(), torch.linalg.cholesky(_TRI @ _TRI.T), out=o), o.t() * v)[1])(_empty()),
    "linalg_lu_solve.out": lambda g, v: (lambda lu, o: (torch.linalg.lu_solve(
        *lu, g.t(), out=o), o.t() * v)[1])(torch.linalg.lu_factor(_TRI), _empty()),
    "abs.out": lambda g, v: (lambda o: (torch.abs(g, out=o), o * v)[1])(_empty()),
    "where.self_out": lambda g, v: (lambda o: (torch.where(g.new_ones(g.shape, dtype=torch.bool), g, 2 * g, out=o),
                                               o * v)[1])(_empty()),
}


@pytest.mark.parametrize("nan_rows", [False, True], ids=["finite", "nan-rows"])
@pytest.mark.parametrize("name", BORROWED)
def test_out_overload_takes_its_functional_overloads_rule(name, nan_rows):
    x, v, loss = _aliased_program(name, nan_rows, BORROWED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "torch.triangular_solve is deprecated")  # (PyTorch's, plain too)
        with gw.strong_zeros():
            (got,) = torch.autograd.grad(loss(x, v), x)
        if not nan_rows:
            assert torch.equal(got, torch.autograd.grad(loss(x, v), x)[0])
            return
        kept = x.detach()[:4].clone().requires_grad_()
        (ref,) = torch.autograd.grad(loss(kept, v[:4]), kept)
    torch.testing.assert_close(got[:4], ref, rtol=1e-13, atol=1e-15)
    assert (got[4:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# (b) placement weights that are no floating tensor (a float scale, an integer tensor) or that a kernel's cast
# makes 0: the count 1 x 0 = 0 claimed a structural zero on a row the forward read (SILENT: NaN loss, finite
# gradient)
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("gwreviewk28::scaled_rows", mutates_args=())
def scaled_rows(x: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
    return x.index_select(0, index) * scale


@torch.library.custom_op("gwreviewk28::scaled_rows_backward", mutates_args=())
def scaled_rows_backward(g: torch.Tensor, index: torch.Tensor, scale: float, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * scale)


@torch.library.custom_op("gwreviewk28::cast_rows", mutates_args=())
def cast_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index) * weight.to(x.dtype)[:, None]


@torch.library.custom_op("gwreviewk28::cast_rows_backward", mutates_args=())
def cast_rows_backward(g: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * weight.to(g.dtype)[:, None])


for _fwd, _bwd in ((scaled_rows, scaled_rows_backward), (cast_rows, cast_rows_backward)):
    _fwd.register_fake(lambda x, index, w: x.new_empty(index.shape[0], *x.shape[1:]))
    _bwd.register_fake(lambda g, index, w, rows: g.new_empty(rows, *g.shape[1:]))

    def _setup(ctx, inputs, output):
        ctx.index, ctx.w, ctx.rows = inputs[1], inputs[2], inputs[0].shape[0]

    _fwd.register_autograd(lambda ctx, g, bwd=_bwd: (bwd(g, ctx.index, ctx.w, ctx.rows), None, None),
                           setup_context=_setup)

# name -> (forward op, backward op, weights= of the registration (None: not said), the weight, dtype)
WEIGHTED = {
    "float-scale-not-said": (scaled_rows, scaled_rows_backward, None, 0.0, f64),
    "float-scale-named": (scaled_rows, scaled_rows_backward, ("scale",), 0.0, f64),
    "float-scale-position": (scaled_rows, scaled_rows_backward, (2,), -0.0, f64),
    "int-weight-named": (cast_rows, cast_rows_backward, ("weight",), torch.tensor([1, 0, 2]), f64),
    "cast-to-zero-not-said": (cast_rows, cast_rows_backward, None, torch.tensor([0.5, 1e-60, 2.0], dtype=f64), f32),
    "cast-to-zero-half": (cast_rows, cast_rows_backward, None, torch.tensor([0.5, 1e-9, 2.0]), torch.float16),
}


def _weighted(name: str, nan_row: bool):
    fwd, bwd, weights, w, dtype = WEIGHTED[name]
    handle = gw.register_rule(bwd, "placement", **({} if weights is None else {"weights": weights}))
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).to(dtype)
    x = torch.randn(6, 4).to(dtype)
    if nan_row:
        x[2] = nan  # read by output row 1 with weight 0 (0 x NaN: the loss is NaN)
    index = torch.tensor([0, 2, 3])
    return handle, lin, lambda: (fwd(lin(x), index, w) * torch.arange(1, 10).view(3, 3).to(dtype)).sum()


@pytest.mark.parametrize("name", WEIGHTED)
def test_weight_zero_that_is_no_float_tensor_keeps_the_nan(name):
    handle, lin, loss = _weighted(name, nan_row=True)
    try:
        assert loss().isnan()
        (exp,) = torch.autograd.grad(loss(), [lin.weight])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gw.OpaqueBackwardWarning)  # (gradwise names the NaN: not the point)
            (got,) = gw.grad(loss(), [lin.weight])
        assert exp.isnan().any() and torch.equal(got.isnan(), exp.isnan())
    finally:
        handle.remove()


@pytest.mark.parametrize("name", WEIGHTED)
def test_weight_zero_that_is_no_float_tensor_finite_is_pytorchs(name):
    handle, lin, loss = _weighted(name, nan_row=False)
    try:
        (exp,) = torch.autograd.grad(loss(), [lin.weight])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (got,) = gw.grad(loss(), [lin.weight])
        assert torch.equal(got, exp)
    finally:
        handle.remove()


@torch.library.custom_op("gwreviewk28::probability_rows_backward", mutates_args=())
def probability_rows_backward(g: torch.Tensor, index: torch.Tensor, p: float, rows: int) -> torch.Tensor:
    if not 0 <= p < 1:
        raise ValueError("p must be in [0, 1)")
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * (1 - p))


def test_guessed_weight_the_op_refuses_as_one_keeps_every_output_supported():
    """A float argument 0 that is no weight (a probability) and that the op refuses as 1: the second count cannot
    run, so no output is claimed a structural zero (rather than an error from inside gradwise)."""
    handle = gw.register_rule(probability_rows_backward, "placement")
    try:
        class Rows(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x[[0, 2]] * 1.0

            @staticmethod
            def backward(ctx, g):
                return probability_rows_backward(g, torch.tensor([0, 2]), 0.0, 4)

        x = torch.randn(4, 3, dtype=f64, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (got,) = gw.grad(Rows.apply(torch.tanh(x))[:1].sum(), [x])
        (exp,) = torch.autograd.grad(Rows.apply(torch.tanh(x))[:1].sum(), [x])
        assert torch.equal(got, exp)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# (c) the OpaqueBackwardWarning for an alpha = 0 product in place on a view named every literal-0 mul inside a
# CopySlices node: y[:2].mul_(0.0) before a genuine Inf was said to be an addmm_/addmv_ ... with alpha=0
# ---------------------------------------------------------------------------------------------------------------
def test_scalar_zero_mul_in_place_on_a_view_is_not_named_as_an_alpha_product():
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)

    def prog():
        y = x * 1.0
        y[:2].mul_(0.0)
        return (y * torch.tensor(float("inf"), dtype=f64)).sum()  # 0 x Inf in the program itself: NaN

    (exp,) = torch.autograd.grad(prog(), [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = gw.grad(prog(), [x])
    assert exp[:2].isnan().all() and torch.equal(got.isnan(), exp.isnan())
    assert torch.equal(got[2:], exp[2:])
