"""A non-reentrant checkpoint's recomputation under strong zeros runs outside the strong-zero mode.

``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)`` recomputes ``fn``'s forward when the backward
first unpacks one of its saved tensors, inside that backward: under strong zeros, inside ``_StrongZeroMode``.
Dynamo runs no compiled code while a dispatch mode is active, so a ``torch.compile``'d ``fn`` was recomputed
eagerly: other saved tensors than its compiled forward saved, and the checkpoint's metadata check raised
``CheckpointError`` (on finite data too), where PyTorch alone gets its gradients. A recomputation is a forward:
PyTorch runs it with no mode of gradwise's, and the strong-zero rules are for the backward's ops (what a
recomputed op reads is a value, as it was in the forward). So it runs with the mode left for its length; other
modes (a trace, a FLOP counter) stay where they are.

May import: torch, _compile, _mode, _supports.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.utils.checkpoint as _checkpoint
from torch._dynamo.eval_frame import skip_code

from gradwise._strong_zeros._compile import _without_strong_mode
from gradwise._strong_zeros._mode import running_mode
from gradwise._strong_zeros._supports import _STATE


def _recompute_outside_the_mode(original: Any) -> Any:
    """``torch.utils.checkpoint._run_fn_with_dynamo_disabled`` (the call that recomputes a checkpointed
    forward) run without the strong-zero mode when one is running on this thread; unchanged otherwise."""

    @functools.wraps(original)
    def recompute(fn: Any, *args: Any, **kwargs: Any) -> Any:
        _STATE.checkpoint_forward += 1  # (a trace's shadow pass reads it: gradwise._trace._shadow)
        try:
            if running_mode() is None:
                return original(fn, *args, **kwargs)
            with _without_strong_mode():
                return original(fn, *args, **kwargs)
        finally:
            _STATE.checkpoint_forward -= 1

    skip_code(recompute.__code__)  # run, never traced (compiled autograd traces unpack hooks)
    recompute._gradwise_recompute = True  # type: ignore[attr-defined]
    return recompute


def install() -> None:
    """Wrap the recomputation call once (a torch without it: nothing to do, the metadata check is its own)."""
    original = getattr(_checkpoint, "_run_fn_with_dynamo_disabled", None)
    if original is not None and not getattr(original, "_gradwise_recompute", False):
        _checkpoint._run_fn_with_dynamo_disabled = _recompute_outside_the_mode(original)


install()
