"""Property: on finite programs strong zeros change nothing; gw.grad equals torch.autograd.grad exactly.

Programs are random chains of steps over a (rows, cols) tensor: unary elementwise ops, broadcasting binary ops
with a second input, matmul (and bilinear, a triangular solve, cdist), slicing/indexing, where/masked_fill,
reductions broadcast back, and the kink ops (relu, abs, max, clamp, sort, ...). Inputs mix random values with
0, +-1 and repeated values, so that kinks and ties are hit. Deterministic in CI (``derandomize=True``).
"""
from __future__ import annotations

import contextlib
import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import gradwise as gw
from _opdb import same
from gradwise._strong_zeros import _engine

# Each step maps (h, x, w) -> a new h of h's shape; x has h's shape, w is (cols, cols).
STEPS = {
    # unary elementwise (kinks at 0 for relu/abs/clamp/hardtanh/leaky_relu; zero gradient for floor/round)
    "relu": lambda h, x, w: torch.relu(h),
    "abs": lambda h, x, w: h.abs(),
    "tanh": lambda h, x, w: torch.tanh(h),
    "sin": lambda h, x, w: torch.sin(h),
    "sigmoid": lambda h, x, w: torch.sigmoid(h),
    "square": lambda h, x, w: h * h,
    "exp": lambda h, x, w: torch.exp(h.clamp(max=5)),
    "log1p_abs": lambda h, x, w: torch.log1p(h.abs()),
    "sqrt_1p": lambda h, x, w: torch.sqrt(h * h + 1),
    "floor": lambda h, x, w: torch.floor(h) + h,
    "round": lambda h, x, w: torch.round(h) * x,
    "clamp": lambda h, x, w: h.clamp(-1, 1),
    "hardtanh": lambda h, x, w: F.hardtanh(h),
    "leaky_relu": lambda h, x, w: F.leaky_relu(h, 0.1),
    # binary with broadcasting
    "add": lambda h, x, w: h + x,
    "mul": lambda h, x, w: h * x,
    "sub_row": lambda h, x, w: h - x[:1],
    "mul_col": lambda h, x, w: h * x[:, :1],
    "div": lambda h, x, w: h / (x * x + 1),
    "maximum": lambda h, x, w: torch.maximum(h, x),
    "minimum_row": lambda h, x, w: torch.minimum(h, x[-1:]),
    # matmul
    "matmul": lambda h, x, w: h @ w,
    "linear": lambda h, x, w: F.linear(h, w, x[0]),
    "bilinear": lambda h, x, w: F.bilinear(h, x, w.expand(w.shape[0], -1, -1)),
    "solve_triangular": lambda h, x, w: torch.linalg.solve_triangular(
        w.tril() + 4 * torch.eye(w.shape[0], dtype=w.dtype), h.mT, upper=False).mT,
    "cdist": lambda h, x, w: torch.cdist(h, x) @ h,
    "xlogy": lambda h, x, w: torch.xlogy(h, x * x + 1),
    # slicing / indexing
    "roll": lambda h, x, w: torch.cat([h[1:], h[:1]]),
    "flip": lambda h, x, w: h.flip(1),
    "gather_rows": lambda h, x, w: h[torch.arange(h.shape[0]).flip(0) // 2 * 2 % h.shape[0]],
    "index_cols": lambda h, x, w: h[:, torch.zeros(h.shape[1], dtype=torch.long)] + h,
    "slice_pad": lambda h, x, w: F.pad(h[:, 1:], (0, 1)),
    "scatter_max": lambda h, x, w: torch.zeros_like(h).scatter(1, x.argsort(1), h),
    # where / masks
    "where_gt": lambda h, x, w: torch.where(h > x, h, x),
    "where_const": lambda h, x, w: torch.where(x > 0, h, 0.0),
    "masked_fill": lambda h, x, w: h.masked_fill(h > 0.5, 0.0),
    # reductions (broadcast back)
    "sum_row": lambda h, x, w: h.sum(1, keepdim=True) * h,
    "mean_col": lambda h, x, w: h - h.mean(0, keepdim=True),
    "max_dim": lambda h, x, w: h.max(1, keepdim=True).values + h,
    "amax_all": lambda h, x, w: h.amax() * x,
    "min_all": lambda h, x, w: h.min() + h,
    "softmax": lambda h, x, w: torch.softmax(h, 1),
    "log_softmax": lambda h, x, w: torch.log_softmax(h, 0),
    "logsumexp": lambda h, x, w: torch.logsumexp(h, 1, keepdim=True) - h,
    "sort": lambda h, x, w: h.sort(1).values,
    "cumsum": lambda h, x, w: h.cumsum(0),
    "norm_rows": lambda h, x, w: h / (h.norm(dim=1, keepdim=True) + 1),
}

SPECIAL = [0.0, 1.0, -1.0, 0.5, 2.0]


@st.composite
def programs(draw, steps=STEPS, nonfinite=False):
    """(step names, (h, x, w), cotangent); with ``nonfinite``, up to two NaN/Inf entries per input."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(2 if nonfinite else 1, 4))
    value = st.one_of(st.sampled_from(SPECIAL), st.floats(-3, 3, allow_nan=False, width=32))

    def tensor(*shape):
        n = math.prod(shape)
        t = torch.tensor(draw(st.lists(value, min_size=n, max_size=n)), dtype=dtype).reshape(shape)
        for i in draw(st.lists(st.integers(0, n - 1), max_size=2)) if nonfinite else ():
            t.view(-1)[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return t

    h, x, w = tensor(rows, cols), tensor(rows, cols), tensor(cols, cols)
    names = draw(st.lists(st.sampled_from(sorted(steps)), min_size=1, max_size=5 if nonfinite else 6))
    cotangent = torch.randn(rows, cols, dtype=dtype) if nonfinite else tensor(rows, cols)
    return names, (h, x, w), cotangent


def _run(steps, inputs, table=STEPS):
    h, x, w = (t.clone().requires_grad_() for t in inputs)
    out = h
    for name in steps:
        out = table[name](out, x, w)
    return out, (h, x, w)


def _forced():
    """Force the strong-zero pass even on finite data (gw.grad would otherwise run plain PyTorch)."""
    return mock.patch.object(_engine, "_plan", lambda *args, **kwargs: "strong")


@settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.booleans())
def test_strong_zeros_change_nothing_on_finite_programs(program, forced):
    steps, inputs, cotangent = program
    out, leaves = _run(steps, inputs)
    assume(bool(out.isfinite().all()))
    ref = torch.autograd.grad(out, leaves, cotangent, retain_graph=True, allow_unused=True)
    assume(all(g is None or bool(g.isfinite().all()) for g in ref))
    with _forced() if forced else contextlib.nullcontext():
        got = gw.grad(out, leaves, cotangent, allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        assert same(g, r), (steps, g, r)


@settings(derandomize=True, max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_strong_zeros_context_equals_backward(program):
    """``with gw.strong_zeros(): loss.backward()`` accumulates what torch's backward does on finite data."""
    steps, inputs, cotangent = program
    out, leaves = _run(steps, inputs)
    assume(bool(out.isfinite().all()))
    ref = torch.autograd.grad(out, leaves, cotangent, retain_graph=True, allow_unused=True)
    assume(all(g is None or bool(g.isfinite().all()) for g in ref))
    with gw.strong_zeros():
        out.backward(cotangent)
    for leaf, r in zip(leaves, ref, strict=True):
        assert same(leaf.grad, r), (steps, leaf.grad, r)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from([torch.float32, torch.float64]),
                          st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=6)),
                max_size=5))
def test_all_finite_proves_every_entry_finite(tensors):
    """gradwise._masks.all_finite (the finiteness test by sums of saved tensors, inputs and gradients): True only
    where every entry of every tensor is finite, and True there unless a sum of finite values overflows (then the
    callers' exact test decides)."""
    from gradwise._masks import all_finite

    ts = [torch.tensor(values, dtype=dtype) for dtype, values in tensors]
    finite = all(bool(torch.isfinite(t).all()) for t in ts)
    fits = finite and sum(float(t.double().abs().sum()) for t in ts) < 1e38  # no partial sum can overflow
    got = all_finite(ts)
    assert not got or finite
    assert got or not fits


# Steps whose output has several consumers of one tensor: pieces of a split, unbind, select or slice that together
# read everything (or not), and residual connections. The plan reads saved tensors only where a structural zero can
# reach them (_planning._zero_reach); where it reads nothing, plain PyTorch must already be what strong zeros give.
FAN_STEPS = {
    **{name: STEPS[name] for name in ("matmul", "linear", "mul", "square", "sin", "relu", "where_const", "add")},
    "residual_relu": lambda h, x, w: h + torch.relu(h @ w),
    "chunk_all": lambda h, x, w: torch.cat(h.tanh().chunk(2, 1)[::-1], 1) if h.shape[1] % 2 == 0 else h,
    "split_one": lambda h, x, w: h.split([1, h.shape[1] - 1], 1)[1] @ w[1:],
    "unbind_all": lambda h, x, w: torch.stack([r.sin() for r in h.unbind(0)][::-1]),
    "select_all": lambda h, x, w: torch.stack([h[i] * (i + 1) for i in range(h.shape[0])]),
    "select_first": lambda h, x, w: torch.stack([h[0]] * h.shape[0]),
    "slices_overlap": lambda h, x, w: F.pad(h[:, 1:], (0, 1)) + F.pad(h[:, :-1], (1, 0)),
    "slices_strided": lambda h, x, w: torch.stack([h[:, ::2].sum(1), h[:, 1::2].sum(1)], 1) @ w[:2],
    "select_sliced": lambda h, x, w: torch.stack([h[0][:1].expand(h.shape[1])] + [h[i] for i in range(1, h.shape[0])]),
}


def _nan_at(row, col):
    h = torch.arange(9.0, dtype=torch.float64).reshape(3, 3) / 4 - 1
    h[row, col] = math.nan
    return h, h.flip(0) + 0.5, h.flip(1).nan_to_num(2.0)


@settings(derandomize=True, max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(FAN_STEPS, nonfinite=True))
# a NaN row below what discards it (one select read three times; a split's unused piece; a select whose pick is
# sliced again above, so its pick does not stand for its zeros)
@example((["matmul", "select_first"], _nan_at(1, 1), torch.ones(3, 3, dtype=torch.float64)))
@example((["matmul", "split_one"], _nan_at(1, 0), torch.ones(3, 3, dtype=torch.float64)))
@example((["matmul", "select_sliced"], _nan_at(0, 1), torch.ones(3, 3, dtype=torch.float64)))
def test_the_plan_skips_strong_zeros_only_where_they_change_nothing(program):
    """gw.grad as planned (plain PyTorch wherever no structural zero can meet a NaN/Inf) equals the strong-zero
    pass forced on every backward, NaN for NaN, on programs with NaN/Inf inputs."""
    steps, inputs, cotangent = program
    out, leaves = _run(steps, inputs, FAN_STEPS)
    got = gw.grad(out, leaves, cotangent, allow_unused=True, retain_graph=True)
    with _forced():
        ref = gw.grad(out, leaves, cotangent, allow_unused=True)
    for g, r in zip(got, ref, strict=True):
        assert same(g, r), (steps, g, r)

