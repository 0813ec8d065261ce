"""Hunt for wrong answers in the nonsmooth calculus, third round: PyTorch's op database moved onto its kinks
(tests/_kink_sweep.py), and the defects it found. References: float64 one-sided differences at several steps
(converging, or not: a jump) and the programs themselves, never a formula derived by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _kink_sweep as ks
import gradwise as gw
from gradwise import NonsmoothError

pytestmark = pytest.mark.filterwarnings(r"ignore:index_reduce\(\) is in beta:UserWarning")

D = torch.float64
STEPS = (1e-5, 1e-6, 1e-7)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """op_db's tiny samples: intra-op threads only wait on each other. On a busy 2-core machine lu's sweep ran
    8.4 s with two threads and 0.8 s with one (as in test_opdb)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def t(*v):
    return torch.tensor(v, dtype=D)


def one_sided(f, xs, ds):
    """(f(x + s d) - f(x)) / s in float64 at STEPS, for a tuple of inputs."""
    with torch.no_grad():
        return [(f(*[x + s * d for x, d in zip(xs, ds, strict=True)]) - f(*xs)) / s for s in STEPS]


def assert_exact(f, xs, ds):
    got = gw.directional_derivative(f, xs, ds)
    torch.testing.assert_close(got, one_sided(f, xs, ds)[-1], atol=1e-5, rtol=1e-5)


def assert_jumps(f, xs, ds):
    ref = one_sided(f, xs, ds)
    assert ((ref[-1].abs() > 50 * ref[0].abs()) & (ref[-1].abs() > 1e3)).any()  # f(x + s d) - f(x) does not
    # shrink with s: a jump
    with pytest.raises(NonsmoothError):
        gw.directional_derivative(f, xs, ds)


# -- round(x, decimals=k) ----------------------------------------------------------------------------------

ROUND_JUMPS = {"decimals=0 at 2.5": (0, 2.5), "decimals=2 at 0.125 (x 100 = 12.5)": (2, 0.125),
               "decimals=-3 at 500": (-3, 500.0), "decimals=1 at 0.25": (1, 0.25),
               "decimals=-1 at -35": (-1, -35.0)}  # (half to even: x moving up jumps)


@pytest.mark.parametrize("name", list(ROUND_JUMPS))
def test_round_with_decimals_jumps_at_scaled_half_integers(name):
    """torch.round(x, decimals=k) was kept as PyTorch's (derivative 0) on the claim that its jumps are not floats:
    they are (k = 0: every half-integer; 0.125 at k = 2; 500 at k = -3). directional_derivative returned 0 where f
    jumps (silent). Now: the step rule on the scaled x, an error at a jump, exact where the jumps cancel."""
    k, x0 = ROUND_JUMPS[name]
    x, d = t(x0, 0.3), t(1.0, 1.0)
    assert_jumps(lambda v: torch.round(v, decimals=k), (x,), (d,))
    cancel = lambda v: torch.round(v, decimals=k) + torch.round(-v, decimals=k) + v  # (half to even: odd)
    for s in (1.0, -1.0):
        assert_exact(cancel, (x,), (s * d,))


def test_round_with_decimals_away_from_its_jumps_is_pytorchs():
    x = t(0.3, 1.234, -7.77).requires_grad_(True)
    f = lambda v: (torch.round(v, decimals=2) * v).sum()
    assert torch.equal(gw.generalized_grad(f, x)[0], torch.autograd.grad(f(x), x)[0])
    assert torch.equal(gw.directional_derivative(lambda v: torch.round(v, decimals=1), x.detach(), t(1, 1, 1)),
                       torch.zeros(3, dtype=D))


# -- reflected remainder and watched jump ops ------------------------------------------------------------------


def test_reflected_remainder_at_a_multiple():
    """``Tensor.__rmod__`` (``7.0 % b``, ``b.__rmod__(a)``) had no route; its watch tested only whether the first
    argument moved, against a mask of another shape: at -7 % 1 with the divisor moving down it returned -0.27
    where f jumps (silent). Now the remainder rule, reflected."""
    xs, ds = (t(-7.0), t(1.0)), (t(0.759), t(-0.1471))
    assert_jumps(lambda a, b: b.__rmod__(a), xs, ds)
    assert_jumps(lambda b: 7.0 % b, (t(1.0),), (t(1.0),))  # (7 / (1 + s) floors to 6)
    assert_exact(lambda b: 7.5 % b, (t(2.0, 3.0),), (t(1.0, -1.0),))  # no multiple: PyTorch's slope
    assert_exact(lambda b: torch.floor(7.0 / b) * b + 7.0 % b, (t(7.0, 3.5),), (t(1.0, -1.0),))  # = 7


def test_a_watched_jump_op_whose_other_argument_moves():
    """searchsorted(b, x) runs watched (no rule): the watch counted a jump only where its *first* argument moved.
    With x on a boundary held still and the boundaries moving down, f jumps and gradwise returned 0 (silent)."""
    f = lambda x, b: torch.searchsorted(b, x).to(D) + x
    xs = (t(1.0), t(1.0, 2.0))
    assert_jumps(f, xs, (t(0.0), t(-1.0, 0.0)))
    assert_exact(f, (t(1.5), t(1.0, 2.0)), (t(1.0), t(0.0, 1.0)))  # on no boundary: exact


# -- smooth ops whose forward mode PyTorch lacks or gets wrong --------------------------------------------------

IDX = torch.tensor([0, 0, 1])


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("call", ["scatter_reduce prod", "index_reduce prod", "index_reduce mean"])
def test_scatter_style_reductions_have_their_tangents(call, include_self):
    """scatter_reduce(..., 'prod'): PyTorch 2.13's forward mode gives a zero tangent (torch.func.jvp too), so
    directional_derivative returned 0 (silent; 0.82 by differences in the op_db sample). index_reduce (prod, mean)
    has no forward mode: a NotImplementedError escaped. Now the tangent is from PyTorch's reverse pass."""
    name, reduce = call.split()
    f = lambda x, s: getattr(x, name)(0, IDX, s, reduce, include_self=include_self)
    xs, ds = (t(2.0, 0.0, 5.0, 1.0), t(7.0, 0.0, 3.0)), (t(0.5, -1.0, 0.3, 2.0), t(-0.7, 0.4, 1.1))
    assert_exact(f, xs, ds)
    w = t(1.0, -2.0, 0.5, 3.0)
    leaves = tuple(x.clone().requires_grad_(True) for x in xs)
    want = torch.autograd.grad((f(*leaves) * w).sum(), leaves)
    for g, e in zip(gw.generalized_grad(lambda *a: (f(*a) * w).sum(), xs), want, strict=True):
        assert torch.equal(g, e)  # no kink: PyTorch's reverse pass, bit for bit


PROD_AT_ZEROS = {"two zeros among sources": (t(2.0, 4.0, 5.0, 1.0), t(0.0, 0.0, 3.0)),
                 "a zero in self and one in src": (t(0.0, 4.0, 5.0, 1.0), t(0.0, 2.0, 3.0)),
                 "three zeros": (t(0.0, 4.0, 5.0, 1.0), t(0.0, 0.0, 0.0))}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("name", ["scatter_reduce", "index_reduce"])
@pytest.mark.parametrize("case", list(PROD_AT_ZEROS))
def test_products_with_several_zeros_in_one_destination(case, name, include_self, inplace):
    """scatter_reduce/index_reduce 'prod' with two or more zeros in one destination (a smooth point: each
    partial derivative is the product of the others, 0 or one nonzero product). The tangent came from PyTorch's
    double backward, which refuses there: a RuntimeError escaped directional_derivative. The in-place variants
    ran the reverse pass in place on a leaf: a RuntimeError. Now: first-order partials, spread by the index."""
    x, s = PROD_AT_ZEROS[case]
    ds = (t(0.5, -1.0, 0.3, 2.0), t(-0.7, 0.4, 1.1))
    w = t(1.0, -2.0, 0.5, 3.0)
    if inplace:
        f = lambda x, v: (getattr(x.clone(), name + "_")(0, IDX, v, "prod", include_self=include_self) * w).sum()
    else:
        f = lambda x, v: (getattr(x, name)(0, IDX, v, "prod", include_self=include_self) * w).sum()
    assert_exact(f, (x, s), ds)
    assert_exact(f, (x, s), tuple(-d for d in ds))


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("dim", [0, 1])
def test_product_scatter_with_an_index_smaller_than_src(dim, include_self):
    """scatter_reduce(..., 'prod') reads only src's corner of index's shape; PyTorch's reverse pass fails on the
    larger src (a RuntimeError on sizes), and the tangent taken from it escaped directional_derivative."""
    g = torch.Generator().manual_seed(3)
    x, dx = torch.randn(3, 3, generator=g, dtype=D), torch.randn(3, 3, generator=g, dtype=D)
    s, dsrc = torch.randn(2, 4, generator=g, dtype=D), torch.randn(2, 4, generator=g, dtype=D)
    s[0, :2] = 0.0
    index = torch.tensor([[0, 0], [2, 0]]) if dim == 0 else torch.tensor([[0, 0], [2, 2]])
    f = lambda x, v: x.scatter_reduce(dim, index, v, "prod", include_self=include_self)
    assert_exact(f, (x, s), (dx, dsrc))


@pytest.mark.parametrize("mode", ["sum", "mean", "sum with per_sample_weights", "mean with padding_idx"])
def test_embedding_bag_has_its_tangent(mode):
    """F.embedding_bag (sum, mean) has no forward mode in PyTorch: a NotImplementedError escaped
    directional_derivative. Its tangent is the op on the tangents (bilinear in weight, per_sample_weights)."""
    g = torch.Generator().manual_seed(0)
    w, dw = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D)
    p, dp = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    idx, off = torch.tensor([1, 2, 4, 4, 0]), torch.tensor([0, 2])
    if mode == "sum with per_sample_weights":
        assert_exact(lambda w, p: F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=p), (w, p), (dw, dp))
    else:
        kw = {"padding_idx": 4} if "padding" in mode else {}
        assert_exact(lambda w: F.embedding_bag(idx, w, off, mode=mode.split()[0], **kw), (w,), (dw,))


def test_embedding_bag_max_with_padding_idx_is_not_bilinear():
    """F.embedding_bag(mode='max', padding_idx=...) went through the sum/mean path, whose tangent is the op on
    the tangents: the max of the tangents, not the tangent of the max row (silent: -0.84 where differences give
    -2.10 in the op_db sample). Now it is not given a number."""
    w, dw = t(0.0, 1.0, 2.0, 3.0).reshape(4, 1), t(5.0, 3.0, 0.5, 0.0).reshape(4, 1)
    f = lambda w: F.embedding_bag(torch.tensor([1, 2, 3]), w, torch.tensor([0]), mode="max", padding_idx=3)
    try:
        got = gw.directional_derivative(f, (w,), (dw,))
    except (NonsmoothError, NotImplementedError):
        return
    torch.testing.assert_close(got, one_sided(f, (w,), (dw,))[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["scatter_reduce", "index_reduce"])
@pytest.mark.parametrize("reduce", ["amax", "amin"])
def test_max_reductions_without_self_where_self_equals_the_result(name, reduce):
    """scatter_reduce/index_reduce amax/amin with include_self=False, where a destination's own value equals its
    result (3 among sources [1, 3]): no tie, f is smooth with slope 1 in src[1], yet PyTorch's backward counts the
    unused self as a tied candidate and gives src[1] 1/2; generalized_grad returned that (silent). Reference: the
    one-sided differences, both signs (f is smooth there)."""
    s = 1.0 if reduce == "amax" else -1.0
    x, src, w = s * t(3.0, 5.0), s * t(1.0, 3.0), t(1.0, 2.0)
    f = lambda x, v: (getattr(x, name)(0, torch.tensor([0, 0]), v, reduce, include_self=False) * w).sum()
    g = gw.generalized_grad(f, (x, src))
    eye = torch.eye(2, dtype=D)
    for i in range(2):
        for sign in (1.0, -1.0):
            ref = one_sided(f, (x, src), (torch.zeros(2, dtype=D), sign * eye[i]))[-1]
            assert float(g[1][i]) * sign == pytest.approx(float(ref), abs=1e-5)
    assert torch.equal(g[0], t(0.0, 2.0))


@pytest.mark.parametrize("reduce", ["amax", "amin"])
def test_index_reduce_of_one_element(reduce):
    """index_reduce on 0-dim tensors (an op_db sample): the amax/amin rule built a shape from src.dim() and
    crashed (IndexError). Ties between the element and its source included."""
    f = lambda x, s: x.index_reduce(0, torch.tensor([0]), s, reduce, include_self=True)
    for xv, sv in [(1.0, 1.0), (1.0, 2.0)]:
        for d in [(1.0, -1.0), (-1.0, 1.0)]:
            assert_exact(f, (t(xv)[0], t(sv)[0]), (t(d[0])[0], t(d[1])[0]))


# -- order statistics and losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["kthvalue dim 1", "topk dim 0", "median dim 1", "median of a 0-dim",
                                  "kthvalue of a 0-dim"])
def test_order_statistics_along_an_inner_dim(call):
    """kthvalue/topk along a dim other than the last, with ties: the sort of the moved dim returned the input's
    strides and the lock wrote through perm.view(-1, m): RuntimeError. median(x, 0) of a 0-dim x: IndexError."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (4, 5, 3), generator=g).to(D)
    d = torch.randn(4, 5, 3, generator=g, dtype=D)
    f = {"kthvalue dim 1": lambda v: torch.kthvalue(v, 2, 1).values,
         "topk dim 0": lambda v: torch.topk(v, 2, 0).values,
         "median dim 1": lambda v: torch.median(v, 1).values,
         "median of a 0-dim": lambda v: torch.median(v[0, 0, 0], 0, keepdim=True).values * v.sum(),
         "kthvalue of a 0-dim": lambda v: torch.kthvalue(v[0, 0, 0], 1, 0, keepdim=True).values * v.sum()}[call]
    assert_exact(f, (x,), (d,))
    assert gw.directional_derivative(f, x, d).shape == f(x).shape


@pytest.mark.parametrize("q", [0.0, 1.0])
def test_quantile_with_a_moving_q_at_its_ends(q):
    """torch.quantile with q an input at q = 1: ceil of the rank took its limit along the direction, one past the
    last order statistic, and the port's gather crashed (IndexError). At the ends the lerp's weight on that side
    is 0: the end order statistic, as at q = 0 moving down (the differences from inside the range agree)."""
    x, qs = t(-3.0, 0.0, 2.0), t(q)
    f = lambda x, q: torch.quantile(x, q)
    inward = -1.0 if q == 1.0 else 1.0
    assert_exact(f, (x, qs), (t(0.5, -1.0, 2.0), t(inward)))
    got = gw.directional_derivative(f, (x, qs), (t(0.5, -1.0, 2.0), t(-inward)))
    assert float(got) == pytest.approx(2.0 if q == 1.0 else 0.5)  # the end statistic's own tangent


def test_hinge_embedding_loss_jumps_where_its_target_leaves_a_label():
    """hinge_embedding_loss masks its terms with y == 1 and y == -1, read inside the rule: with a target that
    moves (an op_db sample differentiates it), the loss jumps off +-1 (both terms then), and gradwise returned
    a derivative (silent). Now the comparison rule decides: an error; a target that is no input is exact."""
    x, y = t(8.5, 3.5, -0.5, 7.5), t(-1.0, -1.0, 1.0, 1.0)
    f = lambda x, y: F.hinge_embedding_loss(x, y, margin=2.0, reduction="none")
    assert_jumps(f, (x, y), (t(1, 1, 1, 1), t(1.0, 0.0, 0.0, 0.0)))
    for s in (1.0, -1.0):
        assert_exact(lambda v: F.hinge_embedding_loss(v, y, margin=4.0, reduction="none"), (x,), (s * t(1, 1, 1, 1),))


def test_cosine_embedding_loss_with_a_target_in_the_pass():
    """The cosine_embedding_loss port called PyTorch's op for its checks with the target as given: a target in
    gradwise's pass came back to the port, RecursionError. A moving target's labels jump: an error."""
    a, b = t(1.0, 2.0, -1.0, 0.5).reshape(2, 2), t(0.5, -1.0, 2.0, 1.0).reshape(2, 2)
    y = t(1.0, -1.0)
    f = lambda a, y: F.cosine_embedding_loss(a, b, y, margin=-0.2, reduction="none")
    assert_jumps(f, (a, y), (torch.ones(2, 2, dtype=D), t(0.5, 0.0)))
    assert_exact(lambda a: f(a, y), (a,), (torch.ones(2, 2, dtype=D),))


# -- the sweep ---------------------------------------------------------------------------------------------------

# exact where one-sided differences at steps >= 5e-7 cannot show it: the clamp below which the value is taken
# lies far below those steps, so the differences look like a jump (or an infinite slope) and gradwise's exact
# one-sided derivative disagrees with them
STEEP = {
    "nn.functional.binary_cross_entropy": "log clamped at -100: at x = 0 a moving target's slope is 100 y' "
                                          "(x' t < e^-100), the differences see y' log(x' t)",
    "nn.functional.normalize": "x / max(||x||, eps) at x = 0: the slope d / eps (1e12 d) holds for t < eps",
    "nn.functional.poisson_nll_loss": "log(x + eps), eps = 1e-8, at x = 0 (log_input=False): the slope 1 - t / eps "
                                      "(1e8) holds for steps below eps, the differences see log's curve",
    "nn.functional.gaussian_nll_loss": "var clamped at eps = 1e-6 (in place, under no_grad): at var = 0 the loss is "
                                       "(x - t)^2 / eps for steps below eps, the differences see 1 / var unclamped",
}
# a fast subset for CI, one op per rule family
FAST = ["abs", "clamp", "clamp_min", "maximum", "fmax", "max.reduction_with_dim", "amax", "cummax", "sort", "topk",
        "kthvalue", "median", "mode", "nn.functional.relu", "nn.functional.hardtanh", "nn.functional.hardswish",
        "nn.functional.leaky_relu", "nn.functional.prelu", "nn.functional.softshrink", "nn.functional.hardshrink",
        "nn.functional.threshold", "nn.functional.max_pool2d", "nn.functional.adaptive_max_pool1d", "floor",
        "round.decimals_3", "remainder", "__rmod__", "fmod", "div.floor_rounding", "sign", "copysign", "frac",
        "linalg.vector_norm", "dist", "cdist", "nn.functional.pairwise_distance", "scatter_reduce.prod",
        "scatter_reduce.amax", "index_reduce.mean", "nn.functional.embedding_bag", "nn.functional.hinge_embedding_loss",
        "nn.functional.multi_margin_loss", "nn.functional.cosine_embedding_loss", "quantile", "aminmax"]


def _check_sweep(name: str, **kw) -> ks.SweepResult:
    if name in STEEP:
        pytest.skip(STEEP[name])
    r = ks.sweep_op(ks.op_by_id(name), **kw)
    assert not r.failures, "\n".join(r.failures[:20])
    return r


@pytest.mark.parametrize("name", FAST)
def test_kink_sweep_fast(name):
    """Two op_db samples per op, quantized onto their kinks: gradwise's one-sided derivative agrees with the
    differences, or refuses; never a number where f jumps, never a crash."""
    r = _check_sweep(name, limit=2, grids=(0.5,), n_gauss=2, n_int=1)
    assert r.counts["directions"] > 0


def test_kink_sweep_refuses_nan_inputs():
    """nanmean's op_db samples with a NaN input: the sweep counted gradwise's refusal ("inputs[0] holds 1 NaN/Inf
    value(s) ... gradwise does not invent one", the API contract) as a crash, so test_kink_sweep_full failed (since
    session 30). Each such sample must meet exactly that refusal; a number or another exception fails."""
    r = ks.sweep_op(ks.kink_ops()["nanmean"], limit=None, grids=(0.5,), n_gauss=1, n_int=0)
    assert r.counts["sample with NaN/Inf input"] > 0
    assert r.counts["refused: non-finite input"] == r.counts["sample with NaN/Inf input"]
    assert not r.failures, r.failures


def test_kink_sweep_svd_every_sample():
    """svd's samples read the singular vectors through abs; on quantized matrices entries that are 0 in exact
    arithmetic come out as +-1e-15 and singular values tied in exact arithmetic 1 ulp apart, so the sweep reported
    75 "wrong" and 12 "silent at a jump" directions that were the float point sitting 1e-16 off a kink (gradwise
    differentiates the float piece, docs/nonsmooth.md "Near a kink"). The sweep squares the abs outputs and leaves
    those samples out (``_kink_sweep._near_a_tie``); every other sample must agree."""
    r = _check_sweep("svd", limit=None)
    assert r.counts["ok"] > 400 and r.counts["sample left out: 1e-16 off a tie"] <= 12, dict(r.counts)


@pytest.mark.slow
def test_kink_sweep_full():
    """Every op that reaches a kink rule or fact, every sample, both grids, five directions, and gw.gradcheck at
    its first quantized sample (no crash). 2026-12-06: 184 ops (python tests/_kink_sweep.py prints the counts)."""
    ops = ks.kink_ops()
    assert set(FAST) <= set(ops), set(FAST) - set(ops)
    failures = []
    for name, op in ops.items():
        if name not in STEEP:
            failures += ks.sweep_op(op, limit=None, gradcheck=1).failures
    assert not failures, "\n".join(failures[:50])


# -- jumps whose argument does not move to first order ----------------------------------------------------------


def _safe_norm(x):  # the "safe norm" idiom: sqrt's infinite slope at 0 kept out of the graph
    sq = (x * x).sum()
    return torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros((), dtype=x.dtype))


def _safe_normalize(x):
    sq = (x * x).sum(-1, keepdim=True)
    return torch.where(sq > 0, x / sq.clamp_min(1e-30).sqrt(), torch.zeros_like(x)).sum()


SECOND_ORDER_JUMPS = {  # (f, x, d); each f jumps at x along d, its jump's argument moving at second order
    "safe norm at 0 (jumps by sqrt(1e-30))": (_safe_norm, t(0.0, 0.0, 0.0), t(1.0, 2.0, 2.0)),
    "sign(x * x) at 0": (lambda x: torch.sign(x * x), t(0.0), t(1.0)),
    "floor(-x * x) at 0": (lambda x: torch.floor(-x * x), t(0.0), t(1.0)),
    "where(x * x > 0, 1, 0) at 0": (lambda x: torch.where(x * x > 0, 1.0, 0.0).to(D), t(0.0), t(1.0)),
    "(x * x) // 1 at 0": (lambda x: -(x * x) // 1.0, t(0.0), t(1.0)),
    "where(y + x^2 > 0, 1, 0) at 0 along (1, 0)": (lambda x: torch.where(x[1] + x[0] ** 2 > 0, 1.0, 0.0).to(D),
                                                   t(0.0, 0.0), t(1.0, 0.0)),
}

TINY = (1e-18, 1e-19, 1e-20)  # steps inside sqrt(1e-30) = 1e-15, where the safe norm's clamp holds


@pytest.mark.parametrize("name", list(SECOND_ORDER_JUMPS))
def test_jumps_whose_argument_moves_at_second_order(name):
    """A comparison or step whose argument is computed from f's inputs with tangent 0 along the direction (x * x
    at 0) kept its value at x: directional_derivative returned 0 where f jumps, generalized_grad 0 where no Clarke
    gradient exists (silent; session 29's known defect). Its side of the jump is now the sign of its second-order
    tangent (two reverse passes at those elements), so the jump is seen. References: float64 one-sided
    differences that do not shrink with the step (at steps below 1e-15 for the safe norm, whose clamp_min(1e-30)
    makes it jump by 1e-15)."""
    f, x, d = SECOND_ORDER_JUMPS[name]
    steps = TINY if "safe norm" in name else STEPS
    with torch.no_grad():
        ref = [float((f(x + s * d) - f(x)).abs().sum()) / s for s in steps]
    assert ref[-1] > 50 * ref[0] > 0  # f(x + s d) - f(x) does not shrink with s: a jump
    with pytest.raises(NonsmoothError, match="second-order"):
        gw.directional_derivative(f, x, d)
    if "safe norm" not in name:  # (its 1e-15 jump is below generalized_grad's tolerance: the next test)
        with pytest.raises(NonsmoothError, match="jumps"):  # (a random direction may move y at first order)
            gw.generalized_grad(lambda v: f(v).sum(), x, seed=0)


SECOND_ORDER_CONTINUOUS = {  # (f, x, d): continuous along d; the branch a second-order tangent picks matters
    "where(y + x^2 > 0, x, -x) at 0 along (1, 0)": (lambda x: torch.where(x[1] + x[0] ** 2 > 0, x[0], -x[0]),
                                                    t(0.0, 0.0), t(1.0, 0.0)),
    "where(y - x^2 >= 0, 2x, -x) at 0 along (-1, 0)": (lambda x: torch.where(x[1] - x[0] ** 2 >= 0, 2 * x[0], -x[0]),
                                                       t(0.0, 0.0), t(-1.0, 0.0)),
    "safe normalize at 0 (slope 1/sqrt(1e-30) inside its clamp)": (_safe_normalize, t(0.0, 0.0, 0.0),
                                                                    t(1.0, 2.0, 2.0)),
    "where(x * y > 0, 1, 0) at 0 along (1, 0) (constant along d)": (
        lambda x: torch.where(x[0] * x[1] > 0, 1.0, 0.0).to(D), t(0.0, 0.0), t(1.0, 0.0)),
}


@pytest.mark.parametrize("name", list(SECOND_ORDER_CONTINUOUS))
def test_comparisons_whose_argument_moves_at_second_order(name):
    """where(y + x^2 > 0, x, -x) at 0 along (1, 0) is x (y + x^2 = t^2 > 0 on the ray): slope 1. The comparison's
    tangent along d is 0, and gradwise ranked the tie by the tangents of further random directions, which are of
    other rays: slope -1 (SILENT). The second-order tangent now decides before them. Reference: float64 one-sided
    differences (at steps below 1e-15 for the safe normalize, whose clamp_min(1e-30) makes it linear there)."""
    f, x, d = SECOND_ORDER_CONTINUOUS[name]
    steps = TINY if "safe" in name else STEPS
    with torch.no_grad():
        ref = [float((f(x + s * d) - f(x)).sum()) / s for s in steps]
    assert ref[-1] == pytest.approx(ref[0], rel=1e-6)  # converged: no jump
    assert float(gw.directional_derivative(f, x, d).sum()) == pytest.approx(ref[-1], rel=1e-6, abs=1e-9)


def test_the_safe_norm_at_0_under_generalized_grad():
    """The safe norm jumps by sqrt(1e-30) = 1e-15 at 0 (above), below generalized_grad's tolerance for jumps
    (100 ulp): it returns the gradient of the piece along the direction, the clamp's constant 1e-15 (0), which
    is in the unit ball, the Clarke subdifferential of the norm it computes. Reference: gradients at nearby
    differentiable points inside the clamp."""
    x = t(0.0, 0.0, 0.0)
    gen = torch.Generator().manual_seed(0)
    y = (1e-17 * torch.randn(3, generator=gen, dtype=D)).requires_grad_(True)
    (near,) = torch.autograd.grad(_safe_norm(y), y)
    assert torch.equal(gw.generalized_grad(_safe_norm, x, seed=0)[0], near)


def test_a_comparison_that_moves_at_third_order_is_decided_there():
    """Was a known limit: where the second-order tangent is 0 too the element kept its value, as a locally constant
    argument's must (a relu-dead unit, a saturated clamp, floor(x) == 2: every order is 0 for them), so x ** 3 > 0
    at 0 (f jumps) said 0. Session 32: tangents of order 3 to 6 decide; f jumps, an error."""
    f = lambda x: torch.where(x**3 > 0, 1.0, 0.0).to(D)
    with pytest.raises(NonsmoothError, match="jumps"):
        gw.directional_derivative(f, t(0.0), t(1.0))


def test_relu_dead_masks_are_no_second_order_jump():
    """Whatever fixes the defect above must leave relu-dead elements alone: (h > 0), sign(h) and where(h > 0, ...)
    of a dead unit are locally constant."""
    w = torch.tensor([[1.0, 0.5], [-2.0, 1.0], [0.5, -1.0]], dtype=D)
    f = lambda x: (lambda h: (h * (h > 0).to(D)).sum() + torch.where(h > 0, h, -h).sum() + torch.sign(h).sum())(
        torch.relu(w @ x))
    x, d = t(1.0, -0.5), t(0.3, -1.0)  # w @ x = (0.75, -2.5, 1): unit 1 dead
    assert_exact(f, (x,), (d,))
    xg = x.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, x)[0], torch.autograd.grad(f(xg), xg)[0])


def test_hardshrink_with_a_negative_lambda_is_the_identity():
    """hardshrink(x, lambd) is 0 on [-lambd, lambd]: empty for lambd < 0, the identity. gradwise treated +-lambd as
    jumps and refused ("f is discontinuous") at x = +-lambd; now PyTorch's own (derivative 1, exact)."""
    f = lambda x: F.hardshrink(x, -0.5)
    assert_exact(f, (t(-0.5, 0.5, 0.0),), (t(1.0, -1.0, 1.0),))


# -- cdist / pdist before a tie ----------------------------------------------------------------------------------


def test_cdist_and_pdist_before_a_later_tie():
    """k-means style min over cdist (and a min over pdist) with tied distances: generalized_grad crashed with
    PyTorch's NotImplementedError (no forward-mode cdist / pdist): the ranked pass ran PyTorch's own op on dual
    tensors where the probe saw no tie at the distance itself. Now the rules run there; the result is the gradient
    of one active piece (each row's nearest centre fixed, plain autograd)."""
    import itertools

    a, c = t(0.0, 0.0, 1.0, 1.0).reshape(2, 2), t(0.0, 1.0, 1.0, 0.0).reshape(2, 2)  # every distance is 1
    got = gw.generalized_grad(lambda a: torch.cdist(a, c).min(dim=1).values.sum(), a)[0]
    pieces = []
    for j in itertools.product(range(2), repeat=2):
        x = a.clone().requires_grad_(True)
        pieces.append(torch.autograd.grad(sum((x[i] - c[j[i]]).norm() for i in range(2)), x)[0])
    assert any(torch.allclose(got, p) for p in pieces), got
    x0 = t(0.0, 0.0, 1.0, 0.0, 0.0, 1.0).reshape(3, 2)  # pair distances 1, 1, sqrt(2)
    got = gw.generalized_grad(lambda x: F.pdist(x).min(), x0)[0]
    pieces = []
    for i, j in ((0, 1), (0, 2)):
        x = x0.clone().requires_grad_(True)
        pieces.append(torch.autograd.grad((x[i] - x[j]).norm(), x)[0])
    assert any(torch.allclose(got, p) for p in pieces), got


NO_PYTORCH_JVP = {  # ops without a forward-mode formula in PyTorch, before a later tie (|z| at z = 0)
    "embedding_bag max": lambda w: F.embedding_bag(torch.tensor([0, 1, 2]), w, torch.tensor([0, 2]), mode="max"),
    "index_reduce amin": lambda w: torch.zeros(2, 3, dtype=D).index_reduce(0, torch.tensor([0, 1, 0]), w, "amin"),
    "cdist": lambda w: torch.cdist(w, w.flip(0) + 1),
    "pdist": lambda w: F.pdist(w),
}


@pytest.mark.parametrize("name", list(NO_PYTORCH_JVP))
def test_ops_without_forward_mode_before_a_later_tie(name):
    """generalized_grad raised PyTorch's NotImplementedError (crash) for these ops followed by a tie: its ranked
    pass ran PyTorch's own op on dual tensors. Away from their own ties they are smooth: the gradient w.r.t. w is
    PyTorch's (bit for bit), and z's is a piece of |z| at 0 (+-1)."""
    op = NO_PYTORCH_JVP[name]
    w0 = t(0.3, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -2.2, 0.5).reshape(3, 3)
    f = lambda w, z: (op(w) * torch.linspace(0.5, 1.5, op(w0).numel(), dtype=D).reshape(op(w0).shape)).sum() \
        + z.abs().sum()
    gw_w, gw_z = gw.generalized_grad(f, (w0, t(0.0, 0.0)))
    w = w0.clone().requires_grad_(True)
    assert torch.equal(gw_w, torch.autograd.grad(f(w, t(1.0, 1.0)), w)[0])
    assert set(gw_z.abs().tolist()) == {1.0}


def test_embedding_bag_max_with_padding_idx():
    """embedding_bag(mode='max', padding_idx=...) with a direction crashed (PyTorch's NotImplementedError: no
    forward-mode embedding_bag) in the op_db sweep (sample 29, 20 directions). Now the max rule with the padding
    entries left out: PyTorch's gradient away from ties (bit for bit), the differences at a tie."""
    idx, offsets = torch.tensor([0, 4, 1, 2, 4, 3]), torch.tensor([0, 2, 4])  # bag 0: rows 0, pad; bag 2: 4 = pad
    f = lambda w: F.embedding_bag(idx, w, offsets, mode="max", padding_idx=-1)
    w0 = t(0.3, -1.2, 0.7, 2.0, -0.4, 1.1, 0.9, -2.2, 0.5, 0.1).reshape(5, 2)
    g = lambda w: (f(w) * t(1.0, -2.0, 0.5, 1.5, -1.0, 0.25).reshape(3, 2)).sum()
    w = w0.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(g, w0)[0], torch.autograd.grad(g(w), w)[0])
    tied = w0.clone()
    tied[2] = tied[1]  # bag 1 = rows 1, 2: tied in both columns
    for d in (torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(s)) for s in range(3)):
        assert_exact(f, (tied,), (d,))


@pytest.mark.parametrize("sep", [1e-5, 3e-8, 1e-8])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_cdist_near_coincident_points_in_mm_mode(sep, p):
    """cdist's tangent (PyTorch has none) divided by cdist's own value, which with more than 25 rows PyTorch
    computes as sqrt(|a|² + |b|² - 2ab): at distinct points 3e-8 apart (norms ~3) that value is 6e-8 or 0, so
    directional_derivative gave 0.174 for a slope of 0.302 (silent) or inf. The slope is of the distance itself:
    one-sided differences on each pair's difference vector, with a step relative to its length."""
    g = torch.Generator().manual_seed(1)
    x1, x2, d1 = (3 * torch.randn(30, 3, generator=g, dtype=D) for _ in range(3))
    x2[0] = x1[0] + sep * t(1.0, -0.5, 0.25)
    w = torch.linspace(0.5, 1.5, 900, dtype=D).reshape(30, 30)
    got = gw.directional_derivative(lambda a: (torch.cdist(a, x2, p=p) * w).sum(), x1, d1)
    delta, dd = x1.unsqueeze(1) - x2.unsqueeze(0), d1.unsqueeze(1).expand(30, 30, 3)
    n = torch.linalg.vector_norm(delta, p, -1)
    h = (1e-9 * n).unsqueeze(-1)
    ref = ((torch.linalg.vector_norm(delta + h * dd, p, -1) - n) / h.squeeze(-1) * w).sum()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    x = x1.clone().requires_grad_(True)  # away from coincident points: PyTorch's gradient, bit for bit
    f = lambda a, z: (torch.cdist(a, x2, p=p) * w).sum() + z.abs().sum()
    assert torch.equal(gw.generalized_grad(f, (x1, t(0.0)))[0], torch.autograd.grad(f(x, t(1.0)), x)[0])


_NONE = torch.tensor([], dtype=torch.long)
EMPTY_NO_PYTORCH_JVP = {  # ops without a forward-mode formula in PyTorch, called with an empty tensor
    "embedding_bag max, no index": lambda w: F.embedding_bag(_NONE, w, torch.tensor([0, 0]), mode="max"),
    "embedding_bag mean, no index": lambda w: F.embedding_bag(_NONE, w, torch.tensor([0, 0]), mode="mean"),
    "cdist, no row": lambda w: torch.cdist(w[:0], w),
    "cdist, no feature": lambda w: torch.cdist(w[:, :0], w[:, :0] + 1),
    "pdist, one row": lambda w: F.pdist(w[:1]),  # (no pair; 0 rows: PyTorch's pdist backward crashes)
    "index_reduce amax, no index": lambda w: w.index_reduce(0, _NONE, w[:0], "amax"),
    "index_reduce prod, no index": lambda w: w.index_reduce(0, _NONE, w[:0], "prod"),
    "index_reduce mean into nothing": lambda w: w[:0].index_reduce(0, _NONE, w[:0], "mean"),
}


@pytest.mark.parametrize("name", list(EMPTY_NO_PYTORCH_JVP))
def test_ops_without_forward_mode_on_empty_tensors(name):
    """An op whose input is empty skipped its rule for PyTorch's own (nothing ties), which has no forward mode for
    these: directional_derivative and generalized_grad raised PyTorch's NotImplementedError (crash). Their rules run
    now: the tangent of what the op reads (index_reduce with no index: its input, unchanged)."""
    op = EMPTY_NO_PYTORCH_JVP[name]
    g = torch.Generator().manual_seed(0)
    w, d = torch.randn(5, 2, generator=g, dtype=D), torch.randn(5, 2, generator=g, dtype=D)
    assert_exact(op, (w,), (d,))
    seed = torch.linspace(0.5, 1.5, op(w).numel(), dtype=D).reshape(op(w).shape)
    f = lambda w, z: (op(w) * seed).sum() + z.abs().sum()
    gw_w, gw_z = gw.generalized_grad(f, (w, t(0.0)))
    wr = w.clone().requires_grad_(True)
    assert torch.equal(gw_w, torch.autograd.grad(f(wr, t(1.0)), wr, allow_unused=True, materialize_grads=True)[0])
    assert gw_z.abs().item() == 1.0
    if name == "cdist, no feature":  # every distance 0 whatever w: no kink, f is smooth (not stationary)
        cert = gw.stationarity(lambda w: (op(w) * seed).sum() + (w * w).sum(), w)
        assert cert.stationary is False and not cert.kinks


@pytest.mark.parametrize("output", [0, 1, 2])
def test_kink_sweep_svd_still_fails_on_a_wrong_derivative(output, monkeypatch):
    """The svd sweep squares the singular vectors and leaves out samples 1e-16 off a tie: it must still see a
    derivative of U, S or V that is 1% off (the value unchanged)."""
    op = ks.op_by_id("svd")
    native = op.op

    def wrong(*args, **kwargs):
        out = list(native(*args, **kwargs))
        out[output] = out[output] + 0.01 * (out[output] - out[output].detach())
        return tuple(out)

    monkeypatch.setattr(op, "op", wrong)
    r = ks.sweep_op(op, limit=40, grids=(0.5,), n_gauss=1, n_int=0)
    assert r.counts["wrong"] > 0 and r.counts["ok"] < r.counts["directions"], dict(r.counts)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 3.0, float("inf")])
@pytest.mark.parametrize("later_tie", [False, True])
@pytest.mark.parametrize("op", ["cdist", "pdist"])
def test_distances_away_from_their_kinks_keep_pytorchs_gradient(p, later_tie, op):
    """cdist / pdist with p = 1, inf (kinks where coordinates are equal / tie in size) or p < 1 went through the
    norm rule on every pair even where no pair is at a kink: generalized_grad differed from torch.autograd.grad in
    the last bits (3.6e-15 on 30 x 28 points) on a smooth program. Away from their kinks it is PyTorch's gradient,
    bit for bit, with or without a later tie (|z| at 0), and the one-sided derivative agrees with differences."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 3, generator=g, dtype=D), torch.randn(28, 3, generator=g, dtype=D)
    dist = (lambda a: torch.cdist(a, b, p=p)) if op == "cdist" else (lambda a: F.pdist(torch.cat([a, b]), p))
    w = torch.rand(dist(a).shape, generator=g, dtype=D)
    f = lambda a, z: (dist(a) * w).sum() + (z.abs() if later_tie else z * z).sum()
    got = gw.generalized_grad(f, (a, t(0.0)))[0]
    x = a.clone().requires_grad_(True)
    assert torch.equal(got, torch.autograd.grad(f(x, t(1.0)), x)[0])
    d, h = torch.randn(30, 3, generator=g, dtype=D), 1e-6
    s = lambda a: (dist(a) * w).sum()
    with torch.no_grad():  # one-sided differences, Richardson-extrapolated (p = 0.5 bends fast near small |δ_k|)
        ref = 2 * (s(a + h / 2 * d) - s(a)) / (h / 2) - (s(a + h * d) - s(a)) / h
    torch.testing.assert_close(gw.directional_derivative(s, a, d), ref, atol=1e-5, rtol=1e-5)


def test_distances_with_a_tie_tolerance_still_see_near_ties():
    """PyTorch's cdist where no coordinate ties exactly (above) must not hide a coordinate within tie_tol of a tie
    from subdifferential(tie_tol=...): the epsilon-subdifferential has both signs of |1e-4|."""
    a, b = t(0.0, 1.0, 2.0, -1.0).reshape(2, 2), t(1e-4, 3.0).reshape(1, 2)
    f = lambda x: torch.cdist(x, b, p=1.0).sum()
    assert len(gw.subdifferential(f, a).elements) == 1
    assert len(gw.subdifferential(f, a, tie_tol=1e-3).elements) == 2


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-25), (torch.float64, 1e-200)])
@pytest.mark.parametrize("ord", [2.0, 3.0])
def test_a_norm_that_underflows_to_zero_is_no_kink(dtype, scale, ord):
    """vector_norm of entries whose powers underflow (1e-25 in float32) comes out exactly 0, and the rule took
    that for the zero point (f'(x; d) = ||d||: 1 along e_0 for [1e-25, -2e-25], where the slope is 0.447). The
    kink is where every entry is 0; elsewhere the gradient is that of x scaled up (the p-norm's is scale-free).
    Reference: float64 finite differences of the norm of x scaled by 1/scale (the same slope), and the zero
    point itself."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    d = torch.tensor([1.0, 0.5], dtype=torch.float64)
    h = 1e-7
    fd = (torch.linalg.vector_norm(x + h * d, ord) - torch.linalg.vector_norm(x - h * d, ord)) / (2 * h)
    got = gw.directional_derivative(lambda v: torch.linalg.vector_norm(v, ord), (x * scale).to(dtype), d.to(dtype))
    assert abs(float(got) - float(fd)) < 1e-4 * abs(float(fd)) + 1e-6
    (g,) = gw.generalized_grad(lambda v: torch.linalg.vector_norm(v, ord), (x * scale).to(dtype))
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(torch.linalg.vector_norm(xr, ord), xr)
    torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-7)
    zero = gw.directional_derivative(lambda v: torch.linalg.vector_norm(v, ord), torch.zeros(2, dtype=dtype),
                                     d.to(dtype))
    torch.testing.assert_close(zero.double(), torch.linalg.vector_norm(d, ord), rtol=1e-6, atol=0)


def test_second_order_tangents_leave_the_inputs_hooks_alone():
    """The reverse passes that compute a comparison's second-order tangent run to the pass's dual views of the
    inputs, not to the inputs: an input's own gradient hook (a logger, a clipper) runs once per generalized_grad
    call, on f's gradient, as for f(x).backward(); directional_derivative runs none."""
    calls = []
    x = torch.zeros(2, dtype=D, requires_grad=True)
    x.register_hook(lambda g: calls.append(g.clone()))
    f = lambda v: torch.where(v[1] + v[0] ** 2 > 0, v[0], -v[0]) + v.sum()
    assert float(gw.directional_derivative(f, x, t(1.0, 0.0))) == 2.0  # (x + x + y along (1, 0))
    assert not calls
    gw.generalized_grad(f, x, seed=0)
    assert len(calls) == 1


def test_many_comparisons_whose_argument_moves_at_second_order():
    """Second-order tangents of many tied elements at once (three reverse passes for all): 200 elements of
    where(x * x > 0, 1, 0) at 0 jump, and where(v * m > 0, v, -v) with m half zeros (their argument constant) is
    exact; a unit direction leaves the other elements of an input unmoved (constant: no second-order question).
    References: float64 one-sided differences."""
    z, ones = torch.zeros(200, dtype=D), torch.ones(200, dtype=D)
    with pytest.raises(NonsmoothError, match="second-order"):
        gw.directional_derivative(lambda v: torch.where(v * v > 0, 1.0, 0.0).to(D).sum(), z, ones)
    m = (torch.arange(200) % 2).to(D)
    assert_exact(lambda v: torch.where(v * m > 0, v, -v).sum() + (v * v).sum(), (z,), (ones + m,))
    x, e0 = z.clone(), torch.zeros(200, dtype=D)
    x[::3], e0[1] = 1.0, -1.0
    assert_exact(lambda v: torch.where(v > 0, v, 0.1 * v).sum(), (x,), (e0,))
