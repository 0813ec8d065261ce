"""Strong zeros against PyTorch's own op database (``op_db``); the machinery lives in ``_opdb.py``.

CI runs a fixed subset: every op, its first ``NR_SAMPLES`` samples per dtype for the no-regression check, and
for contamination its first ``TRIED`` float64 samples (out of the first ``LIMIT``) that admit a discardable
padding. ``benchmarks/opdb_sweep.py`` and the slow test run every sample.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import gradwise as gw
from _opdb import (
    DTYPES,
    UNCHECKED_SHAPES,
    UNCHECKED_SINCE,
    OpRun,
    Padding,
    check_contamination,
    check_no_regression,
    contamination,
    grad_under_a_mode,
    no_regression,
    op_db,
    op_id,
    op_skip_reason,
    same,
    samples,
)
from gradwise._strong_zeros import _engine

NR_SAMPLES = 8
LIMIT, TRIED = 24, 3

OPS = {op_id(op): op for op in op_db()}

# Ops whose unused NaN still reaches a gradient under gradwise (measured on the CI subset, both discards;
# `python benchmarks/opdb_sweep.py --ci` prints the current set).
# The contamination test xfails on them and fails once one is clean, so that the list only shrinks.
KNOWN_CONTAMINATED: set[str] = set()

# LU with a NaN row to discard: whether the NaN row is picked as a pivot depends on the LAPACK build (its
# idamax and the CPU's vector width), so these are clean on some machines and contaminated on others (a
# pivoted NaN row enters the factors that the backward reuses; complex ones too). Their test xfails without
# being strict.
PLATFORM_DEPENDENT = {"linalg.lu_factor", "linalg.lu_factor_ex", "lu"}

# The full sweep (every sample, float32 and complex128 too, every padding) finds these besides.
KNOWN_CONTAMINATED_FULL = KNOWN_CONTAMINATED | {"linalg.lu_factor", "linalg.lu_factor_ex", "lu"}

# Ops whose backward PyTorch computes with other kernels whenever a Python dispatch mode is active (masked_fill's
# value gradient, prod's): the strong-zero pass, a dispatch mode, gives their bits under a bare pass-through mode,
# which differ from plain torch.autograd.grad by float32 rounding (up to ~5e-7). gw.grad itself only takes that
# pass when a NaN/Inf is present. Checked against PyTorch under a pass-through mode (_opdb.grad_under_a_mode).
MODE_DEPENDENT = {"masked_fill", "prod"}

# Floors of the coverage test (CI subset, slice discard), measured on torch 2.13 CPU.
MIN_TRIED = 462  # ops with at least one discardable padding (465 measured)
MIN_CONTAMINATED_IN_TORCH = 72  # ops whose gradient plain torch contaminates: the harness has teeth (75)
MIN_REMOVED = 71  # of those, ops gradwise cleans (71; 72 with linalg.lu_factor_ex, PLATFORM_DEPENDENT, not counted)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only wait on each other (4x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skip_op(op) -> None:
    reason = op_skip_reason(op)
    if reason:
        pytest.skip(reason)


def _reasons(r: OpRun) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(r.skips.items()))


@pytest.fixture(params=["auto", "forced"])
def strong_path(request, monkeypatch):
    """'auto': gw.grad as shipped (on finite data it runs plain PyTorch, so equality is nearly by design).
    'forced': every backward goes through the strong-zero dispatch mode, so its rules must be exact too."""
    if request.param == "forced":
        monkeypatch.setattr(_engine, "_plan", lambda *args, **kwargs: "strong")
    return request.param


@pytest.mark.parametrize("name", sorted(OPS))
def test_no_regression(name, strong_path):
    """On finite samples gw.grad equals torch.autograd.grad exactly (the sign of a zero aside; MODE_DEPENDENT ops
    on the forced pass: PyTorch's result under a bare dispatch mode)."""
    op = OPS[name]
    _skip_op(op)
    forced_on_mode_dependent = strong_path == "forced" and name in MODE_DEPENDENT
    r = check_no_regression(op, gw.grad, NR_SAMPLES,
                            reference=grad_under_a_mode if forced_on_mode_dependent else torch.autograd.grad)
    assert not r.failures, "\n".join(r.failures)
    if not r.run:
        pytest.skip(f"no sample checkable: {_reasons(r)}")


@functools.cache
def _contamination(name: str, how: str, dtype: str = "float64") -> OpRun:
    dtypes = (getattr(torch, dtype),)
    if how == "where":  # the samples and paddings the slice discard found: searching costs most of the time
        return check_contamination(OPS[name], gw.grad, how=how, dtypes=dtypes,
                                   only=_contamination(name, "slice", dtype).tried)
    return check_contamination(OPS[name], gw.grad, how=how, limit=LIMIT, tried=TRIED, dtypes=dtypes)


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("how", ["slice", "where"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_contamination(name, how, dtype):
    """A NaN block the output discards (sliced away or where-zeroed) leaves the gradient as without it (a
    complex NaN block: NaN + 0j)."""
    op = OPS[name]
    _skip_op(op)
    r = _contamination(name, how, dtype)
    if not r.run:
        pytest.skip(f"no padding to discard: {_reasons(r)}")
    if name in PLATFORM_DEPENDENT and r.failures:
        pytest.xfail(f"depends on the LAPACK build: {r.failures[0]}")
    if name in KNOWN_CONTAMINATED:
        if r.failures:
            pytest.xfail(f"known contaminated: {r.failures[0]}")
        pytest.fail(f"{name} is now clean: remove it from KNOWN_CONTAMINATED")
    assert not r.failures, "\n".join(r.failures)


def test_contamination_coverage():
    """Coverage over the whole CI subset stays above the measured floors."""
    runs = {name: _contamination(name, "slice") for name, op in OPS.items() if not op_skip_reason(op)}
    outcomes = {name: r.outcome() for name, r in runs.items()}
    tried = [n for n, o in outcomes.items() if o != "untried"]
    in_torch = [n for n in tried if any(not c.torch_clean for res in runs[n].results for c in res)]
    removed = [n for n, o in outcomes.items() if o == "removed" and n not in PLATFORM_DEPENDENT]
    still = sorted(n for n, o in outcomes.items() if o == "contaminated" and n not in PLATFORM_DEPENDENT)
    summary = (f"tried {len(tried)} ops, contaminated in torch {len(in_torch)}, removed {len(removed)}, "
               f"still contaminated {len(still)}: {still}")
    assert len(tried) >= MIN_TRIED, summary
    assert len(in_torch) >= MIN_CONTAMINATED_IN_TORCH, summary
    assert len(removed) >= MIN_REMOVED, summary
    assert set(still) <= KNOWN_CONTAMINATED, summary


# -- the harness itself can fail ----------------------------------------------------------------------------

def test_same():
    nan = math.nan
    assert same(torch.tensor([0.0, nan, 1.0]), torch.tensor([-0.0, nan, 1.0]))
    assert not same(torch.tensor([nan, 1.0]), torch.tensor([1.0, nan]))
    assert not same(torch.tensor([1.0]), torch.tensor([1.0 + 2**-20]))
    assert not same(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert same(None, None) and not same(None, torch.zeros(1))


def _first_sample(name, dtype=torch.float64):
    return next(iter(samples(OPS[name], dtype, 1)))


def test_no_regression_detects_a_wrong_gradient():
    def off_by_an_ulp(outs, inputs, grad_outputs, **kw):
        return tuple(torch.nextafter(g, torch.full_like(g, math.inf))
                     for g in torch.autograd.grad(outs, inputs, grad_outputs, **kw))

    assert no_regression(OPS["mul"], _first_sample("mul"), torch.autograd.grad) is None
    assert "differs" in no_regression(OPS["mul"], _first_sample("mul"), off_by_an_ulp)


@pytest.mark.parametrize("how", ["slice", "where"])
def test_contamination_detects_plain_torch(how):
    """mm with NaN rows of the second operand's padded columns: plain torch's gradient is NaN."""
    res = contamination(OPS["mm"], _first_sample("mm"), torch.autograd.grad, how=how, first_only=False)
    assert any(not c.torch_clean and not c.clean for c in res)
    assert any(c.padding == Padding((1,), 1, "end") for c in res)


def test_unchecked_shape_ops_exist():
    """The crash list names real ops (a renamed op would silently rejoin the sweep and crash it): each is in this
    torch's op_db, or names an entry of a later release (``UNCHECKED_SINCE``)."""
    release = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    later = {name for name, since in UNCHECKED_SINCE.items() if release < since}
    assert UNCHECKED_SHAPES - later <= set(OPS)
    assert not later & set(OPS)


@pytest.mark.slow
def test_full_sweep():
    """Every sample of every op, both dtypes, every discardable padding, both discards: no regression and
    no contamination beyond the known list (``benchmarks/opdb_sweep.py`` prints the same sweep as tables)."""
    failures, still = [], set()
    for name, op in OPS.items():
        if op_skip_reason(op):
            continue
        failures += [f"{name}: {m}" for m in check_no_regression(op, gw.grad).failures]
        for how in ("slice", "where"):
            r = check_contamination(op, gw.grad, how=how, first_only=False, dtypes=DTYPES)
            if r.outcome() == "contaminated":
                still.add(name)
    assert not failures, "\n".join(failures[:50])
    assert still <= KNOWN_CONTAMINATED_FULL, sorted(still - KNOWN_CONTAMINATED_FULL)
