"""gw.watch() frees what a backward(inputs=) ran as the engine does: the engine runs a non-leaf input's own node
there (its gradient kept by retain_grad) and frees its saved tensors, which autograd.grad toward the same tensor
does not (it only captures the gradient). The reference: the same calls without the watch."""
from __future__ import annotations

import contextlib

import pytest
import torch

import gradwise as gw
from gradwise import _native
from test_native import _helper


def _later(part: torch.Tensor, toward: torch.Tensor) -> str:
    try:
        torch.autograd.grad(part, toward, retain_graph=True)
        return "ok"
    except RuntimeError as exc:
        return str(exc)[:40]


def _outcomes(watch: bool, wanted: tuple[str, ...]) -> list[str]:
    torch.manual_seed(0)
    x, w = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with gw.watch() if watch else contextlib.nullcontext():
        s = x.exp()
        t = s.sin()
        named = {"s": s, "t": t, "w": w}
        (t * w).sum().backward(inputs=[named[n] for n in wanted])
        grads = [named[n].grad.tolist() for n in wanted]
        return [*map(str, grads), _later(s.sum(), x), _later(t.sum(), s), _later((t * w).sum(), w)]


@pytest.mark.parametrize("path", ["helper", "Python twin"])
@pytest.mark.parametrize("wanted", [("s",), ("t",), ("t", "s"), ("s", "w"), ("w",)])
def test_backward_inputs_frees_a_non_leaf_inputs_own_node(wanted, path, monkeypatch):
    """Was: the watch kept the saved tensors of a non-leaf input's node after backward(inputs=[it]) (memory
    PyTorch frees; a later backward through that node ran under the watch where PyTorch raises)."""
    if path == "helper":
        _helper()
    else:
        monkeypatch.setattr(_native, "module", lambda: None)
    plain = _outcomes(False, wanted)
    assert _outcomes(True, wanted) == plain


def _one_pass_calls(x: torch.Tensor, w: torch.Tensor, seed: float) -> list:
    """backward / autograd.grad given generators (PyTorch reads them once, with tuple()), then later calls."""
    s = x.exp()
    y = s.sin() * w
    ones = torch.full((4,), seed, dtype=torch.float64)
    got = list(torch.autograd.grad((t for t in [y]), (t for t in [w]), (g for g in [ones]), retain_graph=True))
    torch.autograd.backward((t for t in [y]), (g for g in [ones]), retain_graph=True)
    got.append(w.grad)
    y.sum().backward(inputs=(t for t in [s]))
    got += [s.grad, _later(s.sum(), x)]
    return got


@pytest.mark.parametrize("block", ["watch", "trace"])
@pytest.mark.parametrize("seed", [1.0, float("nan")])
def test_generator_arguments_are_read_once_by_pytorch(block, seed):
    """Was: the watch read a generator of outputs / inputs / grad_outputs before PyTorch did, which then met it
    empty: backward(generator) ran nothing (SILENT: w.grad stayed None), autograd.grad raised 'appears to not have
    been used', and a NaN seed given as a generator raised IndexError from the explanation."""
    def run(watch: bool) -> list:
        torch.manual_seed(0)
        x, w = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        blk = (gw.watch() if block == "watch" else gw.trace()) if watch else contextlib.nullcontext()
        with blk:
            return _one_pass_calls(x, w, seed)

    plain, watched = run(False), run(True)
    for p, q in zip(plain, watched, strict=True):
        if isinstance(p, torch.Tensor):
            assert isinstance(q, torch.Tensor) and torch.equal(p.nan_to_num(7.0), q.nan_to_num(7.0))
        else:
            assert q == p


@pytest.mark.parametrize("call", ["grad", "backward"])
@pytest.mark.parametrize("edge_of", ["s", "w"])
def test_gradient_edge_inputs_free_what_the_engine_ran(call, edge_of):
    """Was: an input given as a GradientEdge was no target of the release's walk (only tensors were), so nothing
    the call ran was freed under the watch (memory PyTorch frees; a later backward through it ran)."""
    def outcomes(watch: bool) -> list[str]:
        torch.manual_seed(0)
        x, w = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        with gw.watch() if watch else contextlib.nullcontext():
            s = x.exp()
            y = (s.sin() * w).sum()
            edge = torch.autograd.graph.get_gradient_edge(s if edge_of == "s" else w)
            if call == "grad":
                torch.autograd.grad(y, [edge])
            else:
                y.backward(inputs=[edge])
            return [_later(y, w), _later(s.sum(), x)]

    assert outcomes(True) == outcomes(False)


@pytest.mark.parametrize("second", ["unused leaf", "unused non-leaf", "no grad", "unused, retained"])
def test_a_refused_grad_frees_what_the_engine_ran_first(second):
    """Was: autograd.grad refusing an unused input (no allow_unused) raises after the engine ran and freed what it
    reached; under the watch (graph retained for the check) nothing was freed (memory PyTorch frees; a retry ran
    where PyTorch raises). A refusal before the run ('does not require grad') frees nothing, as PyTorch."""
    def outcomes(watch: bool) -> list[str]:
        torch.manual_seed(0)
        x, w = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
        with gw.watch() if watch else contextlib.nullcontext():
            s = x.exp()
            y = s.sin().sum()
            other = {"unused leaf": w, "unused non-leaf": w * 2, "no grad": w.detach()}.get(second, w)
            retain = second == "unused, retained"
            try:
                torch.autograd.grad(y, [s, other], retain_graph=retain)
                first = "ok"
            except RuntimeError as exc:
                first = str(exc)[:40]
            return [first, _later(y, x), _later(s.sum(), x)]

    assert outcomes(True) == outcomes(False)
