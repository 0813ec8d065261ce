"""Session 32's hunt in the nonsmooth calculus: how a kink op is called (keywords, an integer or bool operand of a
comparison, NumPy and complex operands). References: float64 one-sided differences along the direction at
decreasing steps, never a formula derived by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwise as gw
from gradwise import NonsmoothError

D = torch.float64
X = torch.zeros(2, dtype=D)
DIRS = [torch.tensor([1.0, 0.5], dtype=D), torch.tensor([-1.0, 0.5], dtype=D), torch.tensor([-0.5, -1.0], dtype=D)]


def one_sided(f, x, d) -> float:
    """f'(x; d) by float64 one-sided differences at steps 1e-6, 1e-7, 1e-8 (which must agree)."""
    with torch.no_grad():
        slopes = [float(f(x + s * d) - f(x)) / s for s in (1e-6, 1e-7, 1e-8)]
    assert max(slopes) - min(slopes) < 1e-5, slopes
    return slopes[-1]


Z2 = torch.zeros(2, dtype=D)
# The same kink ops called with their arguments named (`input=`, `other=`): each rule crashed with a TypeError
# ("rule() got an unexpected keyword argument 'input'"; through an operator it would read "'>' not supported")
KEYWORDS = {
    "gt(input=, other=)": lambda v: torch.where(torch.gt(input=v, other=0.0), v, -v).sum(),
    "gt(v, other=tensor)": lambda v: torch.where(torch.gt(v, other=Z2), v, -v).sum(),
    "Tensor.lt(other=)": lambda v: torch.where(v.lt(other=Z2), -v, v).sum(),
    "abs(input=)": lambda v: torch.abs(input=v).sum(),
    "maximum(v, other=)": lambda v: torch.maximum(v, other=-v).sum(),
    "minimum(input=, other=)": lambda v: torch.minimum(input=v, other=-v).sum(),
    "sign(input=)": lambda v: (torch.sign(input=v) * v).sum(),
    "max(input=, dim=)": lambda v: torch.max(input=v, dim=0, keepdim=False).values,
    "amax(input=)": lambda v: torch.amax(input=v, dim=0),
    "sort(input=)": lambda v: torch.sort(input=v, dim=0, descending=True).values[0],
    "topk(input=)": lambda v: torch.topk(input=v, k=1).values[0],
    "cummax(input=)": lambda v: torch.cummax(input=v, dim=0).values.sum(),
    "clamp_min(input=, min=)": lambda v: torch.clamp_min(input=v, min=0.0).sum(),
    "clip(input=, min=)": lambda v: torch.clip(input=v, min=0.0).sum(),
}


@pytest.mark.parametrize("d", DIRS, ids=["d0", "d1", "d2"])
@pytest.mark.parametrize("f", KEYWORDS.values(), ids=KEYWORDS.keys())
def test_kink_ops_called_with_keywords(f, d):
    assert float(gw.directional_derivative(f, X, d)) == pytest.approx(one_sided(f, X, d), abs=1e-6)


# A comparison of the inputs with an integer or bool tensor (or a bool number): `torch.tensor(0) < x` ran with the
# integer operand first and was taken as never tying, so |x| written with it got slope -1 at 0 along +1 (SILENT);
# a bool operand crashed in gradwise's `a - b` ("Subtraction ... with a bool tensor is not supported")
OPERANDS = {
    "int tensor < x": lambda v: torch.where(torch.tensor(0) < v, v, -v).sum(),
    "lt(int tensor, x)": lambda v: torch.where(torch.lt(torch.zeros(2, dtype=torch.long), v), v, -v).sum(),
    "int tensor >= x": lambda v: torch.where(torch.tensor([0, 0]) >= v, -v, v).sum(),
    "bool tensor < x": lambda v: torch.where(torch.zeros(2, dtype=torch.bool) < v, v, -v).sum(),
    "x > False": lambda v: torch.where(v > False, v, -v).sum(),
    "x > bool tensor": lambda v: torch.where(v > torch.zeros(2, dtype=torch.bool), v, -v).sum(),
    "x == numpy 0-d": lambda v: torch.where(v == np.array(0.0), -v, v).sum(),
    "x > numpy int": lambda v: torch.where(v > np.int64(0), v, -v).sum(),
}


@pytest.mark.parametrize("d", DIRS, ids=["d0", "d1", "d2"])
@pytest.mark.parametrize("f", OPERANDS.values(), ids=OPERANDS.keys())
def test_comparison_with_integer_or_bool_operand(f, d):
    ref = one_sided(f, X, d)
    assert float(gw.directional_derivative(f, X, d)) == pytest.approx(ref, abs=1e-6)
    g = gw.generalized_grad(f, X, seed=0)[0]  # |x| summed: a piece's gradient is a sign vector
    assert g.abs().tolist() == [1.0, 1.0]


def test_comparison_with_none_or_an_object_falls_back_as_python_does():
    """Tensor.__eq__(None) is NotImplemented in PyTorch: Python's fallback answers (False), as without gradwise."""
    f = lambda v: v.sum() * (v == None)  # noqa: E711
    assert float(gw.directional_derivative(f, X, DIRS[0])) == 0.0
    with pytest.raises(TypeError, match="not supported"):
        gw.directional_derivative(lambda v: (v > "a").sum(), X, DIRS[0])


def test_complex_equality_at_a_tie_refuses_clearly():
    """`x == 0j` at x = 0 crashed inside the rule ('"max_values_cpu" not implemented for ComplexDouble'); away
    from the tie it is exact."""
    f = lambda v: (v == 0j).sum() * v.sum()
    with pytest.raises(NonsmoothError, match="complex"):
        gw.directional_derivative(f, X, DIRS[0])
    x1 = torch.ones(2, dtype=D)
    assert float(gw.directional_derivative(f, x1, DIRS[0])) == one_sided(f, x1, DIRS[0]) == 0.0


def test_a_type_error_inside_a_rule_names_the_op(monkeypatch):
    """A TypeError from gradwise's rule under an operator (`x > 0`) became NotImplemented in PyTorch's operator
    wrapper and surfaced as "'>' not supported between instances of 'Tensor' and 'int'"; it is an error naming the
    op and the line, since PyTorch accepts the call."""
    from gradwise._nonsmooth import _rules

    def broken(run, func, a, b):
        raise TypeError("internal")

    monkeypatch.setitem(_rules._ROUTES, torch.Tensor.gt, broken)  # (where `x > 0` arrives)
    f = lambda v: torch.where(v > 0, v, -v).sum()
    with pytest.raises(NonsmoothError, match=r"rule for gt \(called at .*test_hunt_ns32.py:\d+\) failed.*internal"):
        gw.directional_derivative(f, X, DIRS[0])
