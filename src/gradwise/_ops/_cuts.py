"""Where complex functions meet their branch cuts, read by the kink facts (``_kinks``, ``_discrete``) and by
nonsmooth calculus's rules (sqrt, pow): written once here, below both (``_discrete`` imports ``_kinks``).

May import: torch.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def on_complex_cut(x, below: float = 0.0) -> Tensor | None:
    """Where a complex x sits on the branch cut of log / sqrt / z ** p (the real axis at and below ``below``: their
    imaginary part jumps by 2 pi / changes sign across it; ``log1p``: below -1), or None for a real x (no cut)."""
    if not (isinstance(x, Tensor) and x.is_complex()):
        return None
    return (x.imag == 0) & (x.real <= below)


def branch_cut_power(x, p) -> bool:
    """z ** p for a complex tensor z and a number p that is not an integer (its cut: `on_complex_cut`); an infinite
    or NaN p too (``float.is_integer``: ``int(p)`` would raise)."""
    return isinstance(x, Tensor) and x.is_complex() and isinstance(p, float) and not p.is_integer()
