"""Strong zeros under PyTorch's compiled autograd (``torch._dynamo.compiled_autograd``): it traces the whole
backward into one graph gradwise cannot see into, so a backward under strong zeros runs without it (with a
CompiledBackwardWarning once per process), and every other backward keeps it.

References: the same program with the NaN rows deleted (eager, plain PyTorch) and eager ``gw.grad``."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo import compiled_autograd as ca

import _compiling  # noqa: F401 (inductor imported quietly)
import gradwise as gw
from gradwise._strong_zeros import _compile

nan = float("nan")


def _setup() -> tuple[torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(6, 4)
    x[4:] = nan  # padding rows the loss never reads
    return lin, x


def _reference(lin: torch.nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The program without the NaN rows, eager plain PyTorch; and eager gw.grad of the whole program."""
    clean = torch.autograd.grad(lin(x[:4]).sum(), (lin.weight, lin.bias))
    strong = gw.grad(lin(x)[:4].sum(), (lin.weight, lin.bias))
    for a, b in zip(clean, strong, strict=True):
        torch.testing.assert_close(a, b)
    return clean


@pytest.fixture
def counted(monkeypatch):
    """A compiler for compiled autograd that counts the backward graphs it compiles (a fresh cache)."""
    monkeypatch.setattr(_compile, "_CA_WARNED", False, raising=False)  # the warning is once per process
    ca.reset()
    calls: list[int] = []

    def compiler(gm: torch.fx.GraphModule) -> object:
        calls.append(1)
        return torch.compile(gm, backend="aot_eager", fullgraph=True)

    yield compiler, calls
    ca.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_autograd_is_bypassed_under_strong_zeros(counted, backend):
    compiler, calls = counted
    lin, x = _setup()
    f = torch.compile(lambda t: lin(t)[:4].sum(), backend=backend)
    with ca._enable(compiler), gw.strong_zeros(), \
            pytest.warns(gw.CompiledBackwardWarning, match="compiled autograd is bypassed"):
        f(x).backward()
    assert calls == []  # the eager engine ran this backward
    for got, want in zip((lin.weight.grad, lin.bias.grad), _reference(lin, x), strict=True):
        torch.testing.assert_close(got, want)

    # outside the block nothing changes: compiled autograd compiles and runs the backward, PyTorch's NaN stays
    lin.zero_grad(set_to_none=True)
    with ca._enable(compiler):
        f(x).backward()
    assert calls == [1]
    assert lin.weight.grad.isnan().any()
    assert ca.compiled_autograd_enabled is False and ca.active_disable_ctx is False


def test_a_plain_backward_under_strong_zeros_keeps_compiled_autograd(counted):
    compiler, calls = counted
    lin, x = _setup()
    with ca._enable(compiler), gw.strong_zeros():  # finite data: nothing for strong zeros to do, no warning
        lin(x[:4]).sum().backward()
    assert calls == [1]
    want = torch.autograd.grad(lin(x[:4]).sum(), (lin.weight, lin.bias))
    for got, w in zip((lin.weight.grad, lin.bias.grad), want, strict=True):
        torch.testing.assert_close(got, w)


def test_config_compiled_autograd_with_backward_inside_a_compiled_step(monkeypatch):
    monkeypatch.setattr(_compile, "_CA_WARNED", False, raising=False)
    ca.reset()
    lin, x = _setup()

    def step(t: torch.Tensor) -> torch.Tensor:
        loss = lin(t)[:4].sum()
        loss.backward()  # a graph break: the eager backward runs with compiled autograd on
        return loss

    try:
        with torch._dynamo.config.patch(compiled_autograd=True):  # read when torch.compile wraps the step
            compiled = torch.compile(step, backend="aot_eager")
        with gw.strong_zeros(), pytest.warns(gw.CompiledBackwardWarning, match="compiled autograd is bypassed"):
            compiled(x)
    finally:
        ca.reset()
    for got, want in zip((lin.weight.grad, lin.bias.grad), _reference(lin, x), strict=True):
        torch.testing.assert_close(got, want)
