"""A fixture for test modules that check gradwise's once-per-process warnings: import it (``from
_fresh_warnings import fresh_warnings``) and every test of the module sees them afresh."""

import pytest

from gradwise._strong_zeros import _contract


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Every test sees the once-per-process warnings afresh."""
    _contract._warned.clear()
    yield
    _contract._warned.clear()
