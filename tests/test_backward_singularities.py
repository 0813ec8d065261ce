"""Backward formulas that make an infinity or a NaN out of finite saved values, in a branch the output discards.

The check before backward reads saved tensors for NaN/Inf, but these values are finite: the non-finite factor is
made inside the backward formula (``pow``'s ``x ** (p - 1)`` at a negative x, ``acos``'s ``1 / sqrt(1 - x**2)``
beyond 1, ``reciprocal``'s ``result ** 2`` overflowing, ``nll_loss``'s division by a total weight of 0). Each
node's singular-point test (``NODE_FACTS``) must send such a graph to the strong pass. The reference is the
same program with the discarded branch fed a harmless value instead (the "double where" rewrite), so the
discarded values are deleted from it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise._strong_zeros._autograd_graph import _root_nodes, _walk
from gradwise._strong_zeros._planning import _plan


def _fed(cond: torch.Tensor, x: torch.Tensor, clean: bool) -> torch.Tensor:
    """x where the branch uses it; with ``clean`` the discarded elements are replaced by 0.5 (deleted)."""
    return torch.where(cond, x, 0.5) if clean else x


def _cube_root(x, clean):
    pos = x >= 0
    return torch.where(pos, _fed(pos, x, clean) ** (1 / 3), -(-_fed(~pos, x, clean)) ** (1 / 3)).sum()


def _quotient(x, clean):
    n = x[:1] * 3  # the numerator needs a gradient: then div's backward computes -g * (n / d) / d for d
    d = x[1:]
    keep = d > 1e-6
    return torch.where(keep, n / _fed(keep, d, clean), n).sum()


SINGULAR: dict[str, tuple[Callable[[torch.Tensor, bool], torch.Tensor], list[float], torch.dtype, str]] = {
    # name: (program(x, clean), x, dtype, node); the program discards its branch where it is singular.
    # At 0.75, 0.5, 0.25 every element takes its regular branch, except in the cube root (one is always NaN)
    "pow_half_of_negative": (lambda x, c: torch.where(x > 0, _fed(x > 0, x, c) ** 0.5, x).sum(), [-4.0, 9.0],
                             torch.float32, "PowBackward0"),
    "pow_1.5_of_negative": (lambda x, c: torch.where(x > 0, _fed(x > 0, x, c) ** 1.5, -x).sum(), [-4.0, 9.0],
                            torch.float64, "PowBackward0"),
    "signed_cube_root": (_cube_root, [-8.0, 27.0, 0.5], torch.float64, "PowBackward0"),
    "pow_minus_2_overflows": (lambda x, c: torch.where(x > 1e-6, _fed(x > 1e-6, x, c) ** -2, 0.0).sum(),
                              [1e-20, 2.0], torch.float32, "PowBackward0"),
    "acos_beyond_one": (lambda x, c: torch.where(x.abs() < 1, _fed(x.abs() < 1, x, c).acos(), 0.0).sum(),
                        [0.5, 1.0000001], torch.float32, "AcosBackward0"),
    "asin_beyond_one": (lambda x, c: torch.where(x.abs() < 1, _fed(x.abs() < 1, x, c).asin(), 0.0).sum(),
                        [-1.5, 0.25], torch.float64, "AsinBackward0"),
    "reciprocal_overflows": (lambda x, c: torch.where(x > 1e-6, _fed(x > 1e-6, x, c).reciprocal(), 0.0).sum(),
                             [1e-20, 2.0], torch.float32, "ReciprocalBackward0"),
    "rsqrt_overflows": (lambda x, c: torch.where(x > 1e-12, _fed(x > 1e-12, x, c).rsqrt(), 0.0).sum(),
                        [1e-30, 4.0], torch.float32, "RsqrtBackward0"),
    "div_by_tiny_overflows": (_quotient, [2.0, 1e-25, 3.0], torch.float32, "DivBackward0"),
    # the node is Log1PBackward0: NODE_FACTS keyed "Log1pBackward0" (no such node), so log1p was an unknown node
    # and every backward through it ran the 'check' pass under the mode
    "log1p_at_minus_one": (lambda x, c: torch.where(x > -1, _fed(x > -1, x, c).log1p(), 0.0).sum(), [-1.0, 3.0],
                           torch.float64, "Log1PBackward0"),
}


@pytest.mark.parametrize("name", list(SINGULAR))
def test_singular_backward_in_a_discarded_branch(name):
    program, values, dtype, node = SINGULAR[name]
    x = torch.tensor(values, dtype=dtype, requires_grad=True)
    loss = program(x, False)
    assert loss.isfinite()
    names = {type(n).__name__ for n in _walk(_root_nodes([loss]))}
    assert node in names, f"the program no longer exercises {node}"
    assert torch.autograd.grad(loss, x, retain_graph=True)[0].isnan().any(), "PyTorch is no longer contaminated"
    assert _plan([loss], [None]) == "strong"
    (got,) = gw.grad(loss, x)
    (expected,) = torch.autograd.grad(program(x, True), x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(SINGULAR))
def test_singular_tests_stay_quiet_on_regular_points(name):
    """The same programs where every element takes the regular branch: plain PyTorch, bitwise."""
    program, values, dtype, _ = SINGULAR[name]
    if name == "signed_cube_root":
        pytest.skip("one branch of the signed cube root is NaN at every x but 0, which is singular itself")
    x = torch.tensor([0.75, 0.5, 0.25][: len(values)], dtype=dtype, requires_grad=True)
    loss = program(x, False)
    assert _plan([loss], [None]) == "plain"
    assert torch.equal(gw.grad(loss, x)[0], torch.autograd.grad(program(x, False), x)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_loss_whose_total_weight_is_zero_and_is_discarded(reduction):
    """cross_entropy(reduction='mean') with every target of class weight 0 is 0/0 = NaN; the program replaces
    that NaN loss by 0, so no gradient reaches the logits (the program without the loss: zeros)."""
    torch.manual_seed(0)
    z = torch.randn(2, 3, requires_grad=True)
    ce = F.cross_entropy(z, torch.tensor([2, 2]), weight=torch.tensor([1.0, 1.0, 0.0]), reduction=reduction)
    loss = torch.where(ce.isnan(), 0.0, ce)
    (got,) = gw.grad(loss, z, retain_graph=True)
    if reduction == "mean":
        assert torch.autograd.grad(loss, z)[0].isnan().all()
        assert torch.equal(got, torch.zeros_like(z))
    else:  # the summed loss is a finite 0 and used: its gradient is PyTorch's, which is finite
        assert torch.equal(got, torch.autograd.grad(F.cross_entropy(z, torch.tensor([2, 2]),
                                                                    weight=torch.tensor([1.0, 1.0, 0.0]),
                                                                    reduction="sum"), z)[0])


def test_every_node_name_the_node_facts_key_is_a_node_of_torch():
    """A fact keyed by a name no node has never applies ("Log1pBackward0" for Log1PBackward0, "DetachBackward0",
    which no graph holds): autograd's generated nodes are the classes of ``torch._C._functions``."""
    from gradwise._strong_zeros import _node_facts as nf

    names = {*nf.NODE_FACTS, *nf.MAKES_NO_ZEROS, *nf.COMPARES_SAVED_ONLY, *nf.SCALES_BY_ITS_ZEROS, *nf.FLAT_ZEROS,
             *nf.FUSED_BACKWARDS}
    generated = {n for n in names if n[-1].isdigit() and n[:-1].endswith("Backward")}
    assert generated - set(dir(torch._C._functions)) == set()
