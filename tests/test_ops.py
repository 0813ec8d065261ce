"""The shared kink facts (gradwise._ops._kinks): the table's shape, and each exact location against one-sided
finite differences on integer data, where ties and bounds are frequent."""

from __future__ import annotations

import math

import pytest
import torch

from gradwise._ops._kinks import KINKS, OpCall, at_kink, kink_fact

aten = torch.ops.aten


def test_every_fact_says_where_and_what_pytorch_returns():
    for op, fact in KINKS.items():
        assert fact.kind in ("kink", "singular", "jump"), op
        assert fact.convention, op
        assert fact.locate.__doc__ and fact.locate.__name__.startswith("_"), op


def test_in_place_variants_and_smooth_ops():
    assert kink_fact(aten.relu_) is KINKS[aten.relu]
    assert kink_fact(aten.clamp_min_.default) is KINKS[aten.clamp_min]
    assert kink_fact(aten.copy_) is KINKS[aten.copy]  # (into an integer tensor: a cast)
    assert kink_fact(aten.add) is None and kink_fact(aten.mul_) is None


# op name -> (function of float64 x (values only), the aten op it reaches, a call of that op from x, input shape)
EXACT = {
    "relu": (torch.relu, aten.relu, lambda x: ((x,), {}), (6,)),
    "abs": (torch.abs, aten.abs, lambda x: ((x,), {}), (6,)),
    "clamp": (lambda x: x.clamp(-1, 1), aten.clamp, lambda x: ((x, -1, 1), {}), (6,)),
    "hardtanh": (torch.nn.functional.hardtanh, aten.hardtanh, lambda x: ((x,), {}), (6,)),
    "maximum": (lambda x: torch.maximum(x[:3], x[3:]), aten.maximum, lambda x: ((x[:3], x[3:]), {}), (6,)),
    "max.dim": (lambda x: x.view(2, 3).max(1).values, aten.max, lambda x: ((x.view(2, 3), 1), {}), (6,)),
    "min": (lambda x: x.min(), aten.min, lambda x: ((x,), {}), (6,)),
    "amax": (lambda x: x.view(2, 3).amax(0), aten.amax, lambda x: ((x.view(2, 3), [0]), {}), (6,)),
    "sort": (lambda x: x.view(2, 3).sort(1).values, aten.sort, lambda x: ((x.view(2, 3), 1), {}), (6,)),
    "topk": (lambda x: x.view(2, 3).topk(2, 1).values, aten.topk, lambda x: ((x.view(2, 3), 2, 1), {}), (6,)),
    "kthvalue": (lambda x: x.view(2, 3).kthvalue(2, 1).values, aten.kthvalue,
                 lambda x: ((x.view(2, 3), 2, 1), {}), (6,)),
    "median.dim": (lambda x: x.view(2, 3).median(1).values, aten.median, lambda x: ((x.view(2, 3), 1), {}), (6,)),
    "cummax": (lambda x: x.view(2, 3).cummax(1).values, aten.cummax, lambda x: ((x.view(2, 3), 1), {}), (6,)),
    "cummin": (lambda x: x.view(2, 3).cummin(0).values, aten.cummin, lambda x: ((x.view(2, 3), 0), {}), (6,)),
    "max_pool2d": (lambda x: torch.nn.functional.max_pool2d(x.view(1, 1, 4, 4), 3, 2, 1),
                   aten.max_pool2d_with_indices, lambda x: ((x.view(1, 1, 4, 4), [3, 3], [2, 2], [1, 1]), {}), (16,)),
    "adaptive_max_pool2d": (lambda x: torch.nn.functional.adaptive_max_pool2d(x.view(1, 1, 3, 3), 2),
                            aten.adaptive_max_pool2d, lambda x: ((x.view(1, 1, 3, 3), [2, 2]), {}), (9,)),
    "multi_margin_loss": (lambda x: torch.nn.functional.multi_margin_loss(x.view(2, 3), torch.tensor([0, 2]),
                                                                         reduction="none"),
                          aten.multi_margin_loss, lambda x: ((x.view(2, 3), torch.tensor([0, 2])), {}), (6,)),
    "multilabel_margin_loss": (
        lambda x: torch.nn.functional.multilabel_margin_loss(x.view(2, 3), torch.tensor([[0, -1, 2], [1, 2, -1]]),
                                                             reduction="none"),
        aten.multilabel_margin_loss_forward, lambda x: ((x.view(2, 3), torch.tensor([[0, -1, 2], [1, 2, -1]]), 0),
                                                        {}), (6,)),
    **{f"cdist p={p:g}": (lambda x, p=p: torch.cdist(x.view(3, 2)[:1], x.view(3, 2)[1:], p),
                          aten._cdist_forward, lambda x, p=p: ((x.view(3, 2)[:1], x.view(3, 2)[1:], p, None), {}), (6,))
       for p in (1.0, 2.0, math.inf)},
    "pdist p=2": (lambda x: torch.pdist(x.view(3, 2)), aten._pdist_forward, lambda x: ((x.view(3, 2), 2.0), {}), (6,)),
    "dist p=1": (lambda x: torch.dist(x[:3], x[3:], 1), aten.dist, lambda x: ((x[:3], x[3:], 1), {}), (6,)),
    "norm-1": (lambda x: torch.linalg.vector_norm(x.view(2, 3), 1, 1), aten.linalg_vector_norm,
               lambda x: ((x.view(2, 3), 1, [1]), {}), (6,)),
    "norm-inf": (lambda x: torch.linalg.vector_norm(x.view(2, 3), math.inf, 1), aten.linalg_vector_norm,
                 lambda x: ((x.view(2, 3), math.inf, [1]), {}), (6,)),
    "floor": (lambda x: (x / 2).floor(), aten.floor, lambda x: ((x / 2,), {}), (6,)),
    "round": (lambda x: (x / 2).round(), aten.round, lambda x: ((x / 2,), {}), (6,)),
    "remainder": (lambda x: x.remainder(2.0), aten.remainder, lambda x: ((x, 2.0), {}), (6,)),
    "div floor": (lambda x: torch.div(x, 2, rounding_mode="floor"), aten.div,
                  lambda x: ((x, 2), {"rounding_mode": "floor"}), (6,)),
    "div trunc": (lambda x: torch.div(x, -2, rounding_mode="trunc"), aten.div,
                  lambda x: ((x, -2), {"rounding_mode": "trunc"}), (6,)),
    "logit eps": (lambda x: torch.logit(x / 4 + 0.5, 0.25), aten.logit, lambda x: ((x / 4 + 0.5, 0.25), {}), (6,)),
    "scatter_reduce-amax": (
        lambda x: x.new_zeros(3).scatter_reduce(0, torch.tensor([0, 1, 1, 2, 2, 2]), x, "amax", include_self=False),
        aten.scatter_reduce, lambda x: ((x.new_zeros(3), 0, torch.tensor([0, 1, 1, 2, 2, 2]), x, "amax"),
                                        {"include_self": False}), (6,)),
}


def _kink_by_differences(f, x: torch.Tensor, h: float = 1e-4) -> bool:
    """Whether the one-sided directional derivative of a weighted sum of f's outputs (distinct integer weights, so
    no tie cancels out) is not linear: D(-e_i) != -D(e_i), or D(e_i + e_j) != D(e_i) + D(e_j) (all tied at a
    median: each coordinate alone moves nothing, two together do)."""
    out = f(x)
    w = torch.randperm(out.numel(), generator=torch.Generator().manual_seed(0)).double().add(1).view(out.shape)
    at = float((out * w).sum())
    eye = torch.eye(x.numel(), dtype=x.dtype)

    def slope(d):
        return (float((f(x + h * d.view(x.shape)) * w).sum()) - at) / h

    one = [slope(e) for e in eye]
    if any(abs(slope(-e) + s) > 1e-2 for e, s in zip(eye, one, strict=True)):
        return True
    return any(abs(slope(eye[i] + eye[j]) - one[i] - one[j]) > 1e-2
               for i in range(x.numel()) for j in range(i + 1, x.numel()))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_locations_agree_with_finite_differences(name):
    """Exact facts: at_kink holds exactly where the one-sided derivatives of the op differ (nonsmooth needs
    every such call: a missed one is a silent wrong derivative; the trace names every element)."""
    f, op, call, shape = EXACT[name]
    g = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(60):
        x = torch.randint(-2, 3, shape, generator=g).double()
        args, kwargs = call(x)
        expected = _kink_by_differences(f, x)
        assert at_kink(KINKS[op], OpCall(args, kwargs, op(*args, **kwargs), op.__name__)) == expected, (name, x)
        seen.add(expected)
    assert seen == {True, False}, "the samples must hit both cases"


def test_coarse_locations_are_supersets():
    """fractional max-pool's fact is coarse (two equal values in a plane; its windows are random): never missing a
    tied window (here with fixed samples, so that its windows are known)."""
    samples = torch.tensor([[[0.3, 0.7]]], dtype=torch.float64)
    f = lambda x: torch.nn.functional.fractional_max_pool2d(x.view(1, 1, 4, 4), 2, output_size=2,
                                                            _random_samples=samples)
    g = torch.Generator().manual_seed(2)
    assert KINKS[aten.fractional_max_pool2d].coarse and not KINKS[aten.adaptive_max_pool2d].coarse
    for _ in range(30):
        x = torch.randint(-4, 5, (16,), generator=g).double()
        out = aten.fractional_max_pool2d(x.view(1, 1, 4, 4), [2, 2], [2, 2], samples)
        if _kink_by_differences(f, x):
            assert at_kink(KINKS[aten.fractional_max_pool2d], OpCall((x.view(1, 1, 4, 4), [2, 2], [2, 2], samples),
                                                                     {}, out, "fractional_max_pool2d")), x


def test_a_power_that_cannot_kink_is_no_kink_op():
    """pow kinks (an infinite derivative at 0) only for an exponent in (0, 1) or a tensor one: a callable the
    nonsmooth mode cannot route that squares runs as smooth (and is remembered so), one with x ** 0.5 does not."""
    from gradwise._nonsmooth._kink_watch import _kink_free_call

    x = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    assert _kink_free_call(lambda t: (t**2).sum(), (x,), {}) is not None
    assert _kink_free_call(lambda t: (t.abs() ** 0.5).sum(), (x,), {}) is None
    assert _kink_free_call(lambda t: t.pow(torch.tensor(2.0)).sum(), (x,), {}) is None
