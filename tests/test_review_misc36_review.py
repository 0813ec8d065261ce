"""Review of misc36 (review_misc36): breaks found in its logcumsumexp saved-value reads, the trace's pack-hook
node claim and the torch 2.14 custom-forward marks. Ground truth: plain PyTorch on the program with the unused
values deleted, plain PyTorch's count of a user's unpack hook, and the trace's node records without the hook."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _explaining import genuine_findings, traced_and_strong
from test_bound import _Double
from test_review_misc36 import _Counting, _packing


def _complex_lcse_w_grad(where: str, rows: int = 6, hooks: _Counting | None = None) -> torch.Tensor:
    """w.grad of |logcumsumexp(x * w, 1)[:4, -1]|^2 summed, complex128, x's rows 4: NaN padding (dropped by the
    [:4]); ``rows`` = 4: the same program with those rows deleted."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.complex128)[:rows].requires_grad_()
    x = torch.randn(6, 4, dtype=torch.complex128)
    x[4:] = complex(float("nan"), 0.0)
    x = x[:rows]

    def lcse(y):
        return y.logcumsumexp(1)[:4, -1]

    if where == "checkpoint":
        out = checkpoint(lambda y: lcse(y * w), x.clone(), use_reentrant=False)
    else:
        with hooks() if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out = lcse(x.clone() * w)
    out.abs().pow(2).sum().backward()
    return w.grad


@pytest.mark.parametrize("where", ["saved_tensors_hooks", "checkpoint"])
def test_complex_logcumsumexp_padding_nan_removed_behind_hooks(where):
    """SILENT (a NaN kept, no warning): misc36's complex rule gave PyTorch's value (NaN in every used row beside
    the padding) wherever logcumsumexp's saved values unpack through a hook; the base removed it under
    saved_tensors_hooks. The complex formula's own ops now give self and result as for real inputs."""
    reference = _complex_lcse_w_grad("saved_tensors_hooks", rows=4)
    with gw.strong_zeros():
        got = _complex_lcse_w_grad(where)
    assert bool(got.isfinite().all())
    torch.testing.assert_close(got[:4], reference)
    assert bool((got[4:] == 0).all())


def test_complex_logcumsumexp_unpacks_as_often_as_plain_pytorch():
    """The complex rule reads no saved value again (a user's unpack hook ran more often than in plain PyTorch)."""
    plain, hooks = _Counting(), _Counting()
    _complex_lcse_w_grad("saved_tensors_hooks", hooks=plain)
    with gw.strong_zeros():
        _complex_lcse_w_grad("saved_tensors_hooks", hooks=hooks)
    assert hooks.unpacks == plain.unpacks


def _abs_then_sqrt(hooks) -> None:
    x = torch.tensor([0.0, 1.0, 4.0], requires_grad=True)
    with hooks():
        y = x * 1
        y.abs_()
        loss = y.sqrt().sum()
    loss.backward()


def _copying_hooks():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def test_an_in_place_ops_kink_is_reported_under_a_copying_pack_hook():
    """Finding dropped: abs_ at 0 (a kink) was reported without hooks but not under a pack hook that copies (an
    offload's clone): the hook's clone of the input autograd saves for the in-place op took the trace's note of
    autograd's own clone, so abs_ got no node record (the base and misc36; be9e51a covered out-of-place ops)."""
    with gw.trace() as plain:
        _abs_then_sqrt(contextlib.nullcontext)
    with gw.trace() as hooked:
        _abs_then_sqrt(_copying_hooks)
    assert "kink" in {f.kind for f in plain.findings}
    assert sorted(f.kind for f in hooked.findings) == sorted(f.kind for f in plain.findings), str(hooked)


def _to(t, device):
    return t.to(device, copy=True)


@pytest.mark.parametrize("pack", [
    pytest.param(functools.partial(_to, device="cpu"), id="functools.partial"),
    pytest.param(torch.Tensor.clone, id="builtin", marks=pytest.mark.xfail(strict=True, reason=(
        "open (the base too): a builtin pack hook has no frame, so _in_pack_hook cannot tell its ops from a custom "
        "Function's first op under no_grad; logcumsumexp's node then has no record and the padding is told "
        "genuine (8 elements of aten.fill_)"))),
])
def test_logcumsumexp_padding_is_no_genuine_finding_behind_a_wrapped_pack_hook(pack):
    """Over-report: with a functools.partial pack hook (a device argument bound) _in_pack_hook saw no code (a
    partial has no frame of its own), logcumsumexp's node had no record and its dropped padding rows were a genuine
    finding of 8 elements reaching w, as before be9e51a."""
    report, genuine = traced_and_strong(_packing(pack))
    assert genuine == {"aten.copy_"}
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)


def _casting(fn):
    """A forward's decorator that runs an op on the input first and calls the forward through a partial of it (a
    bound argument): its frame holds no reference to the forward itself."""
    call = functools.partial(fn)

    @functools.wraps(fn)
    def wrapper(ctx, x):
        return call(ctx, x * 1.0)

    return wrapper


def _remembering(fn):
    """A forward's decorator that runs an op on the input first and keeps it (state in its closure)."""
    last = None

    @functools.wraps(fn)
    def wrapper(ctx, x):
        nonlocal last
        last = x * 1.0
        return fn(ctx, last)

    return wrapper


class _CastDouble(_Double):
    @staticmethod
    @_casting
    def forward(ctx, x):
        return 2 * x


class _RememberingDouble(_Double):
    @staticmethod
    @_remembering
    def forward(ctx, x):
        return 2 * x


@pytest.mark.parametrize("function", [_CastDouble, _RememberingDouble], ids=["through a partial", "with state"])
def test_a_wrapped_forward_that_calls_through_a_partial_proves_nothing(function):
    """SILENT on torch 2.14 (misc36's dc04bbc; the base and torch 2.13 give None): a wrapper's frame marked a
    custom forward only where it held the function it wraps; this one holds a partial of it, so its op on x was
    taken for a constant, the Function's output with it, and CastDouble(x) - 2x + relu(x) (relu(x): least norm 0
    at 0) got a 'proved' bound of sqrt(40). The wrapper's frame now also marks where it runs that wrapper's
    closure (not alone: a wrapper keeping state in it, guarded here, no longer runs the closure found)."""
    from gradwise._nonsmooth._bound import lower_bound

    f64 = torch.float64
    f = lambda x: (function.apply(x) - 2 * x + torch.relu(x)).sum()
    function.apply(torch.ones(2))  # (a call before: the state changes)
    assert lower_bound(f, (torch.zeros(40, dtype=f64),), True, (torch.ones(40, dtype=f64),)) is None


def _complex_padded(pad: bool, used: bool) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.complex128, requires_grad=True)
    x = torch.randn(6, 4, dtype=torch.complex128)
    if pad:
        x[4:] = complex(float("nan"), 0.0)
    if used:
        x[0, 1] = complex(float("nan"), 0.0)
    (x.clone() * w).logcumsumexp(1)[:4, -1].abs().pow(2).sum().backward()
    return w


@pytest.mark.xfail(strict=True, reason=(
    "open (the base too): the trace has no whole formula for complex logcumsumexp (WHOLE_FORMULAS: real only, "
    "first op abs), so the dropped padding rows' NaN, met by log(0) and spread along the row, is told a genuine NaN "
    "born at aten.fill_ reaching w, where strong zeros remove it (tr35b's fix, for complex inputs)"))
def test_complex_logcumsumexp_padding_is_no_genuine_finding():
    report, genuine = traced_and_strong(_complex_padded)
    assert genuine == {"aten.copy_"}
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
