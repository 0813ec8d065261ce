"""Strong zeros on defects left open by session 27, float64.

(a) ``out=`` overloads inside a backward: a custom ``autograd.Function``'s backward (or a library's: the chunked
backward of ``nn.LinearCrossEntropyLoss``) writes into a preallocated buffer. Rules are written for the
functional form; on the ``out=`` form a rule that runs the op again for its pieces wrote them into the caller's
buffer (``_trilinear``'s count of met NaN/Inf replaced its result: a zero gradient, SILENT) or called the
overload without its buffer (``convolution_backward.out`` with a NaN in its value operand: a crash inside
gradwise). Each ``out=`` overload of an op with a rule now runs the rule on the functional overload and copies
into the buffer. Reference: the same program with the discarded rows deleted (close: other shapes, other SIMD
tails), and plain PyTorch bit for bit on finite data.

(b) ``gw.register_rule(..., "placement", weights=...)``: a weight of exactly 0 reading a NaN row claimed a
structural zero (SILENT: a NaN loss with a finite gw.grad). Reference: PyTorch's NaN pattern, the deleted program.

(c) In-place ops on views (CopySlices): the deleted program's gradients; alpha = 0 products in place on a view
keep PyTorch's NaN and are now named (silent on the base).

(d) gw.gather_reports' ranks line with one rank.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

nan, f64 = float("nan"), torch.float64
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------------------------
# (a) out= overloads inside a backward
# ---------------------------------------------------------------------------------------------------------------
def _w() -> torch.Tensor:
    return torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=f64)


_I = torch.tensor([2, 1, 0])


def _empty(g: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(0, dtype=dtype or g.dtype)


def _into(call: Callable[[torch.Tensor], object], after: Callable[[torch.Tensor], torch.Tensor] = lambda o: o,
          dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A buffer ``out`` (empty: resized by the op), ``call(out)`` writes into it, ``after(out)`` the gradient."""
    return lambda g, dt=dtype: (lambda out: (call(out), after(out))[1])(_empty(g, dt))


# name -> backward(g, v): g the incoming sensitivity (6 x 3, rows 4: structural), v a saved value (6 x 3, NaN in
# rows 4: of the NaN programs); returns the gradient of the Function's input (6 x 3)
OUT_BACKWARDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mm": lambda g, v: _into(lambda o: torch.mm(g * v, _w(), out=o))(g),
    "mm-two-tracked": lambda g, v: _into(lambda o: torch.mm(g.t(), g * v, out=o), lambda o: g @ o)(g),
    "bmm-two-tracked": lambda g, v: _into(lambda o: torch.bmm(g.t()[None], (g * v)[None], out=o),
                                          lambda o: g @ o[0])(g),
    "mv": lambda g, v: _into(lambda o: torch.mv(g * v, _w()[0], out=o), lambda o: o[:, None] * g)(g),
    "addmm": lambda g, v: _into(lambda o: torch.addmm(g, g * v, _w(), out=o))(g),
    "matmul": lambda g, v: _into(lambda o: torch.matmul(g * v, _w(), out=o))(g),
    "mul": lambda g, v: _into(lambda o: torch.mul(g, v, out=o))(g),
    "mul-two-tracked": lambda g, v: _into(lambda o: torch.mul(g * v, g, out=o))(g),
    "add": lambda g, v: _into(lambda o: torch.add(g * v, g, out=o))(g),
    "sub": lambda g, v: _into(lambda o: torch.sub(g * v, g, out=o))(g),
    "div": lambda g, v: _into(lambda o: torch.div(g, v.exp(), out=o))(g),
    "neg": lambda g, v: _into(lambda o: torch.neg(g * v, out=o))(g),
    "xlogy": lambda g, v: _into(lambda o: torch.xlogy(g, v.abs(), out=o))(g),
    "sum": lambda g, v: _into(lambda o: torch.sum(g * v, 1, keepdim=True, out=o), lambda o: o.expand(g.shape))(g),
    "mean": lambda g, v: _into(lambda o: torch.mean(g * v, 1, keepdim=True, out=o), lambda o: o.expand(g.shape))(g),
    "cumsum": lambda g, v: _into(lambda o: torch.cumsum(g * v, 1, out=o))(g),
    "index_select": lambda g, v: _into(lambda o: torch.index_select(g * v, 1, _I, out=o))(g),
    "gather": lambda g, v: _into(lambda o: torch.gather(g * v, 1, _I.expand(g.shape), out=o))(g),
    "index": lambda g, v: _into(lambda o: aten.index.Tensor_out(g * v, [None, _I], out=o))(g),
    "index_add": lambda g, v: _into(lambda o: torch.index_add(g * 0, 1, _I, g * v, out=o))(g),
    "scatter_add": lambda g, v: _into(lambda o: torch.scatter_add(g * 0, 1, _I.expand(g.shape), g * v, out=o))(g),
    "index_put": lambda g, v: _into(lambda o: aten.index_put.out(g * 0, [_I], (g * v)[:3], True, out=o))(g),
    "cat": lambda g, v: _into(lambda o: torch.cat([(g * v)[:, :1], g[:, 1:]], 1, out=o))(g),
    "stack": lambda g, v: _into(lambda o: torch.stack([g * v, g], 0, out=o), lambda o: o.sum(0))(g),
    "flip": lambda g, v: _into(lambda o: aten.flip.out(g * v, [1], out=o))(g),
    "roll": lambda g, v: _into(lambda o: aten.roll.out(g * v, [1], [1], out=o))(g),
    "tril": lambda g, v: _into(lambda o: torch.tril(g * v, out=o))(g),
    "constant_pad_nd": lambda g, v: _into(lambda o: aten.constant_pad_nd.out(g * v, [1, 1], 0.0, out=o),
                                          lambda o: o[:, 1:-1])(g),
    "where": lambda g, v: _into(lambda o: aten.where.self_out(v.isnan(), torch.zeros((), dtype=f64), g * v,
                                                              out=o))(g),
    "masked_fill": lambda g, v: _into(lambda o: aten.masked_fill.Scalar_out(g * v, v.isnan(), 0.0, out=o))(g),
    "clamp": lambda g, v: _into(lambda o: torch.clamp(g * v, -1, 1, out=o))(g),
    "abs": lambda g, v: _into(lambda o: torch.abs(g * v, out=o))(g),
    "threshold_backward": lambda g, v: _into(lambda o: aten.threshold_backward.grad_input(g * v, v.abs(), 0.5,
                                                                                           grad_input=o))(g),
    "hardtanh_backward": lambda g, v: _into(lambda o: aten.hardtanh_backward.grad_input(g * v, v, -0.5, 0.5,
                                                                                         grad_input=o))(g),
    "sigmoid_backward": lambda g, v: _into(lambda o: aten.sigmoid_backward.grad_input(g, v.sigmoid(),
                                                                                       grad_input=o))(g),
    "gelu_backward": lambda g, v: _into(lambda o: aten.gelu_backward.grad_input(g, v, grad_input=o))(g),
    "softmax_backward": lambda g, v: _into(lambda o: aten._softmax_backward_data.out(g, v.softmax(1), 1, f64,
                                                                                     grad_input=o))(g),
    "log_softmax_backward": lambda g, v: _into(lambda o: aten._log_softmax_backward_data.out(
        g, v.log_softmax(1), 1, f64, out=o))(g),
    "embedding_dense_backward": lambda g, v: _into(lambda o: aten.embedding_dense_backward.out(
        (g * v).t(), _I, 4, -1, False, out=o), lambda o: o[:3].t())(g),
    "avg_pool2d_backward": lambda g, v: _into(lambda o: aten.avg_pool2d_backward.grad_input(
        (g * v)[None, None, :, :1], g[None, None], [1, 3], [1, 3], [0, 0], False, True, None, grad_input=o),
        lambda o: o[0, 0])(g),
    "solve_triangular": lambda g, v: _into(lambda o: torch.linalg.solve_triangular(
        _w().triu() + 3 * torch.eye(3, dtype=f64), (g * v).t(), upper=True, out=o), lambda o: o.t())(g),
    # SILENT on the base: the rule's count of met NaN/Inf went into the buffer (a zero gradient)
    "_trilinear": lambda g, v: _into(lambda o: aten._trilinear.out(g, v, _w()[:1].expand_as(g), [], [], [], [],
                                                                   out=o))(g),
    "convolution": lambda g, v: _into(lambda o: aten.convolution.out(
        g[None, None], v[None, None], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, out=o),
        lambda o: g * o[0, 0].sum())(g),
    "convolution_backward-input": lambda g, v: _into(lambda o: aten.convolution_backward.out(
        (g * v)[None, None], v.nan_to_num()[None, None], _w()[None, None, :1, :1], [1], [1, 1], [0, 0], [1, 1],
        False, [0, 0], 1, [True, True, True], out0=o, out1=_empty(g), out2=_empty(g)), lambda o: o[0, 0])(g),
    # a crash inside gradwise on the base: the rule's one-channel check called the overload without its buffers
    "convolution_backward-weight": lambda g, v: _into(lambda o: aten.convolution_backward.out(
        g[None, None], v[None, None], _w()[None, None, :1, :1], [1], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, True], out0=_empty(g), out1=o, out2=_empty(g)), lambda o: g * o.sum())(g),
    "fft": lambda g, v: _into(lambda o: torch.fft.fft(torch.complex(g * v, g * 0), dim=1, out=o),
                              lambda o: o.real.contiguous(), dtype=torch.complex128)(g),
}


def _function(backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> type[torch.autograd.Function]:
    class OutBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, v):
            ctx.save_for_backward(v)
            return a * 1.0

        @staticmethod
        def backward(ctx, g):
            (v,) = ctx.saved_tensors
            return backward(g, v), None

    return OutBackward


def _out_program(name: str, nan_rows: bool):
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=f64, requires_grad=True)
    v = torch.randn(6, 3, dtype=f64)
    if nan_rows:
        v[4:] = nan
    fn = _function(OUT_BACKWARDS[name])
    return x, v, lambda x, v, kept=4: fn.apply(torch.tanh(x), v)[:kept].sum()


@pytest.mark.parametrize("name", OUT_BACKWARDS)
def test_out_overload_in_a_backward_is_the_deleted_programs(name):
    """NaN in the rows of a saved value that only the discarded rows (4:) read: the gradient is that of the same
    program on rows :4, and rows 4: get structural zeros."""
    x, v, loss = _out_program(name, nan_rows=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            (got,) = torch.autograd.grad(loss(x, v), x)
    kept = x.detach()[:4].clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(kept, v[:4]), kept)
    torch.testing.assert_close(got[:4], ref, rtol=1e-13, atol=1e-15)
    assert (got[4:] == 0).all()


@pytest.mark.parametrize("name", OUT_BACKWARDS)
def test_out_overload_in_a_backward_finite_is_pytorchs(name):
    x, v, loss = _out_program(name, nan_rows=False)
    (plain,) = torch.autograd.grad(loss(x, v), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.strong_zeros():
            (got,) = torch.autograd.grad(loss(x, v), x)
    assert torch.equal(got, plain)


def _buffer_backward(make: Callable[[torch.Tensor], torch.Tensor], seen: list):
    def backward(g, v):
        out = make(g)
        torch.mul(g.t(), v.t(), out=out)  # a transposed product: a resized buffer takes its strides
        seen.append((out.shape, out.stride()))
        return out.t()
    return backward


@pytest.mark.parametrize("make", [lambda g: torch.empty(0, dtype=f64), lambda g: torch.empty(2, 2, dtype=f64),
                                  lambda g: torch.empty(3, 6, dtype=f64)], ids=["empty", "other-shape", "same-shape"])
def test_out_buffer_resized_as_pytorch_resizes_it(make):
    """The buffer's shape, strides and warning (a buffer with elements of another shape) are PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=f64, requires_grad=True)
    v = torch.randn(6, 3, dtype=f64)
    v[4:] = nan
    results = []
    for strong in (False, True):
        seen: list = []
        fn = _function(_buffer_backward(make, seen))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if strong:
                with gw.strong_zeros():
                    (g,) = torch.autograd.grad(fn.apply(torch.tanh(x), v)[:4].sum(), x)
            else:
                (g,) = torch.autograd.grad(fn.apply(torch.tanh(x), v)[:4].sum(), x)
        resized = [str(w.message).split(" This")[0] for w in caught if "was resized" in str(w.message)]
        results.append((seen, resized, g))
    (plain_seen, plain_warned, plain), (seen, warned, got) = results
    assert seen == plain_seen and warned == plain_warned
    assert torch.equal(got[:4], plain[:4]) and (got[4:] == 0).all() and plain[4:].isnan().all()


def test_linear_cross_entropy_loss_with_discarded_nan_rows_is_the_deleted_programs():
    """nn.LinearCrossEntropyLoss (its chunked backward writes with mm into out= buffers) on a batch whose
    discarded rows (a slice before the loss) hold NaN: the gradients of the loss on the kept rows."""
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("torch.nn.LinearCrossEntropyLoss is not in this torch")
    torch.manual_seed(0)
    loss_fn = torch.nn.LinearCrossEntropyLoss(8, 5, dtype=f64)
    x = torch.randn(6, 8, dtype=f64)
    x[4:] = nan
    x.requires_grad_()
    lin = torch.nn.Linear(8, 8).double()
    t = torch.randint(0, 5, (4,))
    wrt = (lin.weight, *loss_fn.parameters())
    got = gw.grad(loss_fn(lin(x)[:4], t), wrt)
    ref = torch.autograd.grad(loss_fn(lin(x.detach()[:4]), t), wrt)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


class _MMOut(torch.autograd.Function):
    """A backward that writes its product into a buffer (torch.mm(out=)), at module level for dynamo."""

    @staticmethod
    def forward(ctx, a, v):
        ctx.save_for_backward(v)
        return a * 1.0

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        out = torch.empty(0, dtype=g.dtype, device=g.device)
        torch.mm(g * v, torch.eye(g.shape[1], dtype=g.dtype, device=g.device), out=out)
        return out, None


def test_out_overload_in_a_compiled_backward_is_functionalized():
    """Under torch.compile (aot_eager) the Function's backward is traced and functionalized: no out= overload
    reaches the strong-zero mode (the op-by-op fallback runs the functional graph), and nothing reads values
    while it traces. The gradients are the deleted program's."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=f64, requires_grad=True)
    v = torch.randn(6, 3, dtype=f64)
    v[4:] = nan

    def loss(x, v, kept: int = 4):
        return _MMOut.apply(torch.tanh(x), v)[:kept].sum()

    compiled = torch.compile(loss, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's own while it traces (a non-leaf's .grad), and gradwise's notes
        with gw.strong_zeros():
            (got,) = torch.autograd.grad(compiled(x, v), x)
    kept = x.detach()[:4].clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(kept, v[:4]), kept)
    torch.testing.assert_close(got[:4], ref, rtol=1e-13, atol=1e-15)
    assert (got[4:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# (b) gw.register_rule(op, "placement", weights=...): a weight of exactly 0 is a value, not a structural zero
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("gwknown28::weighted_rows", mutates_args=())
def weighted_rows(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index) * weight[:, None]


@torch.library.custom_op("gwknown28::weighted_rows_backward", mutates_args=())
def weighted_rows_backward(g: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * weight[:, None])


@weighted_rows.register_fake
def _(x, index, weight):
    return x.new_empty(index.shape[0], *x.shape[1:])


@weighted_rows_backward.register_fake
def _(g, index, weight, rows):
    return g.new_empty(rows, *g.shape[1:])


def _weighted_setup(ctx, inputs, output):
    ctx.index, ctx.weight, ctx.rows = inputs[1], inputs[2], inputs[0].shape[0]


weighted_rows.register_autograd(
    lambda ctx, g: (weighted_rows_backward(g, ctx.index, ctx.weight, ctx.rows), None, None),
    setup_context=_weighted_setup)

WEIGHTS = {"not-said": None, "by-name": ("weight",), "by-position": (2,)}


@pytest.fixture(params=list(WEIGHTS), ids=list(WEIGHTS))
def weighted(request):
    handle = gw.register_rule(weighted_rows_backward, "placement", weights=WEIGHTS[request.param])
    torch.manual_seed(0)
    yield request.param, torch.nn.Linear(4, 3).double(), torch.randn(6, 4, dtype=f64)
    handle.remove()


def _weighted_loss(lin, x, index, w, kept=None):
    out = weighted_rows(lin(x), index, w)
    out = out if kept is None else out[kept]
    return (out * torch.arange(1.0, out.numel() + 1, dtype=f64).view(out.shape)).sum()


def test_weight_zero_on_a_nan_row_keeps_the_nan(weighted):
    """Row 2 of x is NaN and gathered with weight 0: the forward (0 x NaN) and the loss are NaN, and so is
    PyTorch's weight gradient. The 0/1 count 1 x 0 = 0 claimed a structural zero and gw.grad returned a finite
    gradient of a NaN loss (SILENT on the base)."""
    _, lin, x = weighted
    x[2] = nan
    index, w = torch.tensor([0, 2, 3]), torch.tensor([0.5, 0.0, 2.0], dtype=f64)
    assert _weighted_loss(lin, x, index, w).isnan()
    got = gw.grad(_weighted_loss(lin, x, index, w), [lin.weight, lin.bias])
    exp = torch.autograd.grad(_weighted_loss(lin, x, index, w), [lin.weight, lin.bias])
    assert got[0].isnan().any()
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g.isnan(), e.isnan())


def test_weight_zero_and_a_discarded_row_share_an_output(weighted):
    """x's row 2 is read with weight 0 by a kept output and with weight 0.5 by a discarded one: the count
    0 x 0.5 + 1 x 0 is 0 but the row is used (0 x NaN in the kept output). The NaN stays."""
    _, lin, x = weighted
    x[2] = nan
    index, w = torch.tensor([2, 2, 3]), torch.tensor([0.5, 0.0, 2.0], dtype=f64)
    exp = torch.autograd.grad(_weighted_loss(lin, x, index, w, kept=[1, 2]), [lin.weight])[0]
    assert exp.isnan().all()
    got = gw.grad(_weighted_loss(lin, x, index, w, kept=[1, 2]), [lin.weight])[0]
    assert got.isnan().all()


@pytest.mark.parametrize("w", [[0.5, 0.0, -1.0, 2.0], [0.5, 1.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
                         ids=["zero", "cancel", "all-zero"])
@pytest.mark.parametrize("kept", [None, [1, 2, 3]], ids=["all-kept", "row0-discarded"])
def test_weighted_placement_finite_data_is_pytorchs(weighted, w, kept):
    _, lin, x = weighted
    index, w = torch.tensor([0, 2, 2, 3]), torch.tensor(w, dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(_weighted_loss(lin, x, index, w, kept), [lin.weight, lin.bias])
    exp = torch.autograd.grad(_weighted_loss(lin, x, index, w, kept), [lin.weight, lin.bias])
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("nan_weight", [False, True], ids=["finite-weight", "nan-weight"])
def test_discarded_row_is_the_deleted_programs(weighted, nan_weight):
    """x's rows 1 and 4 are NaN, row 1 is gathered only by the discarded output row 0 (whose weight is NaN in
    one case), row 4 by none. The deleted program has neither row and gathers rows 2, 3 with their weights.
    Named weights: exact; not said, a NaN weight that only a structural zero meets keeps PyTorch's NaN (named,
    not hidden)."""
    which, lin, x = weighted
    x[1] = x[4] = nan
    index, w = torch.tensor([1, 2, 3]), torch.tensor([nan if nan_weight else 0.5, 1.5, 2.0], dtype=f64)
    # deleted: x's rows 1 and 4 and the output row 0; x's rows 2, 3 are rows 1, 2 of x[[0, 2, 3, 5]]
    ref = torch.autograd.grad(_weighted_loss(lin, x[[0, 2, 3, 5]], torch.tensor([1, 2]), w[1:]),
                              [lin.weight, lin.bias])
    if nan_weight and which == "not-said":
        with pytest.warns(gw.OpaqueBackwardWarning, match="placement rule met NaN/Inf"):
            got = gw.grad(_weighted_loss(lin, x, index, w, kept=[1, 2]), [lin.weight, lin.bias])
        assert got[0].isnan().any()
        return
    got = gw.grad(_weighted_loss(lin, x, index, w, kept=[1, 2]), [lin.weight, lin.bias])
    for g, e in zip(got, ref, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("weights, error", [(("nope",), ValueError), ((0,), ValueError), ((7,), ValueError),
                                            ((1.5,), TypeError)], ids=["unknown", "sensitivity", "past-end", "float"])
def test_weights_name_arguments_of_the_op(weights, error):
    with pytest.raises(error):
        gw.register_rule(weighted_rows_backward, "placement", weights=weights)


def test_weights_apply_to_placement_only():
    with pytest.raises(ValueError, match="placement"):
        gw.register_rule(weighted_rows_backward, "linear", weights=("weight",))


# ---------------------------------------------------------------------------------------------------------------
# (c) in-place ops on views: the op's backward runs inside a CopySlices node, which shows neither the op nor its
# saved tensors. Its formula's ops still meet their rules under the mode; only what a rule reads from the node
# itself (alpha = 0 of addmm & co.) is hidden.
# ---------------------------------------------------------------------------------------------------------------
def _r(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _view_mul():
    w, v = _r(6, 3, seed=1).requires_grad_(), _r(6, 2, seed=2)
    v[4:] = nan  # multiplies the rows 4: that the loss discards

    def prog(w, v):
        y = torch.tanh(w) * 1.0
        y[:, :2].mul_(v)
        return (y[:4] ** 2).sum()
    return (w,), lambda: prog(w, v), lambda: prog(w[:4], v[:4])


def _view_narrow_copy():
    w, src = _r(6, 3, seed=1), _r(6, 3, seed=2).requires_grad_()
    w[4:] = nan
    w.requires_grad_()

    def prog(w):
        y = torch.tanh(w) * 1.0
        y.narrow(0, 0, 2).copy_(src.exp()[:2])
        return y[:4].sum()
    return (w, src), lambda: prog(w), lambda: prog(w[:4])


def _view_copy_over_nan():
    w = torch.tensor([[-1.0, 4.0], [-2.0, 9.0], [1.0, 4.0]], dtype=f64, requires_grad=True)  # sqrt: NaN rows 0:2
    y0 = torch.tensor([[3.0, 3.0]], dtype=f64, requires_grad=True)

    def prog():
        y = w.sqrt() * 1.0
        y[:2].copy_(y0.expand(2, 2) * 1.0)  # ...overwritten
        return (y * y).sum()

    def deleted():
        return (torch.cat([y0.expand(2, 2) * 1.0, w[2:].sqrt()]) ** 2).sum()
    return (w, y0), prog, deleted


def _view_select_div():
    w = _r(6, 3, seed=1).requires_grad_()

    def prog(rows):
        y = w * 1.0
        y[0].div_(torch.zeros(3, dtype=f64))  # row 0: Inf/NaN, discarded
        return y[rows].sum()
    return (w,), lambda: prog(slice(1, None)), lambda: (w * 1.0)[1:].sum()


def _view_diagonal_mul():
    w, v = _r(3, 3, seed=1).requires_grad_(), torch.tensor([nan, 1.0, 2.0], dtype=f64)

    def prog(first):
        y = w * 1.0
        y.diagonal()[first:].mul_(v[first:])
        return y[1:].sum()
    return (w,), lambda: prog(0), lambda: prog(1)


def _view_transposed_addcmul():
    w, a = _r(4, 3, seed=1).requires_grad_(), _r(3, 4, seed=2)
    a[:, 0] = nan

    def prog():
        y = torch.tanh(w) * 1.0
        y.t().addcmul_(a, torch.ones(3, 4, dtype=f64))
        return y[1:].sum()
    return (w,), prog, lambda: (torch.tanh(w) * 1.0)[1:].sum()


def _view_row_addmm():
    a, b = _r(6, 3, seed=1).requires_grad_(), _r(3, 3, seed=2)
    b[:, 2] = nan  # the product's column 2 (NaN) lands in y[1, 2], discarded

    def prog(cols):
        y = torch.tanh(a) * 1.0
        y[1:2].addmm_(y[2:3].clone(), b)
        return y[:, cols].sum()

    def deleted():
        y = torch.tanh(a) * 1.0
        y[1:2, :2].addmm_(y[2:3].clone(), b[:, :2])
        return y[:, :2].sum()
    return (a,), lambda: prog(slice(0, 2)), deleted


IN_PLACE_ON_VIEWS = {"mul_": _view_mul, "narrow-copy_": _view_narrow_copy, "copy_-over-nan": _view_copy_over_nan,
                     "select-div_": _view_select_div, "diagonal-mul_": _view_diagonal_mul,
                     "transposed-addcmul_": _view_transposed_addcmul, "row-addmm_": _view_row_addmm}


@pytest.mark.parametrize("name", IN_PLACE_ON_VIEWS)
def test_in_place_op_on_a_view_is_the_deleted_programs(name):
    """NaN/Inf only where the loss discards (or an overwrite replaces) values: the deleted program's gradient."""
    wrt, prog, deleted = IN_PLACE_ON_VIEWS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(prog(), wrt)
    ref = torch.autograd.grad(deleted(), wrt)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("op", ["addmm_", "baddbmm_", "addmv_"])
def test_zero_alpha_product_in_place_on_a_view_is_named(op):
    """y[:2].addmm_(a, b, alpha=0) with a NaN in b: the kernel never reads the product, the out-of-place op's
    gradients are the deleted term's (_zero_alpha_mul), but in place on a view the op's node hides inside
    CopySlices (no alpha, no saved operands to ask the kernel with), so PyTorch's NaN stays. It was silent; an
    OpaqueBackwardWarning now names it."""
    a = _r(2, 3, seed=1).requires_grad_()
    x = _r(2, 4, 3, seed=3).requires_grad_()
    b = _r(3, 3, seed=2)
    b[0, 0] = nan

    def prog():
        y = x * 1.0
        if op == "addmm_":
            y[0, :2].addmm_(a, b, alpha=0.0)
        elif op == "baddbmm_":
            y[:, :2].baddbmm_(a.expand(2, 2, 3), b.expand(2, 3, 3), alpha=0.0)
        else:
            y[0, 0].addmv_(b, a[0], alpha=0.0)
        return y.sum()

    assert torch.autograd.grad(prog(), a)[0].isnan().any()
    with pytest.warns(gw.OpaqueBackwardWarning, match="in-place op on a view"):
        (got,) = gw.grad(prog(), a)
    assert got.isnan().any()  # PyTorch's NaN, named (the deleted program's gradient would be 0)


# ---------------------------------------------------------------------------------------------------------------
# (d) gw.gather_reports' ranks line with one rank
# ---------------------------------------------------------------------------------------------------------------
def test_rank_story_with_one_rank_says_it_introduced_the_unreplayed_nan():
    """A step gw.watch() could not replay (FSDP2: the finding is born at the backward call): with several ranks
    its origin is unknown, but with a world size of 1 nothing was received, and the line said 'which rank
    introduced them is not known' all the same."""
    from gradwise._distributed import rank_story

    found = [gw.Finding("nan", "backward", "train.py:39", 1, born_op="backward", born_location="train.py:39",
                        rank=0)]
    assert rank_story(found, world_size=1) == [
        "rank 0 had NaN/Inf gradients in a step gw.watch() could not replay: the only rank, it introduced them "
        "(where is not known)"]
    assert rank_story(found, world_size=2) == rank_story(found) == [
        "rank 0 had NaN/Inf gradients in a step gw.watch() could not replay: which rank introduced them is not "
        "known"]


def test_weighted_placement_in_a_compiled_backward(weighted):
    """Under torch.compile (aot_eager) the custom op's backward sits in the compiled graph: the pass has no rule
    for it, so the graph runs again op by op under the mode with real tensors, where the family's counts read
    values; nothing reads them while dynamo and AOTAutograd trace (fake tensors)."""
    _, lin, x = weighted
    x[1] = x[4] = nan
    index, w = torch.tensor([1, 2, 3]), torch.tensor([0.5, 0.0, 2.0], dtype=f64)
    compiled = torch.compile(_weighted_loss, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's own while it traces, and the compiled backward's fallback note
        with gw.strong_zeros():
            got = torch.autograd.grad(compiled(lin, x, index, w, [1, 2]), [lin.weight, lin.bias])
    ref = torch.autograd.grad(_weighted_loss(lin, x[[0, 2, 3, 5]], torch.tensor([1, 2]), w[1:]),
                              [lin.weight, lin.bias])
    for g, e in zip(got, ref, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)
