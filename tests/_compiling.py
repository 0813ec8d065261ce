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
def fresh_dynamo():
    """Each test compiles afresh: dynamo's caches reset before and after, and AOTAutograd's cache off (a graph
    another test compiled is not reused, with the variants gradwise made of it). By the config's own patch: pytest
    9's monkeypatch records a module attribute by its ``__dict__`` (unset here) and deletes it on undo, which torch
    2.14's config module takes as hiding the option (every later test's setup raised AttributeError)."""
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()
