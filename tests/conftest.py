"""Fixtures shared by every test module."""

import contextlib
import time

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


@pytest.fixture(scope="session", autouse=True)
def native_helper():
    """gw.watch()'s C++ helper, built before the first test by the background build its first use starts (so every
    test of the watch runs the same path, and that build is tested): None where it cannot be built (no compiler,
    ``GRADWISE_NATIVE=0``), where the watch runs its Python twins (tests/test_native.py says which)."""
    from gradwise import _native

    if not _native.enabled():
        return None
    deadline = time.monotonic() + 600
    while _native.module() is None and _native._state == "building" and time.monotonic() < deadline:
        time.sleep(0.5)
    return _native.module()
