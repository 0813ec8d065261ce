"""The check before backward (``_plan``) skips saved tensors that lie on a strict path from a finite output.

Each table entry it relies on is checked here against PyTorch's forward ops, with NaN/Inf put into the inputs:
STRICT_EDGES (a NaN/Inf in a strict input shows in the output), _SAVED_INPUTS (a saved tensor is the input it
is said to be) and _SUBSET_OF_INPUT (the output holds only the input's elements). The end-to-end tests show
what the skip saves and that every way a non-finite value can hide from the output still takes the strong pass.
"""

from __future__ import annotations

from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from gradwise import _strong_zeros as _sz

aten = torch.ops.aten
nan, inf = float("nan"), float("inf")

# Per node type: a program whose output's grad_fn is that node, and the shapes of its inputs, given in the
# order of the node's edges (next_functions), all leaves.
STRICT_PROGRAMS: dict[str, tuple[Callable[..., torch.Tensor], tuple[tuple[int, ...], ...]]] = {
    "AddBackward0": (lambda a, b: a + b, ((3, 4), (4,))),
    "AddBackward1": (lambda a: aten.add.Scalar(a, 2.0), ((3, 4),)),
    "SubBackward0": (lambda a, b: torch.sub(a, b, alpha=0), ((3, 4), (4,))),
    "SubBackward1": (lambda a: aten.sub.Scalar(a, 2.0), ((3, 4),)),
    "MulBackward0": (lambda a, b: a * b, ((3, 4), (3, 1))),
    "MulBackward1": (lambda a: aten.mul.Scalar(a, 0.0), ((3, 4),)),
    "NegBackward0": (lambda a: -a, ((3, 4),)),
    "ViewBackward0": (lambda a: a.view(-1), ((3, 4),)),
    "UnsafeViewBackward0": (lambda a: aten._unsafe_view(a, (4, 3)), ((3, 4),)),
    "ReshapeAliasBackward0": (lambda a: aten._reshape_alias(a, (4, 3), (3, 1)), ((3, 4),)),
    "TBackward0": (lambda a: a.t(), ((3, 4),)),
    "TransposeBackward0": (lambda a: a.transpose(0, 1), ((3, 4),)),
    "PermuteBackward0": (lambda a: a.permute(1, 0), ((3, 4),)),
    "UnsqueezeBackward0": (lambda a: a.unsqueeze(1), ((3, 4),)),
    "SqueezeBackward0": (lambda a: a.squeeze(), ((3, 1, 4),)),
    "SqueezeBackward1": (lambda a: a.squeeze(1), ((3, 1, 4),)),
    "SqueezeBackward2": (lambda a: a.squeeze((1,)), ((3, 1, 4),)),
    "ExpandBackward0": (lambda a: a.expand(3, 4), ((1, 4),)),
    "CloneBackward0": (lambda a: a.clone(), ((3, 4),)),
    "AliasBackward0": (lambda a: aten.alias(a), ((3, 4),)),
    "ToCopyBackward0": (lambda a: a.to(torch.float32), ((3, 4),)),
    "NativeLayerNormBackward0": (lambda a, w, b: F.layer_norm(a, (4,), w, b), ((3, 4), (4,), (4,))),
    "DivBackward0": (lambda a, b: a / b, ((3, 4), (4,))),
    "DivBackward1": (lambda a: aten.div.Scalar(a, 0.0), ((3, 4),)),
    "PowBackward0": (lambda a: a**0.5, ((3, 4),)),
    "SumBackward0": (lambda a: a.sum(), ((3, 4),)),
    "SumBackward1": (lambda a: a.sum(1), ((3, 4),)),
    "MeanBackward0": (lambda a: a.mean(), ((3, 4),)),
    "MeanBackward1": (lambda a: a.mean(0), ((3, 4),)),
    "MmBackward0": (lambda a, b: a @ b, ((3, 4), (4, 2))),
    "AddmmBackward0": (lambda b, m1, m2: torch.addmm(b, m1, m2), ((2,), (3, 4), (4, 2))),
}


def _leaves(shapes):
    return [(torch.rand(s, dtype=torch.float64) + 0.5).requires_grad_() for s in shapes]


def _strict_edges(node) -> tuple[int, ...]:
    edges, condition = _sz.STRICT_EDGES[type(node).__name__]
    assert condition is None or condition(node), "the sample must meet the entry's condition"
    return tuple(range(len(node.next_functions))) if edges is True else edges


@pytest.mark.parametrize("name", sorted(_sz.STRICT_EDGES))
def test_a_nan_or_inf_in_a_strict_input_shows_in_the_output(name):
    """Every element of every strict input, set to NaN, +Inf and -Inf in turn: the output holds a NaN/Inf."""
    assert name in STRICT_PROGRAMS, f"add a program producing {name} to STRICT_PROGRAMS"
    f, shapes = STRICT_PROGRAMS[name]
    inputs = _leaves(shapes)
    node = f(*inputs).grad_fn
    assert type(node).__name__ == name
    for k, t in enumerate(inputs):  # the edges are the inputs, in this order
        assert node.next_functions[k][0].variable is t
    for k in _strict_edges(node):
        for i in range(inputs[k].numel()):
            for fill in (nan, inf, -inf):
                values = [t.detach().clone() for t in inputs]
                values[k].view(-1)[i] = fill
                assert not f(*values).isfinite().all(), f"{name}: {fill} at input {k}[{i}] vanished"


@pytest.mark.parametrize(("name", "f", "shapes", "edge", "fill"), [
    ("AddmmBackward0", lambda b, m1, m2: torch.addmm(b, m1, m2, beta=0), ((2,), (3, 4), (4, 2)), 0, nan),
    ("AddmmBackward0", lambda b, m1, m2: torch.addmm(b, m1, m2, alpha=0), ((2,), (3, 4), (4, 2)), 1, inf),
    ("AddmmBackward0", lambda b, m1, m2: torch.addmm(b, m1, m2), ((2,), (3, 0), (0, 2)), 1, None),
    ("MmBackward0", lambda a, b: a @ b, ((3, 0), (0, 2)), 0, None),
    ("PowBackward0", lambda a: a**0, ((3,),), 0, nan),
    ("PowBackward0", lambda a: a**-1, ((3,),), 0, inf),
    ("SumBackward1", lambda a: a.sum(1), ((3, 0),), 0, None),
    ("MeanBackward0", lambda a: a.mean(), ((0,),), 0, None),
])
def test_conditions_fail_where_a_nan_or_inf_can_vanish(name, f, shapes, edge, fill):
    """The controls: where an entry's condition fails, the input is indeed not strict (a NaN/Inf put there
    leaves the output finite, or the input is empty while the output is not)."""
    inputs = _leaves(shapes)
    node = f(*inputs).grad_fn
    assert type(node).__name__ == name
    assert not _sz.STRICT_EDGES[name][1](node)
    values = [t.detach().clone() for t in inputs]
    if fill is None:
        assert values[edge].numel() == 0 and f(*values).numel() > 0
    else:
        values[edge].view(-1)[0] = fill
        assert f(*values).isfinite().all()


SAVED_PROGRAMS: dict[str, tuple[Callable[..., torch.Tensor], tuple[tuple[int, ...], ...]]] = {
    "MulBackward0": STRICT_PROGRAMS["MulBackward0"],
    "DivBackward0": STRICT_PROGRAMS["DivBackward0"],
    "PowBackward0": STRICT_PROGRAMS["PowBackward0"],
    "MmBackward0": STRICT_PROGRAMS["MmBackward0"],
    "AddmmBackward0": STRICT_PROGRAMS["AddmmBackward0"],
    "BmmBackward0": (torch.bmm, ((2, 3, 4), (2, 4, 2))),
    "NativeLayerNormBackward0": STRICT_PROGRAMS["NativeLayerNormBackward0"],
    "ConvolutionBackward0": (F.conv2d, ((1, 2, 5, 5), (3, 2, 3, 3))),
}


@pytest.mark.parametrize("name", sorted(_sz._SAVED_INPUTS))
def test_saved_tensors_are_the_inputs_at_their_edges(name):
    f, shapes = SAVED_PROGRAMS[name]
    inputs = _leaves(shapes)
    node = f(*inputs).grad_fn
    assert type(node).__name__ == name
    for attr, k in _sz._SAVED_INPUTS[name].items():
        assert node.next_functions[k][0].variable is inputs[k]
        saved = getattr(node, attr).data
        assert saved.data_ptr() == inputs[k].data_ptr() and torch.equal(saved, inputs[k].detach()), attr


SUBSET_PROGRAMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ViewBackward0": lambda a: a.view(-1),
    "ReshapeAliasBackward0": lambda a: aten._reshape_alias(a, (4, 3), (3, 1)),
    "TBackward0": lambda a: a.t(),
    "TransposeBackward0": lambda a: a.transpose(0, 1),
    "PermuteBackward0": lambda a: a.permute(1, 0),
    "UnsqueezeBackward0": lambda a: a.unsqueeze(0),
    "SqueezeBackward0": lambda a: a.unsqueeze(0).squeeze(),
    "SqueezeBackward1": lambda a: a.unsqueeze(0).squeeze(0),
    "SqueezeBackward2": lambda a: a.unsqueeze(0).squeeze((0,)),
    "ExpandBackward0": lambda a: a[:1].expand(5, 4),
    "AliasBackward0": lambda a: aten.alias(a),
    "SliceBackward0": lambda a: a[1:],
    "SelectBackward0": lambda a: a[1],
}


@pytest.mark.parametrize("name", sorted(_sz._SUBSET_OF_INPUT))
def test_subset_ops_are_views_holding_only_their_inputs_elements(name):
    a = torch.arange(12, dtype=torch.float64).view(3, 4).requires_grad_()
    out = SUBSET_PROGRAMS[name](a)
    node = out.grad_fn
    while type(node).__name__ != name:  # the op of interest may follow a helper (unsqueeze, slice)
        node = node.next_functions[0][0]
    assert torch.isin(out.detach(), a.detach()).all()
    assert out._is_view() and out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    before = out._version
    with torch.no_grad():
        a.add_(1)
    assert out._version > before, "a write to the base must show in the view's version"


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def _reads(loss) -> tuple[str, list[torch.Tensor]]:
    read: list[torch.Tensor] = []
    real = _sz._all_finite

    def spy(tensors):
        read.extend(tensors)
        return real(tensors)

    with mock.patch.object(_sz, "_all_finite", spy):
        plan = _sz._plan([loss], [None])
    return plan, read


def _residual(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h = x @ w1.t()  # below the relu, and on the strict path through the residual sum
    return (torch.relu(h) @ w2.t() + h).square().mean()


@pytest.mark.parametrize("stepped", [False, True])
def test_a_weight_on_a_strict_path_is_not_read(stepped):
    """h = x W1^T feeds a relu (structural zeros reach W1's node) and the residual sum (a strict path to the
    loss): W1 (saved for x's gradient) and x (saved for W1's) are finite if the loss is, so the check reads the
    loss alone; also after an optimizer-like in-place update of W1 (its node uses it strictly itself)."""
    torch.manual_seed(0)
    w1 = torch.randn(8, 4, requires_grad=True)
    if stepped:
        with torch.no_grad():
            w1.mul_(0.5)
    w2 = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(16, 4, requires_grad=True)
    plan, read = _reads(_residual(w1, w2, x))
    assert plan == "plain"
    assert [t.numel() for t in read] == [1]  # the loss
    got = gw.grad(_residual(w1, w2, x), (w1, w2, x))
    expected = torch.autograd.grad(_residual(w1, w2, x), (w1, w2, x))
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_a_nan_the_loss_depends_on_is_seen_through_the_loss():
    """A NaN in W1 on the strict path makes the loss NaN: the backward takes the strong pass, whose
    gradients are PyTorch's (all NaN: the loss really depends on it)."""
    torch.manual_seed(0)
    w1 = torch.randn(8, 4)
    w1[2, 1] = nan
    w1.requires_grad_()
    w2 = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(16, 4, requires_grad=True)  # W1 is saved for x's gradient
    plan, _ = _reads(_residual(w1, w2, x))
    assert plan == "strong"
    got = gw.grad(_residual(w1, w2, x), (w1, w2))
    assert all(g.isnan().all() for g in got)


def test_minus_infinity_hidden_by_a_relu_is_read():
    """relu(-inf) = 0 is not strict: a -inf weight whose unit the relu switches off leaves the loss finite,
    while x's gradient meets it as 0 x -inf in PyTorch. The weight below the relu is read, and the gradients are
    those of the program with the weight finite (the unit stays off)."""
    torch.manual_seed(0)
    x = (torch.rand(16, 4) + 0.5).requires_grad_()
    w1 = torch.randn(8, 4)
    w1[3, 1] = -inf
    w1.requires_grad_()
    w2 = torch.randn(2, 8, requires_grad=True)

    def loss(w1):
        return (torch.relu(x @ w1.t()) @ w2.t()).square().mean()

    assert loss(w1).isfinite()
    assert torch.autograd.grad(loss(w1), x)[0][:, 1].isnan().all()
    plan, _ = _reads(loss(w1))
    assert plan == "strong"
    got = gw.grad(loss(w1), (x, w1, w2))
    finite = w1.detach().clone()
    finite[3, 1] = -1e30
    expected = torch.autograd.grad(loss(finite.requires_grad_()), (x, finite, w2))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_a_value_hidden_by_an_empty_reduction_is_read():
    """(a + empty).sum() is a finite 0 whatever a holds: the sum's input is empty, so it is not strict and the
    NaN saved by a's node is read. With the emptiness condition switched off the check would say 'plain'."""
    x = torch.tensor([nan], requires_grad=True)  # saved by the product for w's gradient; its producer is x's
    w = torch.ones(1, requires_grad=True)

    def loss():
        a = x * w
        return (a + torch.empty(0)).sum() + a[:0].sum()

    assert loss().isfinite()
    assert _reads(loss())[0] == "strong"
    types = dict(_sz._NODE_TYPES)
    with mock.patch.dict(_sz.STRICT_EDGES, {name: (True, None) for name in ("SumBackward0",)}):
        _sz._NODE_TYPES.clear()
        try:
            assert _reads(loss())[0] == "plain"
        finally:
            _sz._NODE_TYPES.clear()
            _sz._NODE_TYPES.update(types)


def test_an_output_written_in_place_starts_no_strict_path():
    """The check reads the outputs' values at backward time: a loss overwritten in place through a detached
    alias no longer shows what its op computed, so nothing is skipped on its account."""
    torch.manual_seed(0)
    w1 = torch.randn(8, 4)
    w1[2, 1] = nan
    w1.requires_grad_()
    w2 = torch.randn(8, 8, requires_grad=True)
    loss = _residual(w1, w2, torch.randn(16, 4, requires_grad=True))  # W1 is saved for x's gradient
    loss.detach().zero_()
    plan, read = _reads(loss)
    assert plan == "strong" and any(t.data_ptr() == w1.data_ptr() for t in read)


# Found by review: each of these said 'plain' while a skipped saved tensor held -inf (x's gradient meets relu's
# structural zero times it: PyTorch gives NaN, the program without the unused value 0).
def _relu_meets(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * w).sum()  # 0 where w = -inf; x's gradient meets 0 x -inf


def _check_strong(loss, x):
    assert loss.isfinite()
    assert _reads(loss)[0] == "strong"
    assert torch.autograd.grad(loss, x, retain_graph=True)[0].isnan().all()
    assert torch.equal(gw.grad(loss, x)[0], torch.zeros_like(x))


def test_a_condition_is_checked_for_a_node_first_met_off_the_strict_path():
    """The empty sum is first reached through exp (not strict), then through the strict sum: its condition
    (a non-empty input) must still be checked."""
    w = torch.tensor([-inf], requires_grad=True)
    x = torch.tensor([1.0], requires_grad=True)
    s = w.expand(0).sum()
    _check_strong(_relu_meets(w, x) + s + torch.exp(s), x)


@pytest.mark.parametrize("through", ["leaf", "product", "copy"])
def test_a_value_written_in_place_after_its_strict_use_is_read(through):
    """sum(a) sees a finite value; written in place under no_grad (no version error: the sum saves nothing),
    a then holds -inf where the product saves it. A written tensor (version > 0) is read, and so is a copy of
    one (copies are not among the views a skip looks through)."""
    w = torch.tensor([1.0], requires_grad=True)
    x = torch.tensor([1.0], requires_grad=True)
    a = w if through == "leaf" else w * 2
    s = a.sum()
    with torch.no_grad():
        a.fill_(-inf)
    _check_strong(_relu_meets(a.clone() if through == "copy" else a, x) + s, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_factor_that_rounds_to_zero_in_the_dtype_is_not_strict(dtype):
    """addmm's beta = 1e-320 and x ** 1e-8 in float16 are 0 once cast to the dtype: the bias and the base are
    then not strict (the output ignores a NaN there), and the saved -inf is read."""
    b = torch.tensor([-inf], dtype=dtype, requires_grad=True)
    x = torch.tensor([1.0], dtype=dtype, requires_grad=True)
    one = torch.ones(1, 1, dtype=dtype)
    assert torch.addmm(torch.tensor([nan], dtype=dtype), one, one, beta=1e-320).isfinite().all()
    _check_strong(_relu_meets(b, x) + torch.addmm(b, one, one, beta=1e-320).sum(), x)
    if dtype == torch.float16:
        assert (torch.tensor([nan], dtype=dtype) ** 1e-8).isfinite().all()
        _check_strong(_relu_meets(b, x) + (b**1e-8).sum(), x)
