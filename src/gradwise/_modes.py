"""``LeanDispatchMode``: a ``TorchDispatchMode`` whose handler keeps dynamo out without PyTorch's wrapper.

PyTorch wraps every mode's ``__torch_dispatch__`` in ``torch._disable_dynamo`` (so that torch.compile never
traces into a handler). That wrapper costs ~5 us per call, most of the per-op cost of gradwise's modes on small
models. A subclass of ``LeanDispatchMode`` gets the same effect, dynamo's frame callback switched off for the
length of the handler and everything it calls, with one C call each way.

May import: torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy, set_eval_frame
from torch.utils._python_dispatch import TorchDispatchMode


def _lean(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        prior = set_eval_frame(None)  # what torch._disable_dynamo does around the call, and restores after
        try:
            return handler(self, func, types, args, kwargs)
        finally:
            set_eval_frame(prior)

    __torch_dispatch__._gw_lean = True  # type: ignore[attr-defined]
    return __torch_dispatch__


# Dynamo's frame callback may still be on when the dispatcher calls a handler (a compiled function that dynamo
# runs eagerly because a mode is active: the dispatcher pops the mode while its handler runs, so dynamo would
# then see no mode and compile the handler's frame). PyTorch's wrapper lives in a file dynamo skips; this one's
# code object is marked to be skipped (its callees then run with the callback off, from its first line).
set_code_exec_strategy(_lean(lambda *a: None).__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))


class LeanDispatchMode(TorchDispatchMode):
    """A dispatch mode whose subclasses' ``__torch_dispatch__`` run with dynamo off, as PyTorch's modes do."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no torch._disable_dynamo wrapper: __init_subclass__ puts the lean one in its place

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        raw = cls.__dict__.get("__torch_dispatch__")
        if raw is not None and not isinstance(raw, classmethod):
            cls.__torch_dispatch__ = _lean(raw)
