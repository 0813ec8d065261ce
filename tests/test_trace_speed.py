"""The trace's per-op fast paths (session 32, issue #16's cost on 6 x Linear(128)+ReLU) find what the slow paths
found: the per-op facts read from the op itself, the relu kink test through a temporary below 64 kB, the
provenance table's empty answer, and ``_safely``'s grad-mode switch without a context manager."""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch

import gradwise as gw
from gradwise._trace import _leaf_names, _tracer
from gradwise._trace._backward_ops import _FORMULA_FIRST
from gradwise._trace._common import _ByIdentity
from gradwise._trace._facts import _ACCUMULATES
from gradwise._trace._tracer import _INFO_ATTR, _op_info

aten = torch.ops.aten


@pytest.mark.parametrize("func", sorted(_ACCUMULATES | _FORMULA_FIRST | {aten.mm.default, aten.relu.default,
                                                                          aten.t.default}, key=str), ids=str)
def test_op_info_flags_match_the_sets(func):
    """The flags the handler reads instead of a set lookup (a Python-level OpOverload hash per op) say what the
    sets say, and the op carries the same facts the table holds."""
    info = _op_info(func)
    assert info.accumulates == (func in _ACCUMULATES)
    assert info.formula_first == (func in _FORMULA_FIRST)
    assert getattr(func, _INFO_ATTR) is info is _tracer._INFO[func]


def _kinks(x: torch.Tensor) -> list[tuple[str, int]]:
    x = x.clone().requires_grad_()
    with gw.trace() as report:
        torch.relu(x).sum().backward()
    return [(f.kind, f.count) for f in report.findings]


# (elements, where the zeros go): 128 x 128 float32 is exactly the 64 kB the temporary takes; 256 x 256 uses the
# per-thread buffer
@pytest.mark.parametrize("n", [5, 128, 256], ids=["tiny", "64kB-temporary", "256kB-buffer"])
@pytest.mark.parametrize("zero", [0.0, -0.0], ids=["+0", "-0"])
def test_relu_kink_found_in_either_path(n, zero):
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).abs() + 0.5
    assert _kinks(x) == []
    x[n // 2, 1] = zero
    x[n - 1, n - 1] = zero
    assert _kinks(x) == [("kink", 2)]


def test_relu_kink_beside_a_nan_still_found():
    """A NaN makes min |x| NaN: the mask is made and the zero found (the NaN is its own finding)."""
    x = torch.ones(128, 128)
    x[0, 0] = float("nan")
    x[3, 3] = 0.0
    kinds = dict(_kinks(x))
    assert kinds.get("kink") == 1


def test_by_identity_truth():
    table = _ByIdentity()
    assert not table
    t = torch.ones(1)
    table[t] = 1
    assert table and t in table


def test_safely_restores_grad_mode_after_a_failure():
    """An internal failure is a note, and grad mode is on again after it (the C switch's finally)."""
    tracer = _tracer._Tracer(256)

    def boom():
        assert not torch.is_grad_enabled()
        raise ValueError("inside")

    assert torch.is_grad_enabled()
    assert tracer._safely("a value", boom) is None
    assert torch.is_grad_enabled()
    assert any("ValueError: inside" in kind for kind in tracer.passed)
    with torch.no_grad():
        assert tracer._safely("a value", lambda: torch.is_grad_enabled()) is False
        assert not torch.is_grad_enabled()
    assert tracer._safely("a value", lambda: torch.is_grad_enabled()) is False
    assert torch.is_grad_enabled()


def _reaches(leaf: torch.Tensor) -> set[str]:
    with gw.trace() as report:
        torch.sqrt(leaf).sum().backward()  # sqrt(-1): a genuine NaN that reaches the leaf
    return {name for f in report.findings for name in f.reaches}


def _new_leaf() -> torch.Tensor:
    return torch.full((3,), -1.0, requires_grad=True)


def test_leaf_names_kept_across_traces_by_identity():
    """The names kept across traces (one trace per step) are found again for the same leaf, and a new leaf (in
    CPython often at a dead one's address) gets its own name, not the dead one's."""
    first = _new_leaf()
    assert _reaches(first) == {"first"}
    assert _reaches(first) == {"first"}
    first = None
    for _ in range(3):
        second = _new_leaf()
        assert _reaches(second) == {"second"}
        second = None


def _dead_ref() -> weakref.ref:
    t = torch.ones(1)
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    return ref


def test_by_identity_ignores_a_dead_entry_at_a_live_tensors_id():
    """A dead key's entry left at the id a new tensor now has (CPython reuses the address) is never the new one's:
    planted, since whether the allocator reuses an address in a test is up to it."""
    table, t = _ByIdentity(), torch.ones(1)
    table._d[id(t)] = (_dead_ref(), "the dead one's")
    assert t not in table and table.get(t, "none") == "none" and table.found([t]) == [] and table.items() == []
    with pytest.raises(KeyError):
        table[t]


def test_leaf_names_kept_across_traces_never_a_dead_leafs():
    """The leaf-name cache across traces: a dead leaf's names left at the id a new leaf has, for the same
    location, are not the new leaf's (planted: the allocator decides whether the address is reused)."""
    second = _new_leaf()
    assert _reaches(second) == {"second"}
    kept = _leaf_names._LEAF_NAMES.get(second)
    assert kept and set(kept.values()) == {"second"}
    _leaf_names._LEAF_NAMES._d[id(second)] = (_dead_ref(), dict.fromkeys(kept, "first"))
    assert _reaches(second) == {"second"}


def test_leaf_names_hold_no_leaf_and_stay_bounded():
    """The cache across traces holds its leaves weakly (a dead one is freed at once), and over 1,000 traced steps
    with 8 new leaves each (the last steps' kept alive, so addresses differ) it never holds more than its purge
    limit (1024 while few leaves live) plus the entry that triggers the purge."""
    kept: collections.deque = collections.deque(maxlen=3)
    refs, most = [], 0
    for step in range(1000):
        leaves = [torch.full((2,), 1.0, requires_grad=True) for _ in range(8)]
        kept.append(leaves)
        with gw.trace():
            sum(torch.sqrt(leaf).sum() for leaf in leaves).backward()
        if step < 5:
            refs += [weakref.ref(leaf) for leaf in leaves]
        leaves = None
        most = max(most, len(_leaf_names._LEAF_NAMES._d))
    kept.clear()
    gc.collect()
    assert all(r() is None for r in refs)
    assert most <= 1024 + 1
