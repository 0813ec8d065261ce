"""Session 36 (sz36): masked attention weights of a checkpointed softmax (``torch.utils.checkpoint``, non-reentrant:
its saved result packed by a hook) that reach the values' product through views and copies (a[None], a copy between
two transposes, a head's select, a 4-d matmul's expand, a reshape that merges heads, repeat). The rules read the
softmax's zeros from its saved result, which the hook packs: a padded value's 0 x inf = NaN stayed where the program
with the padded keys deleted is finite. Weights that are copies of the softmax's elements alone hold its zeros
themselves (``_rules_bilinear.copies_only``): they are read from the product's own operand.

References: the same program with the padded keys deleted (each sequence on its own rows, float64), and plain
PyTorch where the NaN is genuine (a kept key's zero row; a used key's weight that a float32 copy flushes to 0).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)
from gradwise._strong_zeros import _planning
from gradwise._strong_zeros._node_facts import WEIGHTS_READER, node_info
from test_hunt_sz32 import keeps_the_controls, matches_the_deleted_program
from test_hunt_sz35 import _case as hunt_case

D = torch.float64

# the layouts of test_hunt_sz35 whose nodes between the softmax and the product copy its elements alone
COPIES = ["copy between two transposes", "matmul 3-d x 4-d", "one head (select)", "heads sliced, matmul 4-d x 4-d",
          "heads merged by a reshape", "heads chunked", "heads unbound", "repeated", "weights second: (v^T @ a^T)^T",
          "pooling, copy between two transposes", "addmm per sequence"]


def _softmax(t):
    return checkpoint(lambda u: u.softmax(-1), t, use_reentrant=False)


def _case(layout):
    """test_hunt_sz35's attention (values sqrt((x @ w)^2): an infinite slope at a zero row), its softmaxes
    checkpointed."""
    return hunt_case(layout, softmax=_softmax, seed=36)


@pytest.mark.parametrize("layout", COPIES)
@pytest.mark.parametrize("check", [matches_the_deleted_program, keeps_the_controls], ids=["padded", "controls"])
def test_checkpointed_masked_weights_through_copies(layout, check):
    """Padded keys: the deleted program's gradients. Controls: finite data, PyTorch's bits; a kept key's zero row
    (its weight not 0), PyTorch's NaN stays."""
    x, params, loss_of = _case(layout)
    check(loss_of, params, x, torch.tensor([5, 3]))


def _float32_copy_case(checkpointed):
    """One query over 4 keys, key 1 used with a float64 weight of ~1e-320 (its score 740 below key 0's), which the
    float32 copy of the weights flushes to 0; key 1's value row is zero (sqrt's infinite slope there)."""
    gen = torch.Generator().manual_seed(36)
    x = torch.randn(4, 3, dtype=torch.float32, generator=gen)
    x[1] = 0.0
    w = torch.randn(3, 3, dtype=torch.float32, generator=gen, requires_grad=True)
    s = torch.tensor([[0.0, -740.0, -1.0, -2.0]], dtype=D, requires_grad=True)

    def loss():
        a = (_softmax(s) if checkpointed else s.softmax(-1)).float()  # (ToCopyBackward0: not a copy of each bit)
        return torch.bmm(a[None], (x @ w).pow(2).sqrt()[None]).pow(2).sum()

    with torch.no_grad():
        used = s.softmax(-1)[0, 1]
    assert 0 < float(used) and float(used.float()) == 0, "premise: a used key's weight, flushed by the copy"
    return loss, w


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_used_keys_weight_flushed_by_a_float32_copy_keeps_its_nan(checkpointed):
    """The key is used (its weight in the softmax is not 0): the float32 program's 0 x inf = NaN is its own, and no
    deleted program removes it. A float32 copy is no copy of each weight's bits: its zeros are not the softmax's."""
    loss, w = _float32_copy_case(checkpointed)
    plain = torch.autograd.grad(loss(), [w])[0]
    assert plain.isnan().any(), "premise: the flushed weight's 0 x inf"
    got = gw.grad(loss(), [w])[0]
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())


def test_checkpointed_unpadded_attention_makes_no_zeros_in_the_plan():
    """The plan's fact for a bmm of a checkpointed softmax's copies is read from the bmm's own weights (the walk's
    fact is the node's reader's): no exact 0, no structural zero (it was taken to make zeros)."""
    x, _, loss_of = _case("copy between two transposes")
    loss = loss_of(x, torch.tensor([5, 5]))
    walk = _planning._walked([loss.grad_fn])
    mm = [(n, f) for n, f in walk.facts if node_info(n)[11] is WEIGHTS_READER and n.name() == "BmmBackward0"]
    assert mm
    for node, fact in mm:
        assert fact == node_info(node)[10](node)
    assert not any(f[0] for _, f in mm)
