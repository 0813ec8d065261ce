"""Fixtures shared by every test module."""

import contextlib

import pytest
import torch


@pytest.fixture
def functorch_config():
    """``functorch_config(name=value, ...)``: torch._functorch.config options for the rest of the test, set by the
    config's own patch and undone after it. Not monkeypatch: pytest 9 records a module attribute by its
    ``__dict__`` (unset in torch's config module) and deletes it on undo, which torch 2.14's config module takes as
    hiding the option (gradwise's own read of it then raised AttributeError in every later test)."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(torch._functorch.config.patch(**options))
