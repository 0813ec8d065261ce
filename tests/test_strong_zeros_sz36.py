"""Session 36 (sz36): masked attention weights of a checkpointed softmax (``torch.utils.checkpoint``, non-reentrant:
its saved result packed by a hook) that reach the values' product through views and copies (a[None], a copy between
two transposes, a head's select, a 4-d matmul's expand, a reshape that merges heads, repeat). The rules read the
softmax's zeros from its saved result, which the hook packs: a padded value's 0 x inf = NaN stayed where the program
with the padded keys deleted is finite. Weights that are copies of the softmax's elements alone hold its zeros
themselves (``_weights_layout.copies_only``): they are read from the product's own operand.

References: the same program with the padded keys deleted (each sequence on its own rows, float64), and plain
PyTorch where the NaN is genuine (a kept key's zero row; a used key's weight that a float32 copy flushes to 0).
"""

from __future__ import annotations

import math
import warnings

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gw.grad(loss(), [w])[0]
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())
    # (checkpointed, the softmax's result is hidden: which zeros are its own cannot be told, and that is said)
    assert any("a hook hides" in str(c.message) for c in caught) == checkpointed, [str(c.message) for c in caught]


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


# -- under vmap, beside another sample's NaN output ------------------------------------------------------------------
# Under torch.func the masked-weights rules (which read the node's saved weights) stand aside and are named in an
# OpaqueBackwardWarning where the gradients end NaN/Inf. They were named only while every output was finite: where
# another sample's output is NaN (read for the whole batch), a padded sample kept PyTorch's 0 x inf = NaN, which its
# own gw.grad removes, without a word. They are named for the samples whose own outputs are finite
# (_transforms.per_sample_lost): a sample whose output is NaN keeps its NaN unnamed, as its own gw.grad keeps it.
WEIGHTED = {
    "bmm": lambda a, h: a @ h,
    "pooling": lambda a, h: (a[..., None] * h[None]).sum(1),
}


def _vmap_case(weighted, lens, nan_at):
    """Samples of 5 keys, ``lens`` of them kept (the rest zero rows: sqrt's infinite slope), a NaN at sample
    ``nan_at``'s first key (its output NaN) unless None."""
    gen = torch.Generator().manual_seed(36)
    x = torch.randn(len(lens), 5, 4, dtype=D, generator=gen)
    w, q_w = torch.randn(4, 4, dtype=D, generator=gen), torch.randn(4, 4, dtype=D, generator=gen)
    keep = torch.arange(5)[None, :] < torch.tensor(lens)[:, None]
    x[~keep] = 0.0
    if nan_at is not None:
        x[nan_at, 0, 0] = math.nan

    def loss(w, x, keep):
        h = (x @ w).pow(2).sqrt()
        s = (h @ q_w) @ h.T + torch.zeros(keep.shape, dtype=D).masked_fill(~keep, -math.inf)
        return torch.where(keep[:, None], WEIGHTED[weighted](s.softmax(-1), h), 0.0).pow(2).sum()

    return loss, w, x, keep


def _per_sample(loss, w, x, keep, nested):
    if nested:  # two vmap levels: samples in a (2, n/2) grid
        g = torch.func.vmap(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0)), in_dims=(None, 0, 0))
        return g(w, x.unflatten(0, (2, -1)), keep.unflatten(0, (2, -1))).flatten(0, 1)
    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, keep)


def _opaque(weighted, lens, nan_at, nested):
    """The per-sample gradients under strong zeros (which must be PyTorch's: the NaN is named, never hidden) and the
    OpaqueBackwardWarnings given."""
    loss, w, x, keep = _vmap_case(weighted, lens, nan_at)
    plain = _per_sample(loss, w, x, keep, nested)
    with warnings.catch_warnings(record=True) as caught, gw.strong_zeros():
        warnings.simplefilter("always")
        got = _per_sample(loss, w, x, keep, nested)
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())
    return got, [str(c.message) for c in caught if issubclass(c.category, gw.OpaqueBackwardWarning)]


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "vmap(vmap)"])
@pytest.mark.parametrize("weighted", WEIGHTED)
def test_vmap_padded_sample_beside_a_nan_output_is_named(weighted, nested):
    """Sample 1 padded (its own gw.grad finite: the deleted keys'), sample 2's output NaN: sample 1's NaN is named."""
    loss, w, x, keep = _vmap_case(weighted, [5, 3, 5, 4], None)
    assert bool(gw.grad(loss(w.requires_grad_(), x[1], keep[1]), w)[0].isfinite().all()), "premise: its own gw.grad"
    got, named = _opaque(weighted, [5, 3, 5, 4], 2, nested)
    assert got[1].isnan().any() and got[2].isnan().any() and bool(got[0].isfinite().all()), "premise"
    assert any("MmBackward0" in m or "MulBackward0" in m for m in named), named


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "vmap(vmap)"])
@pytest.mark.parametrize("weighted", WEIGHTED)
def test_vmap_nan_output_beside_unpadded_samples_is_not_named(weighted, nested):
    """No sample padded, sample 2's output NaN (a used NaN): its gradient's NaN is genuine and the other samples'
    gradients are finite: no sample whose output is finite ends NaN, nothing is named (the NaN is PyTorch's)."""
    got, named = _opaque(weighted, [5, 5, 5, 5], 2, nested)
    assert got[2].isnan().any() and bool(got[[0, 1, 3]].isfinite().all()), "premise"
    assert not named, named


# -- a checkpoint that hides what the rules read -----------------------------------------------------------------------
# "block": the softmax and the values' product inside one non-reentrant checkpoint (the product's saved weights unpack
# once, for the formula); "scaled": the softmax inside, its weights scaled on the way to the product (only the
# softmax's saved result tells a masked key's 0 from a scaling's underflow). Neither is read: the padded value keeps
# PyTorch's 0 x inf = NaN. Until sz36 without a word: now an OpaqueBackwardWarning names it where the gradients end
# NaN/Inf (the gradients stay PyTorch's, bit for bit).
def _hidden_case(form, pooled, pad, n=3):
    gen = torch.Generator().manual_seed(36)
    x = torch.randn(5, 4, dtype=D, generator=gen)
    w = torch.randn(4, 4, dtype=D, generator=gen, requires_grad=True)
    s = torch.randn(3, 5, dtype=D, generator=gen, requires_grad=True)
    if pad:
        x[n:] = 0.0  # (sqrt's infinite slope at the padded keys' values)

    def weights(s_):
        return (s_ + torch.zeros(5, dtype=D).masked_fill(torch.arange(5) >= n, -math.inf)).softmax(-1)

    def product(a, h):
        return (a[..., None] * h).sum(1) if pooled else torch.bmm(a[None], h[None])

    def loss():
        h = (x @ w).pow(2).sqrt()
        if form == "block":
            out = checkpoint(lambda s_, h_: product(weights(s_), h_), s, h, use_reentrant=False)
        else:
            out = product(checkpoint(weights, s, use_reentrant=False) * 0.5, h)
        return out.pow(2).sum()

    return loss, w


HIDDEN = [(form, pooled) for form in ("block", "scaled") for pooled in (False, True)]


@pytest.mark.parametrize(("form", "pooled"), HIDDEN)
def test_a_hidden_masked_weights_kept_nan_is_named(form, pooled):
    loss, w = _hidden_case(form, pooled, pad=True)
    plain = torch.autograd.grad(loss(), [w])[0]
    assert plain.isnan().any(), "premise: PyTorch's 0 x inf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gw.grad(loss(), [w])[0]
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.nan_to_num(), plain.nan_to_num())
    assert any(issubclass(c.category, gw.OpaqueBackwardWarning) and "a hook hides" in str(c.message)
               for c in caught)


@pytest.mark.parametrize(("form", "pooled"), HIDDEN)
def test_hidden_masked_weights_finite_is_pytorchs(form, pooled):
    """Finite data (no padded value at an infinite slope): PyTorch's bits, no warning (warnings are errors)."""
    loss, w = _hidden_case(form, pooled, pad=False)
    assert torch.equal(gw.grad(loss(), [w])[0], torch.autograd.grad(loss(), [w])[0])
