"""Review of compat214c: the trace's follow of an fmax/fmin that ignored a lone NaN (``_Shadow.follow_discard``).

References: the same program run without the trace (its gradients and its random generator's state), and gw.grad
(strong zeros) for the classification.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw


def _nan_at_two():
    return torch.tensor([0.5, 3.0, -1.0], requires_grad=True)


def _drawn_after(trace: bool):
    """What the generator draws after a backward whose fmax node (one operand a lone NaN, sqrt(-1)) runs a hook
    that draws random numbers."""
    x = _nan_at_two()
    y = torch.fmax(torch.zeros(3), x.sqrt())
    y.register_hook(lambda g: g + torch.rand_like(g) * 0)
    out = y.sum()
    torch.manual_seed(0)
    if trace:
        with gw.trace():
            torch.autograd.grad(out, [x])
    else:
        torch.autograd.grad(out, [x])
    return torch.rand(4)


def test_a_hook_drawing_random_numbers_at_an_ignoring_fmax_keeps_the_generator():
    """follow_discard ran every op while the fmax node ran, the hook's rand_like included, again: the trace drew
    random numbers of its own and the program's next draws changed (SILENT: the traced program's state)."""
    assert torch.equal(_drawn_after(True), _drawn_after(False))


def _checkpointed(x):
    r = torch.rand(3)
    return torch.fmax(torch.zeros(3), x.sqrt() * torch.rand(3) + r)


def _checkpointed_grad(trace: bool):
    x = _nan_at_two()
    torch.manual_seed(0)
    out = checkpoint(_checkpointed, x, use_reentrant=False).sum()
    if trace:
        with gw.trace():
            (g,) = torch.autograd.grad(out, [x])
    else:
        (g,) = torch.autograd.grad(out, [x])
    return g


def test_a_checkpointed_ignoring_fmax_recomputes_what_its_forward_drew():
    """The checkpoint recomputes its forward when the fmax node first unpacks a saved tensor: follow_discard ran
    the recomputed torch.rand again inside the checkpoint's forked generator, so the recomputation's second draw
    differed from the forward's and the gradient changed (SILENT: [0.35, 0.26, nan] for [0.09, 0.09, nan])."""
    torch.testing.assert_close(_checkpointed_grad(True), _checkpointed_grad(False), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("create_graph", [False, True])
def test_a_genuine_nan_under_a_carried_ignored_nan_reaches_the_gradient(create_graph):
    """SILENT (older than compat214c: base 97794c8 the same): a genuine NaN born below an fmax that ignored it
    (sqrt's backward, where y * s's nonzero sensitivity for s meets sqrt(-1)) was hidden under the contamination
    that torch 2.14's fmax formula carries to the same element (and, on 2.13, the value heuristics where
    follow_discard gave up at the formula's own in-place logical_or_): contamination reached x and the genuine NaN
    no gradient, where gw.grad keeps NaN at x[2]."""
    x = _nan_at_two()
    z = torch.zeros(3)

    def program(x):
        s = x.sqrt()
        return (torch.fmax(z, s) * s).sum()

    (g,) = gw.grad(program(x), [x])
    assert g[2].isnan()
    with gw.trace() as report:
        torch.autograd.grad(program(x), [x], create_graph=create_graph)
    assert any(f.reaches == ["x"] for f in report.of_kind("nan")), str(report)
    assert not any(f.reaches for f in report.of_kind("contamination")), str(report)
