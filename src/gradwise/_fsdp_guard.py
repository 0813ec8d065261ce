"""``gw.nonfinite_guard`` for FSDP2 (``torch.distributed.fsdp.fully_shard``): the same decision on every rank.

FSDP2 has no DDP-style communication hook; it lets a module replace its reduce-scatter
(``FSDPModule.set_custom_reduce_scatter``). The guard's reduce-scatter wraps the one FSDP would have used and,
around it, takes the min and max of its input (this rank's unsharded gradients, before the reduction) and of
its output (this rank's reduced shard): on the device, no host read per bucket. Unlike DDP's averaged buckets,
the reduced shards differ from rank to rank (a NaN in rank 1's gradient lands in the shard of whichever rank
owns that element), so the decision needs one collective per backward: when the backward ends, one
all-reduce of a small (world x reduce-scatters) table of flags, read once on the host, identical on every
rank. That all-reduce runs on every rank whatever the data, so an asymmetric NaN cannot leave a rank waiting.

FSDP2 reduce-scatters every backward unless told otherwise (``set_requires_gradient_sync(False)``) and adds each
reduced shard to the gradient already there: with gradient accumulation, a NaN of an earlier micro-batch stays in
the gradients the optimizer will read although the last backward's flags are clean. So after a backward that
found NaN/Inf, the next one also checks the accumulated shards (one pass over them, on that rare path only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from gradwise._distributed import POLICIES, _conclude, group_ranks

__all__ = ["FSDPNonfiniteGuard", "is_fsdp2"]


def is_fsdp2(model: object) -> bool:
    """True for a module that ``fully_shard`` was applied to (its class is then an ``FSDPModule``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


class _GuardedReduceScatter:
    """Stands in for one FSDP parameter group's reduce-scatter: flags before and after, then the original."""

    def __init__(self, guard: FSDPNonfiniteGuard, inner: Any, group: Any):
        self.guard, self.inner, self.group = guard, inner, group

    def allocate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner.allocate(*args, **kwargs)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        guard = self.guard
        if not guard._queued:  # the first reduce-scatter of this backward
            guard._begin()
            guard._queued = True
            if not guard._after_fsdp_callback():
                # FSDP queued its own end-of-backward callback from its pre-backward hook, before any
                # reduce-scatter: this one runs after it, once FSDP has issued and waited for every reduce-scatter
                torch.autograd.Variable._execution_engine.queue_callback(guard._decide)
        guard._before.append(torch.stack(torch.aminmax(input_tensor.detach())))
        work = self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                          async_op=async_op)
        if async_op and work is not None:  # FSDP calls it synchronously (stream-ordered); an async caller: wait
            work.wait()
        guard._after.append(torch.stack(torch.aminmax(output_tensor.detach())))
        guard._groups.append(self.group)
        return work


class FSDPNonfiniteGuard:
    """The state of ``gw.nonfinite_guard`` on an FSDP2 model: the flags of the current backward (device tensors)
    and the decision every rank took after the last backward that reduce-scattered. ``should_skip()``,
    ``bad``, ``steps`` and ``nonfinite_steps`` mean what they mean for DDP's guard."""

    def __init__(self, model: torch.nn.Module, policy: str, process_group: Any = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.process_group = process_group
        self._group_rank, self._world, self._global = group_ranks(process_group)
        self._before: list[torch.Tensor] = []
        self._after: list[torch.Tensor] = []
        self._groups: list[Any] = []  # the FSDP parameter group of each reduce-scatter (for the names)
        self._param_groups: list[Any] = []  # every FSDP parameter group guarded (their sharded gradients)
        self._carried: list[tuple[int, list[str]]] | None = None  # .bad of the last backward if it was not finite
        self._queued = False
        self._deferred = False  # _decide runs from FSDP's own end-of-backward callback (_after_fsdp_callback)
        self._states: list[Any] = []  # the FSDP states of the model's modules, their final callback wrapped
        self._skip = False
        self.bad: list[tuple[int, list[str]]] = []
        self.steps = 0
        self.nonfinite_steps = 0
        from torch.distributed.fsdp import FSDPModule

        installed = 0
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            for param_group in module._get_fsdp_state()._fsdp_param_groups:
                size = getattr(param_group.mesh_info, "shard_mesh_size", 1)
                if size < 2:
                    raise ValueError(
                        "gw.nonfinite_guard: this FSDP2 mesh shards over one rank, so FSDP runs no "
                        "reduce-scatter for the guard to watch; check the gradients directly "
                        "(all(p.grad.isfinite().all() for p in model.parameters())) or shard over 2+ ranks")
                # FSDP's own (default, process-group-allocated or symmetric-memory) reduce-scatter is kept
                # inside ours: private attribute, since FSDPModule has a setter but no getter
                param_group._reduce_scatter_comm = _GuardedReduceScatter(self, param_group._reduce_scatter_comm,
                                                                         param_group)
                self._param_groups.append(param_group)
                installed += 1
            self._states.append(module._get_fsdp_state())
        if not installed:
            raise ValueError("gw.nonfinite_guard: the FSDP2 model has no parameter to shard (no fully_shard "
                             "module owns a parameter)")
        for state in self._states:
            state._root_post_backward_final_callback = self._then_decide(state._root_post_backward_final_callback)

    def _then_decide(self, fsdp_callback: Any) -> Any:
        """FSDP's end-of-backward callback (of one state: whichever state's pre-backward hook runs first queues
        its own), followed by the decision where the first reduce-scatter deferred it to there."""
        def callback() -> None:
            fsdp_callback()
            if self._deferred:
                self._deferred = False
                self._decide()
        return callback

    def _after_fsdp_callback(self) -> bool:
        """At the first reduce-scatter of a backward: whether the decision is to run right after FSDP's own
        end-of-backward callback, because that is queued (by one of this model's states) and not run yet. A
        callback queued from here would be queued on the graph task running now, which is not the one FSDP's
        callback is on inside a backward nested in it (a reentrant checkpoint's): the decision ran at the end of
        the checkpointed block, on its reduce-scatters alone, and "raise" stopped the outer backward halfway,
        leaving FSDP's modules unsharded (plain tensors, no reduce-scatter, nothing watched) for every later step."""
        if not self._states:
            return False
        ctx = self._states[0]._state_ctx
        mine = {id(state) for state in self._states}
        if not ctx.post_backward_final_callback_queued or not all(id(s) in mine for s in ctx.all_states):
            return False  # (a model inside a larger FSDP tree: the callback may be another module's)
        self._deferred = True
        return True

    def should_skip(self) -> bool:
        """True when the last backward had NaN/Inf on some rank (the same answer on every rank)."""
        return self._skip

    def _begin(self) -> None:
        self._before, self._after, self._groups, self._skip, self.bad = [], [], [], False, []

    def _decide(self) -> None:
        """Once per backward, after FSDP's own end-of-backward callback: one all-reduce of the flags (every
        rank, every backward that reduce-scattered), one host read. When the last backward found NaN/Inf (the
        same on every rank), the flags also cover the accumulated gradient shards: this backward may have added
        its finite gradients to that NaN (accumulation without ``set_requires_gradient_sync(False)``)."""
        self._queued = False
        self.steps += 1
        before = (~torch.stack(self._before).float().isfinite()).any(-1).float()
        after = (~torch.stack(self._after).float().isfinite()).any(-1).float()
        n = len(self._before)
        table = torch.zeros(self._world, 2 * n + 1, device=before.device)
        table[self._group_rank, :n] = before
        table[self._group_rank, n:2 * n] = after
        if self._carried is not None:
            table[self._group_rank, 2 * n] = self._accumulated_nonfinite()
        dist.all_reduce(table, group=self.process_group)
        rows = table.tolist()
        if not any(any(row) for row in rows):
            self._carried = None
            return
        self.bad = [(self._global[r], _names(self._groups[b]))
                    for r, row in enumerate(rows) for b, flag in enumerate(row[:n]) if flag]
        where_from = "before the reduce-scatter"
        if not self.bad and self._carried and any(row[2 * n] for row in rows):
            # this backward's own gradients were finite: the NaN/Inf is the one an earlier backward accumulated
            self.bad = list(self._carried)
            where_from = "before the reduce-scatter of an earlier backward, accumulated into these gradients"
        self._carried = self.bad
        _conclude(self, where_from, "their sum overflowed in the reduce-scatter")

    def _accumulated_nonfinite(self) -> float:
        """1.0 when some sharded gradient that the optimizer would read holds NaN/Inf (this rank's shards)."""
        shards = [fp.sharded_param.grad.to_local() for group in self._param_groups for fp in group.fsdp_params
                  if fp.sharded_param.grad is not None]
        return float(any(not bool(s.isfinite().all()) for s in shards if s.numel()))


def _names(param_group: Any) -> list[str]:
    return [fp._param_fqn or fp._module_info.param_name for fp in param_group.fsdp_params]
