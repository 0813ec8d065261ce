"""NonsmoothError: f has no (finite) one-sided derivative here, or gradwise cannot compute it.

May import: nothing (no gradwise module).
"""

from __future__ import annotations


class NonsmoothError(ValueError):
    """f has no (finite) one-sided derivative here, or gradwise cannot compute it; the message says which op."""
