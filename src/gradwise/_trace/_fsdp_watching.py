"""`gw.watch()` under FSDP2 (``torch.distributed.fsdp.fully_shard``): which gradients it checks, and what it
reports for a first non-finite step that it cannot replay.

Under FSDP2 the graph's leaves are FSDP's unsharded parameters. By the time the backward returns (FSDP's
end-of-backward callback has run), FSDP has reduce-scattered their gradients into the sharded parameters'
``.grad`` (DTensors) and set theirs to None; under ``set_requires_gradient_sync(False)`` it keeps them instead,
in ``.grad`` or, when the reduction dtype differs (``MixedPrecisionPolicy``), in ``unsharded_accumulated_grad``.
A plain backward leaves a gradient on every leaf it reached, so a leaf without one after the backward is the cheap
sign (no work on other programs' steps) that sends the watch here: those leaves are looked up among the live FSDP2
parameters and this rank's part of their gradients (the local shard, ``to_local()``: no collective) is checked
with the rest.

The first non-finite step is not replayed: the replay would run FSDP's backward hooks again (its all-gathers and
reduce-scatters) on the ranks that saw NaN/Inf only, and the others would never join them (a hang). Instead each
non-finite gradient becomes one finding born at the backward call (contamination or genuine: not known; counts
and positions are this rank's shard's, positions in the full parameter's coordinates) and a note says why. Each
rank decides from its own shards, with no collective (every rank runs the same collectives as without the
watch): a rank whose shards stayed finite reports nothing for that step; ``gw.nonfinite_guard`` is the decision
shared by every rank.

Then the full trace starts, as after a replay: ``gw.trace()`` under FSDP2 leaves every gradient as without it
since its shadow pass stopped rerunning FSDP's own ops (fd718ec; before, it gave the later finite steps NaN or
wrong gradients, so the watch did not start it).

May import: torch.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

_STATE_MODULE = "torch.distributed.fsdp._fully_shard._fsdp_state"

WHY = ("under FSDP2 (fully_shard) its backward cannot run again: the replay would rerun FSDP's all-gathers and "
       "reduce-scatters on this rank alone, a hang; the gradients checked are this rank's part: its shard of each "
       "reduce-scattered gradient, or its own gradient not reduced yet (set_requires_gradient_sync(False))")


def loaded() -> bool:
    """Whether FSDP2 was imported in this process (else no leaf is one of its parameters)."""
    return _STATE_MODULE in sys.modules


def stale(params: list[tuple[torch.Tensor, Any]]) -> set[int]:
    """The ids of the sharded parameters whose gradient holds NaN/Inf on this rank (before the block's first
    backward: gradients not zeroed since a backward outside the block, which that backward adds to)."""
    return {id(param) for param, _, _ in nonfinite(params)}


class FSDPParams:
    """The FSDP2 parameters of one watch: unsharded parameter (a graph leaf) -> its ``FSDPParam``, looked up in
    the process's FSDP2 states when a leaf is not yet known (FSDP makes the unsharded parameter once, at its first
    all-gather, and keeps it)."""

    def __init__(self) -> None:
        self._by_leaf: dict[int, Any] = {}

    def of(self, leaves) -> list[tuple[torch.Tensor, Any]]:
        """``(leaf, FSDPParam)`` for each of ``leaves`` that is an FSDP2 unsharded parameter; [] when none."""
        if not loaded():
            return []
        found, rebuilt = [], False
        for t in leaves:
            fp = self._by_leaf.get(id(t))
            if (fp is None or getattr(fp, "_unsharded_param", None) is not t) and not rebuilt:
                self._by_leaf, rebuilt = _index(), True  # (ids of dead tensors are reused: identity decides)
                fp = self._by_leaf.get(id(t))
            if fp is not None and getattr(fp, "_unsharded_param", None) is t:
                found.append((t, fp))
        return found


def _index() -> dict[int, Any]:
    """id(unsharded parameter) -> FSDPParam, over every live FSDP2 state (the composable-API registry)."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    out: dict[int, Any] = {}
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState):
            continue
        for group in getattr(state, "_fsdp_param_groups", ()):
            for fp in group.fsdp_params:
                p = getattr(fp, "_unsharded_param", None)  # (made at the first all-gather)
                if p is not None:
                    out[id(p)] = fp
    return out


def gradients(params: list[tuple[torch.Tensor, Any]]) -> list[torch.Tensor]:
    """This rank's part of the gradients the optimizer will read for ``params``, as plain tensors: the local
    shard of each sharded ``.grad``, and a gradient kept unsharded for a later reduce-scatter in the reduction
    dtype (an unsharded ``.grad`` kept as it is is a leaf's ``.grad``, which the watch checks already)."""
    out = []
    with torch.no_grad():
        for _, fp in params:
            g = fp.sharded_param.grad
            if g is not None:
                out.append(g.to_local() if hasattr(g, "to_local") else g)
            acc = getattr(fp, "unsharded_accumulated_grad", None)
            if acc is not None:
                out.append(acc)
    return out


def nonfinite(params: list[tuple[torch.Tensor, Any]]) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
    """``(parameter, this rank's gradient part, its non-finite mask in the parameter's full shape)`` for each
    non-finite gradient of ``params``: the sharded parameter (the one the model holds and the optimizer updates)
    for a reduced shard; the graph's leaf for an unsharded gradient kept in ``.grad``."""
    out = []
    with torch.no_grad():
        for leaf, fp in params:
            param = fp.sharded_param
            g = param.grad
            if g is not None and hasattr(g, "to_local"):
                local = g.to_local()
                if local.numel() and not bool(local.isfinite().all()):
                    out.append((param, local, _in_full(g, ~local.isfinite())))
            for g in (leaf.grad, getattr(fp, "unsharded_accumulated_grad", None)):
                if isinstance(g, torch.Tensor) and g.numel() and not bool(g.isfinite().all()):
                    out.append((param, g, ~g.isfinite()))
    return out


def _in_full(dtensor, local_mask: torch.Tensor) -> torch.Tensor:
    """A shard's mask placed at its offset in the full parameter's shape (the rest False): the positions a
    finding lists are then the parameter's own."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(dtensor.shape, dtensor.device_mesh,
                                                              dtensor.placements)
    except (ImportError, AttributeError, RuntimeError, ValueError):  # an API moved: the shard's own positions
        return local_mask
    if tuple(shape) != tuple(local_mask.shape):
        return local_mask
    full = torch.zeros(dtensor.shape, dtype=torch.bool)
    full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))] = local_mask
    return full
