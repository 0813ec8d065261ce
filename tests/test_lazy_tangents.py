"""Lazy tangents in generalized_grad's passes (issue #14, speed): a conv2d's tangent is computed only for the images
where a later kink rule ranks ties (`_lazy.LazyTangent`), relu and max-pool pass laziness on, anything else
computes it in full. References: PyTorch's gradient at p + t d (float64), d the direction drawn from the seed,
where d has separated the ties (the piece gradwise picks is the one active there; the nets are polynomial in
their weights on a piece, so the gradients agree to O(t)); and the same call with lazy tangents off (the eager
tangents), which ranks the same ties alike, so its gradient is bitwise the same."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwise as gw
from gradwise._nonsmooth import _engine, _lazy
from gradwise._nonsmooth._engine import _random_direction

f64 = torch.float64


def _blocky(n: int, c: int, side: int, block: int, tied: tuple[int, ...], seed: int) -> torch.Tensor:
    """n images; those in ``tied`` are integer-valued and nearest-upsampled by ``block`` (flat patches: tied pool
    windows), the others Gaussian (no tie)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=gen, dtype=f64)
    small = torch.randint(0, 3, (n, c, side // block, side // block), generator=gen).to(f64)
    up = F.interpolate(small, scale_factor=block, mode="nearest")
    x[list(tied)] = up[list(tied)]
    return x


def _params(shapes, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(s, generator=gen, dtype=f64) / s[-1] ** 0.5).requires_grad_() for s in shapes)


def _off_kink(f, params, seed: int, t: float = 1e-10, inside: bool = False) -> tuple[torch.Tensor, ...]:
    """PyTorch's gradient at p + t d (``inside``: f reads the tensors ``params`` themselves, moved in place)."""
    d = _random_direction(params, seed)[0]
    if not inside:
        moved = tuple((p.detach() + t * v).requires_grad_() for p, v in zip(params, d, strict=True))
        return torch.autograd.grad(f(*moved), moved)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, v in zip(params, d, strict=True):
                p.add_(t * v)
        return torch.autograd.grad(f(*params), params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


@pytest.fixture
def spy(monkeypatch):
    """Counts the lazy tangents made and the sub-batches computed for a kink rule (``batch`` before ``dense``), and
    checks every read of a lazy tangent (`_lazy.take`, where the rules read one) against the full tangent the
    eager rule computes (float64: a sub-batch's convolution may round differently)."""
    seen = {"made": 0, "sub": 0, "dense": 0, "reads": 0}
    new, batch, dense, take = (_lazy.LazyTangent.__new__, _lazy.LazyTangent.batch, _lazy.LazyTangent.dense,
                               _lazy.take)

    def checked_take(t, flat):
        values = take(t, flat)
        if isinstance(t, _lazy.LazyTangent):
            seen["reads"] += 1
            with torch._C.DisableTorchFunction(), torch.no_grad():
                full = t._full if t._full is not None else t._dense_fn()
            torch.testing.assert_close(values, full.reshape(-1)[flat], rtol=1e-12, atol=1e-12)
        return values

    def counted_new(cls, *a, **k):
        seen["made"] += 1
        return new(cls, *a, **k)

    def counted_batch(self, index):
        seen["sub"] += self._full is None
        return batch(self, index)

    def counted_dense(self):
        seen["dense"] += self._full is None
        return dense(self)

    monkeypatch.setattr(_lazy.LazyTangent, "__new__", staticmethod(counted_new))
    monkeypatch.setattr(_lazy.LazyTangent, "batch", counted_batch)
    monkeypatch.setattr(_lazy.LazyTangent, "dense", counted_dense)
    monkeypatch.setattr(_lazy, "take", checked_take)
    return seen


def _check(f, params, seed, monkeypatch, spy, sub: bool = True, rtol: float = 1e-6, inside: bool = False):
    """First call (tangent-free pass, then the ranked pass), then two more (tangents in the first pass): each is
    the gradient at p + t d, and bitwise the eager tangents' answer. ``sub``: some tangent was computed for a
    sub-batch only."""
    monkeypatch.setattr(_lazy, "_SPARSE_RATIO", 1)  # sub-batches for as many reads as possible
    ref = _off_kink(f, params, seed, inside=inside)
    _engine._LAST_TIE.clear()
    got = [gw.generalized_grad(f, params, seed=seed) for _ in range(3)]
    for g in got:
        for a, b in zip(g, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
    assert spy["made"] > 0
    assert (spy["sub"] > 0) == sub and (spy["reads"] > 0 or not sub)
    monkeypatch.setattr(_lazy, "active", lambda: False)  # eager tangents
    _engine._LAST_TIE.clear()
    for _ in range(2):
        eager = gw.generalized_grad(f, params, seed=seed)
        assert all(torch.equal(a, b) for a, b in zip(got[-1], eager, strict=True))
    return got[-1]


def test_ties_in_two_pool_layers_in_distant_images(monkeypatch, spy):
    """conv, relu, pool, conv, relu, pool: flat patches tie both pools' windows, in the first and the last image
    only (the sub-batch's images are mapped back to their positions); the second pool's ties read the tangent
    through the first pool's ranked indices."""
    x = _blocky(6, 2, 32, 16, (0, 5), seed=0)
    params = _params([(3, 2, 3, 3), (3,), (4, 3, 3, 3), (4,), (5, 4 * 8 * 8)], seed=1)
    c = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=f64)

    def f(w1, b1, w2, b2, w3):
        h = F.max_pool2d(torch.relu(F.conv2d(x, w1, b1, padding=1)), 2)
        h = F.max_pool2d(torch.relu(F.conv2d(h, w2, b2, padding=1)), 2)
        return (F.linear(h.flatten(1), w3) * c).sum()

    _check(f, params, 3, monkeypatch, spy)


def test_input_tangent_stride_padding_dilation(monkeypatch, spy):
    """The image is an input too (a tangent through x' as well as W'); the second conv strides, pads and dilates,
    so the tied windows' tangents read elements far from them, across the padding."""
    x = _blocky(5, 2, 24, 6, (1, 3), seed=4)
    params = (x.clone().requires_grad_(), *_params([(3, 2, 3, 3), (4, 3, 3, 3), (4,)], seed=5))

    def f(img, w1, w2, b2):
        h = torch.relu(F.conv2d(img, w1, None, padding=1))
        h = torch.relu(F.conv2d(h, w2, b2, stride=2, padding=2, dilation=2))
        return F.max_pool2d(h, 2).square().sum()

    _check(f, params, 6, monkeypatch, spy)


def test_ties_reached_through_several_convs(monkeypatch, spy):
    """Three convolutions in a row before the only tied pool: the lazy tangent of a conv whose input's tangent is
    itself lazy, twice."""
    x = _blocky(16, 1, 20, 5, (2,), seed=7)
    params = _params([(2, 1, 3, 3), (2,), (3, 2, 3, 3), (3, 3, 1, 1), (3,)], seed=8)

    def f(w1, b1, w2, w3, b3):
        h = F.conv2d(F.conv2d(x, w1, b1, padding=1), w2, None, padding=1)
        h = torch.relu(F.conv2d(h, w3, b3))
        return F.max_pool2d(h, 2).sum()

    _check(f, params, 9, monkeypatch, spy)


def test_tie_needed_only_through_a_second_kink(monkeypatch, spy):
    """The first pool ties in image 0 only; the second pool's ties (image 4) read the tangent through the first
    pool's indices (ranked there, PyTorch's elsewhere) and through a relu at its kink (exact zeros, ranked by the
    sign of the tangent)."""
    x = _blocky(5, 2, 16, 4, (0, 4), seed=10)
    x[4] = x[4].round()  # integer-valued: with integer weights below, relu(h - 1) sits at its kink
    params = _params([(2, 2, 1, 1), (2,), (3, 2, 3, 3), (3,)], seed=11)
    with torch.no_grad():
        params[0].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64).view(2, 2, 1, 1))
        params[1].zero_()

    def f(w1, b1, w2, b2):
        h = F.max_pool2d(torch.relu(F.conv2d(x, w1, b1) - 1), 2)
        h = F.max_pool2d(torch.relu(F.conv2d(h, w2, b2, padding=1)), 2)
        return (h * torch.linspace(-1, 1, h.numel(), dtype=f64).view(h.shape)).sum()

    _check(f, params, 12, monkeypatch, spy)


def test_modules_inplace_relu_and_forward_hooks(monkeypatch, spy):
    """nn modules: an in-place ReLU (its tangent written in place: computed in full first), a forward hook that
    rescales a conv's output (an op without a lazy form) and a forward pre-hook, a Flatten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double()
    hooked = []
    model[3].register_forward_pre_hook(lambda m, args: hooked.append(1))
    model[3].register_forward_hook(lambda m, args, out: out * 2.0)
    x = _blocky(6, 2, 16, 4, (1, 4), seed=13)
    params = tuple(model.parameters())
    f = lambda *p: model(x).logsumexp(1).sum()
    _check(f, params, 14, monkeypatch, spy, sub=False, inside=True)
    assert hooked


def test_tangent_used_elsewhere_is_computed_in_full(monkeypatch, spy):
    """A lazy conv tangent that an op without a lazy form reads (an elementwise maximum at ties, a mean) is
    computed in full, by the eager rule's code."""
    x = _blocky(4, 1, 12, 3, (0, 3), seed=15)
    params = _params([(2, 1, 3, 3), (2,)], seed=16)

    def f(w, b):
        h = F.conv2d(x, w, b, padding=1)
        m = torch.maximum(h, h.flip(3)) + h.mean()
        return F.max_pool2d(torch.relu(m), 2).sum()

    _check(f, params, 17, monkeypatch, spy, sub=False)
    assert spy["dense"] > 0


def test_lazy_tangent_is_the_eager_tangent():
    """at() and batch() give dense()'s elements; any op on the tangent sees the dense one; a tensor it reads,
    modified in place before it is computed, raises Stale (the engine then reruns the pass eagerly)."""
    gen = torch.Generator().manual_seed(0)
    xp, xt = torch.randn(6, 2, 7, 7, generator=gen, dtype=f64), torch.randn(6, 2, 7, 7, generator=gen, dtype=f64)
    w, wt = torch.randn(3, 2, 3, 3, generator=gen, dtype=f64), torch.randn(3, 2, 3, 3, generator=gen, dtype=f64)
    out = F.conv2d(xp, w, padding=1)
    eager = lambda xp, xt: F.conv2d(xp, wt, None, padding=1).add_(F.conv2d(xt, w, None, padding=1))
    full = eager(xp, xt)
    lazy = _lazy.conv2d_tangent(out, xp, xt, eager)
    flat = torch.tensor([0, 5, 100, 5 * 3 * 49 + 17, full.numel() - 1])
    assert torch.allclose(lazy.at(flat), full.reshape(-1)[flat], rtol=1e-12, atol=1e-12)
    assert torch.allclose(lazy.batch(torch.tensor([2])), full[2:3], rtol=1e-12, atol=1e-12)
    assert torch.equal(lazy * 1.0, full) and torch.equal(lazy.dense(), full)
    relu = _lazy.relu_tangent(_lazy.conv2d_tangent(out, xp, xt, eager), F.relu(out))
    assert torch.equal(relu.at(flat), torch.ops.aten.threshold_backward(full, F.relu(out), 0.0).reshape(-1)[flat])
    lock = torch.randint(0, 49, (6, 3, 2, 2), generator=gen)  # a max-pool's indices, per plane
    pooled, keep = _lazy.gathered_tangent(_lazy.conv2d_tangent(out, xp, xt, eager), lock, lock.to(f64), 18)
    want = full.reshape(18, -1).gather(1, lock.reshape(18, -1)).reshape(lock.shape)
    keep()
    lock.zero_()  # (another choice written afterwards: the tangent keeps the indices it had)
    assert torch.allclose(pooled.at(torch.tensor([0, 7, 71])), want.reshape(-1)[[0, 7, 71]], rtol=1e-12, atol=1e-12)
    assert torch.allclose(pooled.batch(torch.tensor([1, 4])), want[[1, 4]], rtol=1e-12, atol=1e-12)
    assert torch.equal(pooled.dense(), want)
    stale = _lazy.conv2d_tangent(out, xp, xt, eager)
    xt.mul_(2)
    with pytest.raises(_lazy.Stale):
        stale.at(flat)


def test_stale_lazy_tangent_reruns_the_pass_eagerly(monkeypatch):
    """A pass whose lazy tangent turns out stale is run again with eager tangents: the same gradient."""
    x = _blocky(4, 1, 12, 3, (1,), seed=18)
    params = _params([(2, 1, 3, 3), (2,)], seed=19)
    f = lambda w, b: F.max_pool2d(torch.relu(F.conv2d(x, w, b, padding=1)), 2).square().sum()
    _engine._LAST_TIE.clear()
    want = [gw.generalized_grad(f, params, seed=20) for _ in range(2)]
    check = _lazy.LazyTangent._check
    calls = []

    def stale_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise _lazy.Stale
        check(self)

    monkeypatch.setattr(_lazy.LazyTangent, "_check", stale_once)
    for expected in want[::-1]:  # (a carried first pass, then a first call's ranked pass)
        calls.clear()
        got = gw.generalized_grad(f, params, seed=20)
        assert calls and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        _engine._LAST_TIE.clear()


def test_only_the_passes_that_drop_tangents_are_lazy():
    """directional_derivative (its output's tangent is the answer) gets eager tangents."""
    x = _blocky(3, 1, 8, 2, (0,), seed=21)
    params = _params([(2, 1, 3, 3), (2,)], seed=22)
    f = lambda w, b: F.max_pool2d(torch.relu(F.conv2d(x, w, b, padding=1)), 2).sum()
    made = []
    new = _lazy.LazyTangent.__new__
    _lazy.LazyTangent.__new__ = staticmethod(lambda cls, *a, **k: made.append(1) or new(cls, *a, **k))
    try:
        gw.directional_derivative(f, params, tuple(torch.ones_like(p) for p in params))
    finally:
        _lazy.LazyTangent.__new__ = new
    assert made == []
