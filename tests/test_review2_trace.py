"""Review of gw.watch()'s stale-gradient check: a .grad that held NaN before the block, first added to by a later
backward of the block than its first. Ground truth: which .grad holds NaN (set before the block), and gw.trace()'s
report of the same program."""

from __future__ import annotations

import torch

import gradwise as gw


def _program(block):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    a(x).sum().backward()
    a.weight.grad[0, 0] = float("nan")  # left from before the block, never zeroed
    with block() as report:
        b(x).sum().backward()  # the block's first backward reaches b only
        a(x).sum().backward()  # adds finite gradients onto a.weight.grad, NaN since before the block
    assert bool(a.weight.grad.isnan().any()) and bool(b.weight.grad.isfinite().all())
    return report


def test_watch_tells_a_stale_gradient_first_reached_after_the_first_step():
    """The watch read the .grad of the leaves its first backward reached only: a.weight's NaN .grad, reached at
    step 1, was reported as 'No NaN/Inf gradients'."""
    watched, traced = _program(gw.watch), _program(gw.trace)
    expected = [(f.kind, f.reaches, f.step, f.born) for f in traced.findings]
    assert expected == [("nan", ["a.weight"], 1, expected[0][3])]
    assert [(f.kind, f.reaches, f.step, f.born) for f in watched.findings] == expected


def test_watch_tells_a_gradient_made_nan_between_two_backwards():
    """The program writes a NaN into a .grad between two backwards of the block; the second adds finite values.
    gw.trace() names the write; gw.watch() said 'No NaN/Inf gradients and no kinks found'."""
    torch.manual_seed(0)
    a, x = torch.nn.Linear(3, 1), torch.randn(4, 3)
    with gw.watch() as report:
        a(x).sum().backward()
        a.weight.grad.mul_(torch.tensor([[float("nan"), 1.0, 1.0]]))  # the program's own post-processing
        a(x).sum().backward()
    assert bool(a.weight.grad.isnan().any())  # the ground truth
    assert [f.reaches for f in report.findings] == [["a.weight"]]
