"""Session 36 (misc36): logcumsumexp's whole-formula rule, and the trace's view of it, under saved-tensor hooks
and a non-reentrant checkpoint. Ground truth: plain PyTorch's count of a user's unpack hook, and gw.strong_zeros()
with each NaN write alone (which writes leave a non-finite gradient), never the trace itself."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import gradwise as gw
from _explaining import genuine_findings, padded_program, traced_and_strong
from gradwise._trace._session import _TRACERS


def _lcse(y):
    return y.logcumsumexp(1)[:4, -1]


class _Counting:
    """A user's saved_tensors_hooks whose unpack counts its calls (an offload's fetch, say)."""

    def __init__(self) -> None:
        self.unpacks = 0

    def unpack(self, t):
        self.unpacks += 1
        return t

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, self.unpack)


def _hooked_program(hooks: _Counting):
    def loss(y):
        with hooks():
            return _lcse(y).pow(2).sum()
    return padded_program(loss)


@pytest.mark.parametrize("context", ["strong_zeros", "trace", "watch"])
def test_a_users_unpack_hook_runs_as_often_as_without_gradwise(context):
    """Before: the unpack hook of a user's saved_tensors_hooks ran 5 times under gw.strong_zeros() and 9 under
    gw.trace() where plain PyTorch runs it 3 times: logcumsumexp's whole-formula rule and the trace's
    _whole_formula / _formula_kept read the node's saved self and result again (each read runs the hook). They
    now take them from the formula's own ops. (gw.watch() traces no step it did not need: 3 before too.)"""
    plain = _Counting()
    _hooked_program(plain)(True, True)
    hooks = _Counting()
    with getattr(gw, context)():
        _hooked_program(hooks)(True, True)
    assert hooks.unpacks == plain.unpacks == 3  # (logcumsumexp: self, result; pow: self)


def _checkpointed(pad: bool, used: bool):
    torch.manual_seed(0)
    w = torch.randn(6, 4, requires_grad=True)
    x = torch.randn(6, 4)
    if pad:
        x[4:] = float("nan")
    if used:
        x[0, 1] = float("nan")
    checkpoint(lambda y: _lcse(y * w), x.clone(), use_reentrant=False).pow(2).sum().backward()
    return w


def test_strong_zeros_on_logcumsumexp_in_a_checkpoint_do_not_crash():
    """Before: CheckpointError ("Unpack is being triggered for a tensor that was already unpacked once") from
    gw.strong_zeros(): its logcumsumexp rule read the node's saved values a second time. Strong zeros now remove
    the padding's NaN there as without the checkpoint, and keep the used one."""
    for pad, used, finite in [(True, False, True), (False, True, False), (True, True, False)]:
        with gw.strong_zeros():
            w = _checkpointed(pad, used)
        assert bool(w.grad.isfinite().all()) == finite, (pad, used)


def _packing(pack):
    def loss(y):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return _lcse(y).pow(2).sum()
    return padded_program(loss)


def _save_on_cpu(y):
    with torch.autograd.graph.save_on_cpu():
        return _lcse(y).pow(2).sum()


@pytest.mark.parametrize("where", ["saved_tensors_hooks", "a copying pack hook", "save_on_cpu", "checkpoint"])
def test_logcumsumexp_padding_is_no_genuine_finding_behind_hooks(where):
    """The padding rows 4: (NaN), dropped, beside a used NaN at x[0, 1]: not a genuine finding (tr35b's fix),
    also where logcumsumexp's saved values unpack through a hook. Before: a genuine finding of 8 elements
    reaching w there: its rows were read from the node's saved values, which a hook gives back as another
    tensor, and which a checkpoint refuses to unpack twice; and a pack hook that runs ops (an offload's copy)
    made the trace take logcumsumexp's node for a custom Function's (no record: "the backward of ?")."""
    if where == "a copying pack hook":
        report, genuine = traced_and_strong(_packing(lambda t: t.clone()))
    elif where == "save_on_cpu":
        report, genuine = traced_and_strong(padded_program(_save_on_cpu))
    elif where == "checkpoint":
        report, genuine = traced_and_strong(_checkpointed)
    else:
        report, genuine = traced_and_strong(_hooked_program(_Counting()))
    assert genuine == {"aten.copy_"}
    assert {f.born_op for f in genuine_findings(report)} == genuine, str(report)
    assert all(f.reaches == ["w"] for f in genuine_findings(report)), str(report)


class _Sqrt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sqrt()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (2 * x.sqrt())


def test_an_op_after_a_custom_function_under_saved_tensors_hooks_keeps_its_node():
    """The node of a custom Function whose forward ran (under no_grad) inside saved_tensors_hooks is not taken
    for a pack hook's op's: an op after it that reads its input and makes no node (argmax, a comparison, detach) was
    given the Function's node record ("the backward of aten.argmax") by a first form of the pack hook's fix (the
    base gives none: a guard, not a repro)."""
    x = torch.tensor([1.0, -1.0, 4.0], requires_grad=True)
    with gw.trace():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            y = _Sqrt.apply(x)
            x.argmax(), x > 0, x.detach()
        tracer = _TRACERS.get(threading.get_ident())
        assert getattr(tracer.nodes.get(y.grad_fn._sequence_nr()), "op", None) is None
