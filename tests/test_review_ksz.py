"""Adversarial review of branch known_sz: addmm & co. with alpha=0 under strong zeros; aten binary_cross_entropy;
the cosine_similarity and gaussian_nll_loss ports. Float64 unless a test says otherwise.

References: plain PyTorch (bitwise, on finite paths), the program with the product term deleted, one-sided float64
finite differences of PyTorch's own function (the ports must match it, clamps included), F.binary_cross_entropy's
rule (for its aten routes).
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _kernel_reads

nan = float("nan")
f64 = torch.float64
_ADD_OPS = {"addmm": ((3, 4), (3, 5), (5, 4)), "addmv": ((3,), (3, 5), (5,)),
            "addbmm": ((6, 7), (2, 6, 8), (2, 8, 7)), "baddbmm": ((2, 8, 8), (2, 8, 8), (2, 8, 8))}


def _rand(*shape: int, seed: int, dtype: torch.dtype = f64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _operands(op: str, nan_in: int | None, dtype: torch.dtype = f64) -> list[torch.Tensor]:
    ts = [_rand(*s, seed=k, dtype=dtype) for k, s in enumerate(_ADD_OPS[op])]
    if nan_in is not None:
        ts[nan_in].view(-1)[1] = nan
    return [t.requires_grad_() for t in ts]


# -- (a) defects -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nan_in", [None, 2])
def test_zero_alpha_under_nonreentrant_checkpoint(nan_in):
    """addmm with alpha=0 inside checkpoint(use_reentrant=False): the rule read the node's saved operands a second
    time, through the checkpoint's unpack hook (CheckpointError: "Unpack is being triggered for a tensor that was
    already unpacked once"), even on a finite program. Now a hooked operand is not probed: PyTorch's gradient."""
    i, a, b = _operands("addmm", nan_in)

    def block(i, a):
        return torch.addmm(i, a * 2, b, alpha=0).sin()

    loss = checkpoint(block, i, a, use_reentrant=False).sum()
    plain = torch.autograd.grad(loss, [i, a], retain_graph=True)
    got = gw.grad(loss, [i, a])
    for g, p in zip(got, plain, strict=True):
        assert torch.equal(_bits(g.nan_to_num()), _bits(p.nan_to_num())) and torch.equal(g.isnan(), p.isnan())


def test_zero_alpha_probe_runs_once_per_layout(monkeypatch):
    """The NaN re-run of the forward op ran on every backward, once per operand (2 per addmm node: 0.16 s of a
    0.40 s backward for a 1024 x 1024 float32 addmm). Its answer depends on the layouts only: one re-run in all."""
    calls = []
    original = _kernel_reads.aten.addmm.default

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

    monkeypatch.setattr(_kernel_reads, "_SKIPS", {})
    entry = _kernel_reads.ZERO_ALPHA_PRODUCTS["AddmmBackward0"]
    monkeypatch.setitem(_kernel_reads.ZERO_ALPHA_PRODUCTS, "AddmmBackward0", (Counting(), *entry[1:]))
    i, a, b = _operands("addmm", 2)
    loss = torch.addmm(i, a, b, alpha=0).sum()
    for _ in range(3):
        ga, gb = gw.grad(loss, [a, b], retain_graph=True)
        assert not ga.any() and not gb.any()
    assert len(calls) == 1


# -- (a) attacks that pass -------------------------------------------------------------------------------------

FINITE_CASES = {
    "addmm": lambda i, a, b, al: torch.addmm(i, a, b, alpha=al),
    "addmm_beta0": lambda i, a, b, al: torch.addmm(i, a, b, alpha=al, beta=0),
    "addmm_bias_row": lambda i, a, b, al: torch.addmm(i[0], a, b, alpha=al),
    "addmm_transposed": lambda i, a, b, al: torch.addmm(i, b.t(), a.t(), alpha=al),
    "addmm_inplace_view": lambda i, a, b, al: (i * 1)[:2].addmm_(a[:2], b, alpha=al),
    "addmv_strided": lambda i, a, b, al: torch.addmv(i[:, 0], a[:, ::2], b[::2, 0], alpha=al),
}


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0, 0.0, -0.0, 1])
@pytest.mark.parametrize("case", list(FINITE_CASES))
def test_zero_alpha_finite_path_is_bitwise(case, alpha, dtype):
    """No NaN anywhere: gw.grad is torch.autograd.grad bit for bit (-0.0 included), no warning."""
    if case == "addmm_transposed":
        i, a, b = (_rand(4, 3, seed=0, dtype=dtype), _rand(3, 5, seed=1, dtype=dtype), _rand(5, 4, seed=2, dtype=dtype))
    else:
        i, a, b = (_rand(3, 4, seed=0, dtype=dtype), _rand(3, 5, seed=1, dtype=dtype), _rand(5, 4, seed=2, dtype=dtype))
    i, a, b = (t.requires_grad_() for t in (i, a, b))
    out = FINITE_CASES[case](i, a, b, alpha)
    loss = (out * _rand(*out.shape, seed=3, dtype=dtype)).sum()
    plain = torch.autograd.grad(loss, [i, a, b], retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gw.grad(loss, [i, a, b])
    for g, p in zip(got, plain, strict=True):
        assert torch.equal(_bits(g), _bits(p))


@pytest.mark.parametrize("shapes", [((1, 1), (1, 1), (1, 1)), ((3, 4), (3, 0), (0, 4)), ((0, 4), (0, 5), (5, 4)),
                                    ((), (3, 5), (5, 4)), ((3, 1), (3, 5), (5, 4))])
def test_zero_alpha_small_empty_broadcast(shapes):
    """1-element, empty and broadcast inputs: a NaN in b reaches no gradient (a gets exactly 0, i its own)."""
    i, a, b = (_rand(*s, seed=k) for k, s in enumerate(shapes))
    if b.numel():
        b[0, 0] = nan
    i, a, b = (t.requires_grad_() for t in (i, a, b))
    loss = torch.addmm(i, a, b, alpha=0).sum()
    (plain_i,) = torch.autograd.grad(loss, [i], retain_graph=True)
    gi, ga, gb = gw.grad(loss, [i, a, b])
    assert torch.equal(gi, plain_i) and not ga.any() and not gb.any()


@pytest.mark.parametrize("op", list(_ADD_OPS))
def test_genuine_nan_stays(op):
    """alpha != 0 with a NaN in b: the product is used; gradwise's gradients are PyTorch's, NaNs included."""
    i, a, b = _operands(op, 2)
    loss = getattr(torch, op)(i, a, b, alpha=0.5).sum()
    plain = torch.autograd.grad(loss, [i, a, b], retain_graph=True)
    assert not plain[1].isfinite().all()
    for g, p in zip(gw.grad(loss, [i, a, b]), plain, strict=True):
        assert torch.equal(g.isnan(), p.isnan()) and torch.equal(g.nan_to_num(), p.nan_to_num())


def _plain_under_trace(i, a, b):
    i, a, b = (t.detach().requires_grad_() for t in (i, a, b))
    with torch.enable_grad():
        loss = torch.addmm(i, a, b, alpha=0).square().sum()
        with gw.strong_zeros():
            return torch.autograd.grad(loss, (i, a, b))


@pytest.mark.filterwarnings("ignore::gradwise.PlainBackwardWarning")
@pytest.mark.parametrize("how", ["make_fx_real", "make_fx_fake", "make_fx_symbolic", "vmap_grad"])
def test_zero_alpha_under_tracing_runs_plain(how):
    """make_fx (real, fake, symbolic) and torch.func: no probe on traced values, no crash; PyTorch's numbers."""
    from torch.fx.experimental.proxy_tensor import make_fx
    i, a, b = (t.detach() for t in _operands("addmm", 2))
    if how == "vmap_grad":
        def g(i, a, b):
            with gw.strong_zeros():
                return torch.func.grad(lambda *x: torch.addmm(*x, alpha=0).square().sum(), argnums=(0, 1, 2))(i, a, b)
        # strong zeros follow vmap(grad), but the alpha fact reads the node's saved operands (wrappers there):
        # PyTorch's NaN stays, and is named
        with pytest.warns(gw.OpaqueBackwardWarning, match="AddmmBackward0 under a torch.func transform"):
            got = torch.func.vmap(g, in_dims=(None, 0, None))(i, torch.stack([a, a]), b)
        want = torch.func.vmap(torch.func.grad(lambda *x: torch.addmm(*x, alpha=0).square().sum(), argnums=(0, 1, 2)),
                               in_dims=(None, 0, None))(i, torch.stack([a, a]), b)
    else:
        got = make_fx(_plain_under_trace, tracing_mode=how.removeprefix("make_fx_"))(i, a, b)(i, a, b)
        ii, aa, bb = (t.clone().requires_grad_() for t in (i, a, b))
        want = torch.autograd.grad(torch.addmm(ii, aa, bb, alpha=0).square().sum(), (ii, aa, bb))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())


def test_zero_alpha_threads_agree():
    """Concurrent gw.grad calls (alpha=0 with a NaN operand, alpha=1) give the serial answers."""
    def work(k, out):
        i, a, b = _operands("addmm", 2 if k % 2 else None)
        loss = torch.addmm(i, a, b, alpha=0 if k % 2 else 1).sum()
        out[k] = [gw.grad(loss, [i, a, b], retain_graph=True) for _ in range(10)]
    serial, parallel = {}, {}
    for k in range(4):
        work(k, serial)
    threads = [threading.Thread(target=work, args=(k, parallel)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for gs, ps in zip(serial[k], parallel[k], strict=True):
            assert all(torch.equal(g, p) for g, p in zip(gs, ps, strict=True))


# -- (b) aten binary_cross_entropy routes agree with F.binary_cross_entropy's rule ----------------------------

_X = torch.tensor([[0.0, 1.0, 1e-20], [1 - 1e-16, 0.5, 1e-13], [0.3, 1.0, 0.0]], dtype=f64)
_Y = torch.tensor([[0.0, 1.0, 0.3], [0.2, 0.7, 0.9], [0.5, 0.1, 0.4]], dtype=f64)
_D = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 0.3, 1.0], [0.7, -0.2, 3.0]], dtype=f64)
_W = torch.tensor([0.5, 2.0, 1.5], dtype=f64)


@pytest.mark.parametrize("weight", [None, "row", "full"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("route", ["aten", "aten.default", "C._nn", "C._nn kw"])
def test_bce_aten_routes_match_functional(route, reduction, weight):
    w = {None: None, "row": _W, "full": _W.expand(3, 3).contiguous()}[weight]
    rn = {"none": 0, "mean": 1, "sum": 2}[reduction]
    call = {"aten": lambda v: torch.ops.aten.binary_cross_entropy(v, _Y, w, rn),
            "aten.default": lambda v: torch.ops.aten.binary_cross_entropy.default(v, _Y, w, rn),
            "C._nn": lambda v: torch._C._nn.binary_cross_entropy(v, _Y, w, rn),
            "C._nn kw": lambda v: torch._C._nn.binary_cross_entropy(v, _Y, weight=w, reduction=rn)}[route]
    ref = lambda v: F.binary_cross_entropy(v, _Y, w, reduction=reduction)
    assert torch.equal(gw.directional_derivative(call, _X, _D), gw.directional_derivative(ref, _X, _D))
    assert torch.equal(gw.generalized_grad(lambda v: call(v).sum(), (_X,))[0],
                       gw.generalized_grad(lambda v: ref(v).sum(), (_X,))[0])


# -- (c) the ports: one-sided finite differences at/around the clamps; bitwise away ------------------------

def _one_sided(f, xs, ds, h):
    with torch.no_grad():
        f0 = f(*xs)
        d1 = (f(*[x + h * d for x, d in zip(xs, ds, strict=True)]) - f0) / h
        d2 = (f(*[x + h / 2 * d for x, d in zip(xs, ds, strict=True)]) - f0) / (h / 2)
    return 2 * d2 - d1  # Richardson: the first-order error cancels


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("var_at", [1e-6, 5e-7, 2e-6, 0.0, 1.0, 3e-6])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gaussian_nll_var_direction(var_at, sign, full):
    """Elementwise (reduction none), var at, below, above eps and at 0: the port's one-sided derivative in var is
    that of PyTorch's own loss (its forward value is max(var, eps) already)."""
    if var_at == 0.0 and sign < 0:
        pytest.skip("var < 0 is outside the domain")
    inp, tgt = _rand(4, 3, seed=1), _rand(4, 3, seed=2)
    var = torch.full((4, 3), var_at, dtype=f64)
    dv = sign * (_rand(4, 3, seed=3).abs() + 0.5)
    f = lambda i, t, v: F.gaussian_nll_loss(i, t, v, full=full, reduction="none")
    zero = torch.zeros_like(inp)
    got = gw.directional_derivative(f, (inp, tgt, var), (zero, zero, dv))
    h = max(abs(var_at - 1e-6), 1e-6) * 1e-6
    assert torch.allclose(got, _one_sided(f, (inp, tgt, var), (zero, zero, dv), h), rtol=1e-5, atol=1e-3)
    for reduction in ("mean", "sum"):
        red = gw.directional_derivative(
            lambda i, t, v, r=reduction: F.gaussian_nll_loss(i, t, v, full=full, reduction=r), (inp, tgt, var),
            (zero, zero, dv))
        assert torch.allclose(red, got.mean() if reduction == "mean" else got.sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("var_shape", ["full", "homoscedastic", "column", "row", "float"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gaussian_nll_away_from_clamp_is_pytorchs(var_shape, reduction, dtype):
    inp, tgt = _rand(4, 3, seed=1, dtype=dtype), _rand(4, 3, seed=2, dtype=dtype)
    v = _rand(4, 3, seed=3, dtype=dtype).abs() + 0.1
    var = {"full": v, "homoscedastic": v[:, 0], "column": v[:, :1], "row": v[:1], "float": 0.7}[var_shape]
    xs = (inp, tgt) if var_shape == "float" else (inp, tgt, var)
    f = lambda *x: F.gaussian_nll_loss(*x, *((0.7,) if var_shape == "float" else ()), full=True,
                                       reduction=reduction).sum()
    leaves = [x.detach().requires_grad_() for x in xs]
    plain = torch.autograd.grad(f(*leaves), leaves)
    for g, p in zip(gw.generalized_grad(f, xs), plain, strict=True):
        assert torch.equal(_bits(g), _bits(p))


@pytest.mark.parametrize("dim", [1, -1, 0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosine_similarity_near_clamp(dim, seed):
    """eps = 0.5 (exact in binary) and vectors of norm 0, 0.15 (inside the clamp), exactly 0.5 (0.5 e_k: at the
    kink) and 1: the port's one-sided derivative is that of PyTorch's own value (a vector of norm 1e-8 up to an
    ulp is no test of the kink: the finite difference crosses it)."""
    x1, x2 = _rand(4, 4, seed=seed), _rand(4, 4, seed=seed + 10)
    vectors = x1.movedim(dim, -1)  # a view: the vectors the norm is taken over, one per row
    for k, norm in enumerate((0.0, 0.15, None, 1.0)):
        vectors[k] = torch.eye(4, dtype=f64)[seed] * 0.5 if norm is None else vectors[k] / vectors[k].norm() * norm
    d1, d2 = _rand(4, 4, seed=seed + 20), _rand(4, 4, seed=seed + 30)
    f = lambda a, b: F.cosine_similarity(a, b, dim=dim, eps=0.5)
    got = gw.directional_derivative(f, (x1, x2), (d1, d2))
    for sign in (1, -1):  # both sides of the kink
        got = gw.directional_derivative(f, (x1, x2), (sign * d1, d2))
        assert torch.allclose(got, _one_sided(f, (x1, x2), (sign * d1, d2), 1e-7), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4), 1), ((1, 4), (3, 4), -1), ((2, 3, 4), (2, 3, 4), 1),
                                    ((4,), (2, 4), 0)])
def test_cosine_similarity_away_from_clamp_is_pytorchs(shapes, dtype):
    s1, s2, dim = shapes
    a, b = _rand(*s1, seed=1, dtype=dtype), _rand(*s2, seed=2, dtype=dtype)
    f = lambda x, y: F.cosine_similarity(x, y, dim=dim).sum()
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    plain = torch.autograd.grad(f(*leaves), leaves)
    for g, p in zip(gw.generalized_grad(f, (a, b)), plain, strict=True):
        assert torch.equal(_bits(g), _bits(p))
