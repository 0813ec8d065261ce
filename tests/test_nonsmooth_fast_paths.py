"""The vectorised paths of generalized_grad's tangent pass (issue #14, speed): max-pool ties ranked over a
(window element, window) layout by `_first_best`, from `_pool_ties`' hit bits, instead of `_lex_argmax` over
(window, element) rows. References: `_lex_argmax` itself, the generic path of the same rule, and PyTorch's
gradient at x + t d, where the direction d that ranks the ties has separated them (max-pool is linear on a piece,
so the gradients agree exactly)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise._nonsmooth import _engine, _rules_select
from gradwise._nonsmooth._engine import _random_direction
from gradwise._nonsmooth._records import _lex_argmax
from gradwise._nonsmooth._rules import _near_zero

f64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_first_best_is_lex_argmax(dtype, k):
    """Where it answers, the first candidate with the largest key, as `_lex_argmax` picks it (ties in the key
    included: integer keys, -0.0 beside 0.0, subnormals); None only where a key that decides is not finite or sits
    at -finfo.max."""
    gen = torch.Generator().manual_seed(k)
    tiny = torch.finfo(dtype).smallest_normal / 4
    answered = 0
    for trial in range(40):
        g = 200
        cand = torch.rand(k, g, generator=gen) < 0.6
        cand[torch.randint(0, k, (g,), generator=gen), torch.arange(g)] = True  # a candidate in every column
        key = torch.randint(-2, 3, (k, g), generator=gen).to(dtype)
        if trial % 4 == 1:
            key = key * tiny  # subnormal keys
        if trial % 4 == 2:
            key[key == 0] = -0.0
        if trial % 4 == 3:  # non-finite or extreme keys somewhere
            pick = torch.rand(k, g, generator=gen) < 0.05
            key[pick] = torch.tensor([-math.inf, math.inf, math.nan, -torch.finfo(dtype).max],
                                     dtype=dtype)[trial // 4 % 4]
        ours = _rules_select._first_best(cand.to(torch.uint8), key)
        theirs = _lex_argmax(cand.t(), [key.t()], False)[0]
        masked = key.masked_fill(~cand, 0)
        decides = bool(masked.isfinite().all()) and not bool((masked == -torch.finfo(dtype).max).any())
        if ours is None:
            assert not decides
            continue
        answered += 1
        assert torch.equal(ours, theirs)
        assert bool(cand.gather(0, ours.unsqueeze(0)).all())
    assert answered >= 30


# (kernel, stride, padding, dilation, ceil_mode) per dimension count
POOLS = [(2, (2, 2, 0, 1, False)), (2, (3, 1, 0, 1, False)), (2, (2, 2, 0, 2, False)), (2, (3, 2, 1, 1, False)),
         (2, (2, 2, 0, 1, True)), (1, (3, 2, 0, 1, False)), (3, (2, 2, 0, 1, False))]


def _pool_case(nd: int, args):
    """f(h) = <c, max_pool(relu(h - 1))> on integer h (tied windows, relu-dead ones and relu kinks at h = 1)."""
    gen = torch.Generator().manual_seed(nd)
    spatial = {1: (23,), 2: (11, 13), 3: (6, 7, 5)}[nd]
    h = torch.randint(0, 4, (2, 3, *spatial), generator=gen).to(f64)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    k, s, p, d, ceil = args
    shape = pool(h, k, s, p, d, ceil).shape
    c = torch.randn(shape, generator=gen, dtype=f64)
    return h, lambda h: (pool(torch.relu(h - 1), k, s, p, d, ceil) * c).sum()


@pytest.mark.parametrize("nd,args", POOLS)
def test_pool_ties_ranked_as_the_direction_separates_them(nd, args, monkeypatch):
    """Every call (the first, tangent-free then ranked; the next ones, ranked in their first pass) gives PyTorch's
    gradient at h + t d, d the direction drawn from the seed; the vectorised ranking and the generic one agree."""
    h, f = _pool_case(nd, args)
    d = _random_direction((h,), 3)[0][0]
    hp = (h + 1e-7 * d).requires_grad_()
    ref = torch.autograd.grad(f(hp), hp)[0]
    answered = []
    first_best = _rules_select._first_best
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: answered.append(r := first_best(c, k)) or r)
    for _ in range(3):
        (g,) = gw.generalized_grad(f, h, seed=3)
        assert torch.equal(g, ref)
    fast = any(r is not None for r in answered)
    assert fast == (args[2] == 0 and not args[4])  # the vectorised path wherever no window reaches padding
    monkeypatch.setattr(_rules_select, "_first_best", lambda c, k: None)  # the generic ranking
    assert torch.equal(gw.generalized_grad(f, h, seed=3)[0], ref)


def test_pool_tangent_pass_has_no_row_argmax(monkeypatch):
    """The tangent pass ranks a max-pool's tied windows without an argmax over each window's elements (a CPU
    reduction over a last dim of 4 costs ~6x the elementwise ops that replace it)."""
    h, f = _pool_case(2, (2, 2, 0, 1, False))
    gw.generalized_grad(f, h, seed=0)  # the next call carries tangents to the ties in its first pass
    calls = []
    argmax = torch.Tensor.argmax
    monkeypatch.setattr(torch.Tensor, "argmax", lambda self, *a, **k: calls.append(self.shape) or argmax(self, *a,
                                                                                                          **k))
    gw.generalized_grad(f, h, seed=0)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_near_zero_exact(dtype):
    """Exact ties: a zero anywhere (-0.0 too), not a NaN or a subnormal."""
    t = torch.tensor([1.0, -2.0, 3.0]).to(dtype)
    assert not _near_zero(t, 0.0)
    z = t.clone()
    z[1] = 0
    assert _near_zero(z, 0.0)
    if dtype.is_floating_point:
        z[1] = -0.0
        assert _near_zero(z, 0.0)
        z[1] = math.nan
        assert not _near_zero(z, 0.0)
        z[1] = torch.finfo(dtype).smallest_normal / 2
        assert not _near_zero(z, 0.0)
        assert _near_zero(z, 1e-30)
        assert _near_zero(z.t() if z.dim() > 1 else z.expand(2, 3), 1e-30)


def test_pair_rule_subtracts_once_without_a_graph(monkeypatch):
    """maximum/minimum form a - b once, and (outside stationarity's records, which differentiate it) without an
    autograd node: it only says which side wins. The result is still PyTorch's gradient at h + t d."""
    h = torch.tensor([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]], dtype=f64)
    f = lambda h: (torch.maximum(h, h.flip(0)) * torch.arange(1.0, 7.0, dtype=f64).reshape(2, 3)).sum()
    d = _random_direction((h,), 0)[0][0]
    hp = (h + 1e-7 * d).requires_grad_()
    ref = torch.autograd.grad(f(hp), hp)[0]
    made = []
    sub = torch.Tensor.__sub__
    monkeypatch.setattr(torch.Tensor, "__sub__", lambda a, b: made.append(r := sub(a, b)) or r)
    _engine._LAST_TIE.clear()  # a first call: the tangent-free pass, then the pass that ranks the ties
    assert torch.equal(gw.generalized_grad(f, h, seed=0)[0], ref)
    assert len(made) == 2 and all(s.grad_fn is None for s in made)


def test_pool_tangent_pass_gathers_by_index_select_and_locks_by_scatter(monkeypatch):
    """The tangent pass reads the tied windows' tangents with one index_select of the flat (K, G) positions
    (take's kernel is ~1.25x slower) and writes the locked indices with scatter_ (distinct positions: the result
    of index_put_, at ~0.6x its time). The gradient is still PyTorch's at h + t d."""
    h, f = _pool_case(2, (2, 2, 0, 1, False))
    d = _random_direction((h,), 0)[0][0]
    hp = (h + 1e-7 * d).requires_grad_()
    ref = torch.autograd.grad(f(hp), hp)[0]
    gw.generalized_grad(f, h, seed=0)  # the next call carries tangents to the ties in its first pass
    calls = []
    take, index_put_ = torch.Tensor.take, torch.Tensor.index_put_
    monkeypatch.setattr(torch.Tensor, "take", lambda self, i: calls.append(("take", i.dim())) or take(self, i))
    monkeypatch.setattr(torch.Tensor, "index_put_", lambda self, *a, **k: calls.append(("index_put_",))
                        or index_put_(self, *a, **k))
    assert torch.equal(gw.generalized_grad(f, h, seed=0)[0], ref)
    assert [c for c in calls if c != ("take", 1)] == []
