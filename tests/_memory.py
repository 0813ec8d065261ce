"""Uninitialised memory for the tests: a dispatch mode under which every float empty* holds NaN."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class NaNEmpty(TorchDispatchMode):
    """Uninitialised memory that happens to hold NaN (as a freed NaN tensor's block can): every float
    ``empty``/``new_empty`` returns NaN. Entered below gw.trace(), so the trace sees the op's output and not the
    fill."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.startswith(("empty", "new_empty")) and out.is_floating_point():
            out.fill_(float("nan"))
        return out
