"""Adversarial review of branch model_hunt: the register_rule families ('placement' keeps `count != 0`, a NaN
count named by an OpaqueBackwardWarning; 'linear'/'product' per output) and the `_grouped_mm` strong-zero rule.

References: PyTorch's own gradient on finite data (bitwise), and the same program with the unused values deleted
(discarded tokens and the experts only they reach removed, the offsets recomputed).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

nan, f64 = float("nan"), torch.float64


# ---------------------------------------------------------------------------------------------------------------
# (a) the 'placement' family with a signed weight argument
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("gwreview::signed_rows", mutates_args=())
def signed_rows(x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index) * weights[:, None]


@torch.library.custom_op("gwreview::signed_rows_backward", mutates_args=())
def signed_rows_backward(g: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    return g.new_zeros(rows, *g.shape[1:]).index_add(0, index, g * weights[:, None])


@signed_rows.register_fake
def _(x, index, weights):
    return x.new_empty(index.shape[0], *x.shape[1:])


def _signed_setup(ctx, inputs, output):
    ctx.index, ctx.weights, ctx.rows = inputs[1], inputs[2], inputs[0].shape[0]


signed_rows.register_autograd(
    lambda ctx, g: (signed_rows_backward(g, ctx.index, ctx.weights, ctx.rows), None, None),
    setup_context=_signed_setup)


@pytest.fixture
def signed_placement():
    handle = gw.register_rule(signed_rows_backward, "placement")
    torch.manual_seed(0)
    yield nn.Linear(4, 3).double(), torch.randn(6, 4, dtype=f64)
    handle.remove()


def _signed_loss(lin, x, index, weights, kept=None):
    out = signed_rows(lin(x), index, weights)
    out = out if kept is None else out[kept]
    return (out * torch.arange(1.0, out.numel() + 1, dtype=f64).view(out.shape)).sum()


@pytest.mark.parametrize("kept", [None, [1, 2, 3]], ids=["all-kept", "row0-discarded"])
@pytest.mark.parametrize("weights", [[0.5, 1.0, -1.0, 2.0], [0.5, 3.0, -3.0, 2.0], [0.5, -1.0, -1.0, 2.0]],
                         ids=["cancel", "cancel3", "negative"])
def test_placement_signed_weights_finite_data_is_pytorchs(signed_placement, kept, weights):
    """Weights +1 and -1 send two sensitivity elements to the same output row 2: its 0/1 count is 1 - 1 = 0
    though the row holds g1 - g2, a used, nonzero value. SILENT: the rule zeroed that row on finite data."""
    lin, x = signed_placement
    index, w = torch.tensor([0, 2, 2, 3]), torch.tensor(weights, dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(_signed_loss(lin, x, index, w, kept), [lin.weight, lin.bias])
    exp = torch.autograd.grad(_signed_loss(lin, x, index, w, kept), [lin.weight, lin.bias])
    for g, e in zip(got, exp, strict=True):
        assert torch.equal(g, e)


def test_placement_zero_weight_meeting_a_supported_inf_keeps_pytorchs_nan(signed_placement):
    """A kept row with weight 0 whose incoming gradient is Inf (sqrt at 0): the op computes Inf x 0 = NaN from a
    *supported* element (the row is used: no deletion removes it), its count 1 x 0 = 0 claimed a structural zero
    and the NaN became 0. PyTorch's NaN must stay."""
    lin, x = signed_placement
    index, w = torch.tensor([0, 2, 3]), torch.tensor([0.0, 1.0, 2.0], dtype=f64)

    def loss():
        out = signed_rows(lin(x), index, w)
        return out[0].abs().sqrt().sum() + out[1:].square().sum()

    exp = torch.autograd.grad(loss(), [lin.weight])[0]
    assert exp.isnan().any()
    got = gw.grad(loss(), [lin.weight])[0]
    assert torch.equal(got.isnan(), exp.isnan())


def test_placement_weight_zero_on_a_nan_row_keeps_the_nan(signed_placement):
    """Row 2 of x is NaN and gathered with weight 0: the forward (0 x NaN) and the loss are NaN, and PyTorch's
    weight gradient is NaN, as gradwise's own for the same program written with index_select and mul. Under the
    family the row's count 1 x 0 = 0 and value 0 claim a structural zero, and gw.grad returns a finite gradient
    of a NaN loss (SILENT, on the base too). Fixed by the family's weights: not named, a weight argument holding
    an exact 0 is counted a second time with its zeros as ones (tests/test_hunt_known28.py names them too)."""
    lin, x = signed_placement
    x[2] = nan
    index, w = torch.tensor([0, 2, 3]), torch.tensor([0.5, 0.0, 2.0], dtype=f64)
    assert math.isnan(signed_rows(lin(x), index, w).sum().item())
    assert gw.grad((lin(x)[index] * w[:, None]).sum(), [lin.weight])[0].isnan().any()  # built-in ops: kept
    assert gw.grad(signed_rows(lin(x), index, w).sum(), [lin.weight])[0].isnan().any()


def test_placement_count_overflow_on_finite_data_is_silent(signed_placement):
    """float32 weights 3e38: two kept elements on one row overflow its 0/1 count to Inf (and its value to Inf, as
    in PyTorch). No argument holds NaN/Inf and nothing was lost, yet an OpaqueBackwardWarning said the placement
    rule 'met NaN/Inf among its other arguments' (the check was `count.isfinite()`; a structural element meeting
    a NaN/Inf weight gives a NaN count, 0 x Inf, never an Inf one)."""
    lin, x = signed_placement
    lin, x = lin.float(), x.float()
    index, w = torch.tensor([0, 2, 2, 3]), torch.tensor([0.5, 3e38, 3e38, 2.0])

    def loss():
        return signed_rows(lin(x), index, w)[[1, 2, 3]].sum()  # row 0 discarded: structural zeros present

    exp = torch.autograd.grad(loss(), [lin.weight])[0]
    assert not exp.isfinite().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(loss(), [lin.weight])[0]
    assert torch.equal(got, exp)


# ---------------------------------------------------------------------------------------------------------------
# (b) _grouped_mm (mixture-of-experts experts): the CPU kernel takes float32, bfloat16, float16 (not float64)
# ---------------------------------------------------------------------------------------------------------------
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm: torch >= 2.8")
D = 8  # hidden size: the CPU kernel wants 16-byte strides


def _offs(groups: list[int], n_groups: int) -> torch.Tensor:
    return torch.tensor([sum(1 for g in groups if g <= e) for e in range(n_groups)], dtype=torch.int32)


def _moe(groups, kept, dtype=torch.float32, token_fill=None, expert_fill=None, experts_kept=None, transposed=False,
         backward=torch.autograd.grad, create_graph=False):
    """Tokens (sorted by expert, `groups[t]` each) through a linear layer and their experts; the loss reads the
    rows `kept`. `experts_kept`: the deletion reference, keeping those experts only (and the tokens `kept`)."""
    torch.manual_seed(0)
    n_groups = max(groups) + 1 if experts_kept is None else len(experts_kept)
    lin = nn.Linear(D, D).to(dtype)
    experts = torch.randn(max(groups) + 1 if experts_kept is None else 3, D, D, dtype=dtype)
    x = torch.randn(len(groups), D, dtype=dtype)
    coef = torch.randn(len(groups), D, dtype=dtype)
    for where, fill in (token_fill or {}).items():
        x[where] = fill
    for where, fill in (expert_fill or {}).items():
        experts[where] = fill
    if experts_kept is not None:  # the reference: the deleted tokens and experts never exist
        x, coef, experts = x[kept], coef[kept], experts[experts_kept]
        groups = [experts_kept.index(groups[t]) for t in kept]
        kept = list(range(len(kept)))
    experts.requires_grad_()
    ex = experts.transpose(-2, -1).contiguous().transpose(-2, -1) if transposed else experts
    out = torch._grouped_mm(lin(x), ex, offs=_offs(groups, n_groups))
    loss = (out[kept] * coef[kept]).tanh().sum()
    grads = backward(loss, [lin.weight, lin.bias, experts], create_graph=create_graph) if create_graph else \
        backward(loss, [lin.weight, lin.bias, experts])
    return grads


GROUPS = [0, 0, 0, 1, 1, 2, 2, 2]


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [GROUPS, [0, 0, 0, 2, 2, 2, 2, 2]], ids=["3groups", "empty-group"])
def test_grouped_mm_finite_is_pytorchs(dtype, transposed, groups):
    kept = [0, 2, 3, 5, 7]
    got = _moe(groups, kept, dtype, transposed=transposed, backward=gw.grad)
    for g, e in zip(got, _moe(groups, kept, dtype, transposed=transposed), strict=True):
        assert torch.equal(g, e)


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_nan_expert_only_discarded_tokens_reach(dtype, transposed):
    """Expert 1 is NaN and only the discarded tokens 3, 4 are routed to it: the deletion reference removes them and
    the expert (gradients of the others equal; the deleted expert's gradient is a structural zero)."""
    kept = [0, 1, 2, 5, 6, 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _moe(GROUPS, kept, dtype, expert_fill={1: nan}, transposed=transposed, backward=gw.grad)
    ref = _moe(GROUPS, kept, dtype, expert_fill={1: nan}, experts_kept=[0, 2], transposed=transposed)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    torch.testing.assert_close(got[2][[0, 2]], ref[2], **tol)
    assert torch.equal(got[2][1], torch.zeros_like(got[2][1]))


@needs_grouped_mm
def test_grouped_mm_nan_expert_a_kept_token_uses_stays_nan():
    kept = [0, 1, 2, 4, 5, 6, 7]  # token 4 (expert 1) is kept
    got = _moe(GROUPS, kept, expert_fill={1: nan}, backward=gw.grad)
    assert not got[0].isfinite().all() and not got[2][1].isfinite().all()


@needs_grouped_mm
def test_grouped_mm_nan_in_an_empty_experts_weight():
    """An expert no token is routed to (an empty group) holds NaN: PyTorch's gradients are finite already; with
    discarded NaN tokens too they equal the deletion reference."""
    groups, kept = [0, 0, 0, 2, 2, 2, 2, 2], [0, 2, 3, 5, 7]
    got = _moe(groups, kept, token_fill={1: nan, 4: nan}, expert_fill={1: nan}, backward=gw.grad)
    ref = _moe(groups, kept, experts_kept=[0, 2])
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][[0, 2]], ref[2], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2][1], torch.zeros_like(got[2][1]))


@needs_grouped_mm
def test_grouped_mm_3d_batched_form():
    """3d x 3d (no offsets): batch entry 1 is NaN padding the loss never reads."""
    torch.manual_seed(0)

    def grads(fill, backward, batch=(0, 1, 2)):
        lin = nn.Linear(D, D)
        a = torch.randn(3, 4, D)
        a[1] = fill
        b = torch.randn(3, D, 8, requires_grad=True)
        h = lin(a[list(batch)])
        out = torch._grouped_mm(h, b[list(batch)])
        loss = out[[i for i, e in enumerate(batch) if e != 1]].tanh().sum()
        return backward(loss, [lin.weight, lin.bias, b])

    torch.manual_seed(0)
    got = grads(nan, gw.grad)
    torch.manual_seed(0)
    ref = grads(nan, torch.autograd.grad, batch=(0, 2))  # deleted: entry 1 never exists
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)


def _second_order(fill, backward, compiled=False, dtype=torch.float32):
    """d/d(lin.weight) of the squared norm of the first gradients (create_graph=True) of the MoE loss."""
    torch.manual_seed(0)
    lin = nn.Linear(D, D).to(dtype)
    experts = torch.randn(3, D, D, dtype=dtype, requires_grad=True)
    x, coef = torch.randn(8, D, dtype=dtype), torch.randn(8, D, dtype=dtype)
    x[[1, 4]] = fill
    kept = [0, 2, 3, 5, 7]

    def f(x, w, b, e):
        return (torch._grouped_mm(x @ w.t() + b, e, offs=_offs(GROUPS, 3))[kept] * coef[kept]).tanh().sum()

    f = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
    first = backward(f(x, lin.weight, lin.bias, experts), [lin.weight, experts], create_graph=True)
    return backward(sum(t.square().sum() for t in first), [lin.weight, lin.bias, experts])


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_double_backward(dtype, compiled=False):
    """create_graph=True, the first gradients' norm differentiated again: the discarded tokens' fill changes
    nothing, so NaN under gradwise equals a finite fill under PyTorch. (Compiled with aot_eager, plain PyTorch
    cannot differentiate the first gradients again: not tried.)"""
    torch._dynamo.reset()
    got = _second_order(nan, gw.grad, compiled, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for fill in (0.5, 3.0):
        for g, e in zip(got, _second_order(fill, torch.autograd.grad, compiled, dtype), strict=True):
            torch.testing.assert_close(g, e, **tol)


@needs_grouped_mm
def test_grouped_mm_compiled_aot_eager():
    """torch.compile(backend="aot_eager") of a function calling _grouped_mm, under gw.strong_zeros() (bfloat16:
    torch's meta kernel for _grouped_mm takes no other dtype)."""
    torch._dynamo.reset()

    def run(fill, strong):
        torch.manual_seed(0)
        lin = nn.Linear(D, D).bfloat16()
        experts = torch.randn(3, D, D, dtype=torch.bfloat16, requires_grad=True)
        x, coef = torch.randn(8, D, dtype=torch.bfloat16), torch.randn(8, D, dtype=torch.bfloat16)
        x[[1, 4]] = fill
        kept = [0, 2, 3, 5, 7]

        @torch.compile(backend="aot_eager", fullgraph=True)
        def f(x, w, b, e):
            return (torch._grouped_mm(x @ w.t() + b, e, offs=_offs(GROUPS, 3))[kept] * coef[kept]).tanh().sum()

        if strong:
            with gw.strong_zeros():
                f(x, lin.weight, lin.bias, experts).backward()
        else:
            f(x, lin.weight, lin.bias, experts).backward()
        return lin.weight.grad, lin.bias.grad, experts.grad

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(nan, True)
    for fill in (0.5, 3.0):
        for g, e in zip(got, run(fill, False), strict=True):
            torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)
    for g, e in zip(run(0.5, True), run(0.5, False), strict=True):
        assert torch.equal(g, e)


@needs_grouped_mm
@pytest.mark.parametrize("fill", [math.inf, -math.inf])
def test_grouped_mm_inf_expert_weight_equals_the_deletion_reference(fill):
    """Expert 1 holds one +-Inf; its tokens are 3 (discarded) and 4 (kept): PyTorch's 0 x Inf of token 3 made NaN
    in lin's gradients; the kept token's Inf is genuine and stays, with the deletion reference's signs."""
    def run(backward, delete):
        torch.manual_seed(0)
        lin, experts = nn.Linear(D, D), torch.randn(3, D, D)
        experts[1, 2, 3] = fill
        experts.requires_grad_()
        x, coef, groups, kept = torch.randn(8, D), torch.randn(8, D), GROUPS, [0, 1, 2, 4, 5, 6, 7]
        if delete:
            x, coef, groups = x[kept], coef[kept], [GROUPS[t] for t in kept]
            kept = list(range(len(kept)))
        out = torch._grouped_mm(lin(x), experts, offs=_offs(groups, 3))
        return backward((out[kept] * coef[kept]).sum(), [lin.weight, lin.bias, experts])

    got, ref = run(gw.grad, False), run(torch.autograd.grad, True)
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g.isinf(), r.isinf())
        torch.testing.assert_close(g.nan_to_num(), r.nan_to_num(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (a) the 'linear' / 'product' families: an in-place op, and an output that is not pointwise
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("gwreview::mul_into_", mutates_args=("g",))
def mul_into_(g: torch.Tensor, v: torch.Tensor) -> None:
    g.mul_(v)


class _Gate(torch.autograd.Function):
    """h * cos(h) with cos(h) treated as a constant gate; the backward multiplies in place by a custom op."""

    @staticmethod
    def forward(ctx, h):
        ctx.gate = h.detach().cos()
        return h * ctx.gate

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        mul_into_(g, ctx.gate)
        return g


@pytest.mark.parametrize("family", ["linear", "product"])
def test_pointwise_family_on_an_in_place_op(family):
    """mul_into_(g, gate) writes g * gate into g and returns None: the families read `out.dtype` (AttributeError
    inside gradwise, on the base too). The padding row's NaN gate meets a structural zero of g in place."""
    def grads(fill, backward):
        torch.manual_seed(0)
        lin, x = nn.Linear(4, 3).double(), torch.randn(6, 4, dtype=f64)
        x[1] = fill
        return backward(_Gate.apply(lin(x))[[0, 2, 3]].sin().sum(), [lin.weight, lin.bias])

    handle = gw.register_rule(mul_into_, family)
    try:
        assert all(torch.equal(g, e) for g, e in zip(grads(0.5, gw.grad), grads(0.5, torch.autograd.grad),
                                                      strict=True))
        got = grads(nan, gw.grad)
    finally:
        handle.remove()
    for fill in (0.0, 3.0):
        for g, e in zip(got, grads(fill, torch.autograd.grad), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@torch.library.custom_op("gwreview::scale_cols", mutates_args=())
def scale_cols(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w


@torch.library.custom_op("gwreview::scale_cols_backward", mutates_args=())
def scale_cols_backward(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return g * w, (g * x).sum(0)


@scale_cols.register_fake
def _(x, w):
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


scale_cols.register_autograd(lambda ctx, g: scale_cols_backward(g, ctx.saved_tensors[1], ctx.saved_tensors[0]),
                             setup_context=_scale_setup)


def test_linear_family_on_an_op_with_a_reduced_output():
    """(g * w, (g * x).sum(0)): the second output is linear in g but not pointwise; the family expanded g's
    support to its shape (RuntimeError inside gradwise). It is now taken as fully supported, PyTorch's value (the
    padding row's 0 x NaN stays in w's gradient), named by an OpaqueBackwardWarning; the pointwise output keeps
    its rule, so lin's gradients equal the deletion reference."""
    def grads(fill, backward, rows=(0, 1, 2, 3)):
        torch.manual_seed(0)
        lin, x = nn.Linear(4, 3).double(), torch.randn(4, 4, dtype=f64)
        w = torch.randn(3, dtype=f64, requires_grad=True)
        x[1] = fill
        h = lin(x[list(rows)])
        return backward(scale_cols(h, w)[[i for i, r in enumerate(rows) if r != 1]].sin().sum(),
                        [lin.weight, lin.bias, w])

    handle = gw.register_rule(scale_cols_backward, "linear")
    try:
        with pytest.warns(gw.OpaqueBackwardWarning, match="scale_cols_backward.*not pointwise"):
            got = grads(nan, gw.grad)
        finite = grads(0.5, gw.grad)
    finally:
        handle.remove()
    ref = grads(nan, torch.autograd.grad, rows=(0, 2, 3))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    assert got[2].isnan().all()
    assert all(torch.equal(g, e) for g, e in zip(finite, grads(0.5, torch.autograd.grad), strict=True))


@needs_grouped_mm
@pytest.mark.parametrize("fill", [nan, math.inf, -math.inf])
def test_grouped_mm_discarded_output_columns(fill):
    """The loss reads output columns :5 only; the experts' columns 5: hold NaN/Inf (the sensitivity's structural
    zeros are whole columns). Reference: those columns finite (0 and 7: a value the loss never reads cannot change
    its gradient; deleting them would break the kernel's 16-byte strides)."""
    def run(fill, backward):
        torch.manual_seed(0)
        lin, experts = nn.Linear(D, D), torch.randn(3, D, D)
        experts[..., 5:] = fill
        x, coef = torch.randn(8, D), torch.randn(8, D)
        experts.requires_grad_()
        out = torch._grouped_mm(lin(x), experts, offs=_offs(GROUPS, 3))
        return backward((out[:, :5] * coef[:, :5]).tanh().sum(), [lin.weight, lin.bias, experts])

    assert not run(fill, torch.autograd.grad)[0].isfinite().all()  # PyTorch: 0 x NaN in lin's gradients
    got = run(fill, gw.grad)
    for finite in (0.0, 7.0):
        for g, e in zip(got, run(finite, torch.autograd.grad), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# (b) Hugging Face's fallback where torch._grouped_mm cannot run: compiled float32 experts take
# transformers::grouped_mm_fallback, whose backward is the custom op grouped_mm_fallback_backward
# ---------------------------------------------------------------------------------------------------------------
def _fallback_moe(backward, fill, expert_fill=None, delete=False, compiled=False):
    moe = pytest.importorskip("transformers.integrations.moe", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    lin, experts = nn.Linear(D, D), torch.randn(3, D, D)
    if expert_fill is not None:
        experts[1] = expert_fill  # only the discarded tokens 3, 4 are routed to expert 1
    experts.requires_grad_()
    x, coef, groups, kept = torch.randn(8, D), torch.randn(8, D), GROUPS, [0, 1, 2, 5, 6, 7]
    x[[3, 4]] = fill
    if delete:
        x, coef, groups = x[kept], coef[kept], [GROUPS[t] for t in kept]
        kept = list(range(len(kept)))
    offs = _offs(groups, 3)

    def f(x, w, b, e):  # compiled: HF's dispatcher picks the fallback (float32 under dynamo)
        mm = moe._grouped_mm if compiled else torch.ops.transformers.grouped_mm_fallback
        return (mm(x @ w.t() + b, e, offs=offs)[kept] * coef[kept]).tanh().sum()

    f = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
    return backward(f(x, lin.weight, lin.bias, experts), [lin.weight, lin.bias, experts])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "aot_eager"])
def test_hf_grouped_mm_fallback_drops_discarded_tokens(compiled):
    """Tokens 3, 4 (discarded) and their expert 1 hold NaN. Without a rule the NaN stayed in lin's and the
    experts' gradients (an OpaqueBackwardWarning named the op, eager; a CompiledBackwardWarning, compiled). Now:
    the deletion reference (the tokens deleted), expert 1's gradient a structural zero; finite data bitwise."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _fallback_moe(gw.grad, nan, nan, compiled=compiled)
    ref = _fallback_moe(torch.autograd.grad, nan, nan, delete=True, compiled=compiled)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2][[0, 2]], ref[2][[0, 2]], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2][1], torch.zeros_like(got[2][1]))
    for g, e in zip(_fallback_moe(gw.grad, 0.5, compiled=compiled),
                    _fallback_moe(torch.autograd.grad, 0.5, compiled=compiled), strict=True):
        assert torch.equal(g, e)


def test_hf_grouped_mm_fallback_control_nan_used():
    got = _fallback_moe(gw.grad, nan, delete=True)  # the NaN tokens are gone: finite
    assert all(t.isfinite().all() for t in got)
    moe = pytest.importorskip("transformers.integrations.moe", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    lin, experts = nn.Linear(D, D), torch.randn(3, D, D, requires_grad=True)
    x = torch.randn(8, D)
    x[4] = nan  # kept: genuine
    out = torch.ops.transformers.grouped_mm_fallback(lin(x), experts, _offs(GROUPS, 3))
    g = gw.grad(out[[0, 4, 5]].tanh().sum(), [lin.weight, experts])
    assert not g[0].isfinite().all() and not g[1][1].isfinite().all() and moe is not None
