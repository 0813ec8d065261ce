"""F.fractional_max_pool2d through gradwise's port: PyTorch's values, indices and gradients bit for bit away from
ties, exact one-sided derivatives and generalized gradients at ties (references: PyTorch itself, float64 one-sided
differences, PyTorch's gradient just off the kink along the seed direction)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise._nonsmooth._ports import PORTS

sys.path.insert(0, str(Path(__file__).parent))
from test_nonsmooth import one_sided


def _config(g: torch.Generator, trial: int):
    """A random input (ties, -inf, NaN sometimes; 3-D unbatched sometimes), kernel and output option."""
    dtype = (torch.float32, torch.float64, torch.float16, torch.bfloat16)[trial % 4]
    n, c = (int(v) for v in torch.randint(1, 4, (2,), generator=g))
    h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=g))
    kh, kw = int(torch.randint(1, h + 1, (), generator=g)), int(torch.randint(1, w + 1, (), generator=g))
    x = (torch.randint(-3, 4, (n, c, h, w), generator=g) if trial % 3 else torch.randn(n, c, h, w, generator=g))
    x = x.to(dtype)
    if trial % 5 == 0:
        x[torch.rand(x.shape, generator=g) < 0.1] = -math.inf
    if trial % 7 == 0:
        x[torch.rand(x.shape, generator=g) < 0.1] = math.nan
    if trial % 6 == 0:
        x, n = x[0], 1
    samples = torch.rand(n, c, 2, generator=g, dtype=dtype)
    if trial % 11 == 0:
        samples[..., trial % 2] = 0.0
    if trial % 2:
        out = {"output_size": (int(torch.randint(1, h - kh + 2, (), generator=g)),
                               int(torch.randint(1, w - kw + 2, (), generator=g)))}
    else:
        out = {"output_ratio": tuple(float(v) * 0.9 + 0.05 for v in torch.rand(2, generator=g))}
    return x, (kh, kw), out, samples


def _same(got, want) -> bool:
    return all(a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
               for a, b in zip(got, want, strict=True))


def test_port_gives_pytorch_values_and_indices_bit_for_bit():
    """Windows from ATen's generate_intervals, the first maximum in row-major window order, the last NaN: the
    port's values and plane-flat indices are PyTorch's, over random shapes, samples, dtypes and options."""
    port, aten_port = PORTS[F.fractional_max_pool2d], PORTS[torch.ops.aten.fractional_max_pool2d]
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        x, k, out, samples = _config(g, trial)
        try:
            want = F.fractional_max_pool2d(x, k, return_indices=True, _random_samples=samples, **out)
        except (RuntimeError, ValueError) as e:  # refused (an output size 0 from a ratio ...): by the port too
            with pytest.raises(type(e)):
                port(x, k, return_indices=True, _random_samples=samples, **out)
            continue
        assert _same(port(x, k, return_indices=True, _random_samples=samples, **out), want), (trial, x.shape, k)
        assert _same((port(x, k, _random_samples=samples, **out),), want[:1])
        assert _same(aten_port(x, k, want[0].shape[-2:], samples), want)


def test_port_draws_the_samples_as_pytorch():
    """Without _random_samples both draw torch.rand(N, C, 2): the same windows, and the RNG left in the same
    state."""
    port = PORTS[F.fractional_max_pool2d]
    x = torch.randn(2, 3, 11, 9, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (F.fractional_max_pool2d, port):
        torch.manual_seed(5)
        results.append((*fn(x, (3, 2), output_ratio=(0.5, 0.7), return_indices=True), torch.rand(4)))
    assert _same(results[0], results[1])


def _tied_problem(dtype=torch.float64, batched=True):
    g = torch.Generator().manual_seed(2)
    shape = (2, 3, 9, 8) if batched else (3, 9, 8)
    x = torch.randint(-1, 2, shape, generator=g).to(dtype)  # integer values: ties in most windows
    samples = torch.rand(2 if batched else 1, 3, 2, generator=g, dtype=dtype)
    out_shape = (*shape[:-2], 4, 5)
    weights = torch.randn(out_shape, generator=g, dtype=dtype)
    f = lambda x: (F.fractional_max_pool2d(x, (3, 2), (4, 5), _random_samples=samples) * weights).sum()
    return f, x


@pytest.mark.parametrize("batched", [True, False])
def test_generalized_grad_at_ties_is_pytorchs_gradient_along_the_seed_direction(batched):
    """At tied windows the max's rule takes the element largest along the direction: the gradient is PyTorch's at
    x + t d (t -> 0+, d the seed's direction), where no window ties."""
    f, x = _tied_problem(batched=batched)
    for seed in range(3):
        got = gw.generalized_grad(f, x, seed=seed)[0]
        d = gw._nonsmooth._engine._random_direction((x,), seed)[0][0]
        y = (x + 1e-7 * d).requires_grad_(True)
        assert torch.equal(got, torch.autograd.grad(f(y), y)[0]), seed


def test_directional_derivative_at_ties_matches_one_sided_differences():
    f, x = _tied_problem()
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        assert float(gw.directional_derivative(f, x, d)) == pytest.approx(one_sided(f, [x], [d]), abs=1e-5)


def test_indices_at_ties_follow_the_direction():
    """return_indices at a tie names the element the rule chose. Values placed back there (as max_unpool does)
    under position-dependent weights jump as the tie breaks: refused, never PyTorch's index convention; under
    equal weights f is continuous and its one-sided derivative is the finite difference's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 2, (1, 2, 7, 7), generator=g).double()
    samples = torch.rand(1, 2, 2, generator=g, dtype=torch.float64)

    def f(x, weights):
        v, i = F.fractional_max_pool2d(x, 2, (4, 4), return_indices=True, _random_samples=samples)
        placed = torch.zeros(1, 2, 49, dtype=x.dtype).scatter_add(-1, i.flatten(2), v.flatten(2))
        return (placed.reshape(1, 2, 7, 7) * weights).sum()

    d = torch.randn(x.shape, generator=g, dtype=torch.float64)
    with pytest.raises(gw.NonsmoothError, match="jumps"):
        gw.directional_derivative(lambda x: f(x, torch.randn(x.shape, generator=g, dtype=x.dtype)), x, d)
    ones = torch.ones_like(x)
    for _ in range(4):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        assert float(gw.directional_derivative(lambda x: f(x, ones) ** 2, x, d)) \
            == pytest.approx(one_sided(lambda x: f(x, ones) ** 2, [x], [d]), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_away_from_ties_gradient_is_pytorchs_bit_for_bit(dtype):
    """Overlapping windows (an element the max of several): the gradient sums as PyTorch's backward does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 12, 10, generator=g, dtype=dtype)
    samples = torch.rand(2, 3, 2, generator=g, dtype=dtype)
    weights = torch.randn(2, 3, 9, 8, generator=g, dtype=dtype)
    f = lambda x: (F.fractional_max_pool2d(x, (4, 3), (9, 8), _random_samples=samples) * weights).sum()
    y = x.clone().requires_grad_(True)
    assert torch.equal(gw.generalized_grad(f, x)[0], torch.autograd.grad(f(y), y)[0])
    h = lambda x: (torch.ops.aten.fractional_max_pool2d(x, (4, 3), (9, 8), samples)[0] * weights).sum()
    assert torch.equal(gw.generalized_grad(h, x)[0], torch.autograd.grad(h(y), y)[0])


def test_samples_drawn_inside_f_are_pytorchs():
    """f drawing its own samples (output_ratio, no _random_samples): gradwise's passes see the windows PyTorch's
    call would have drawn from the same RNG state, and leave the RNG as that call does."""
    g = torch.Generator().manual_seed(6)
    x = torch.randint(-1, 2, (2, 3, 9, 9), generator=g).double()
    weights = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    f = lambda x: (F.fractional_max_pool2d(x, 2, output_ratio=(0.5, 0.5)) * weights).sum()
    torch.manual_seed(0)
    got, after = gw.generalized_grad(f, x, seed=0)[0], torch.rand(2)
    d = gw._nonsmooth._engine._random_direction((x,), 0)[0][0]
    y = (x + 1e-7 * d).requires_grad_(True)
    torch.manual_seed(0)
    assert torch.equal(got, torch.autograd.grad(f(y), y)[0]) and torch.equal(after, torch.rand(2))
