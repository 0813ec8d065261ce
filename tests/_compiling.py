"""Shared by the test modules that compile. Importing it imports inductor quietly (its first import warns from
torch.jit: PyTorch's own deprecation, an error under the suite's warning filter); ``from _compiling import
fresh_dynamo`` also gives every test of the module a fresh compile."""

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._inductor.compile_fx


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """Each test compiles afresh: dynamo's caches reset before and after, and AOTAutograd's cache off (a graph
    another test compiled is not reused, with the variants gradwise made of it)."""
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
