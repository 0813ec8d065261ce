"""gradwise under torch.distributed data parallelism: DDP (and FSDP2 ``fully_shard``) on any backend.

Three pieces, each usable alone:

- Strong zeros need nothing here beyond what ``_strong_zeros`` does: DDP all-reduces gradients from hooks on
  the AccumulateGrad nodes, during the one backward that ``gw.strong_zeros()`` runs (plain, or under the
  strong-zero dispatch mode), so the strong-zero gradients are what DDP averages, bucketed and overlapped as
  usual. The backward is never run twice (a second pass would all-reduce again on
  one rank only). This module adds the strong-zero rule for collectives (their buffers hold other ranks'
  values: fully supported).
- ``gather_reports``: the ``gw.trace()`` reports of every rank, merged on one rank, telling which rank
  introduced a NaN/Inf and which only received it through the all-reduce.
- ``nonfinite_guard`` (earlier name ``ddp_nonfinite_hook``): a DDP communication hook that flags non-finite
  buckets before they are reduced (no host sync per bucket) and, once per backward, makes every rank take the
  same decision ("raise", "skip", "warn"): from the averaged buckets, identical on every rank, and, only when
  they hold NaN/Inf, one small all-reduce of the flags to name the ranks and parameters. For FSDP2 the same
  guard wraps the reduce-scatter (``_fsdp_guard``).

No ``from __future__ import annotations`` here: DDP's ``register_comm_hook`` compares the hook's annotations
with the real ``dist.GradBucket`` and ``Future[Tensor]`` objects, not strings.
"""

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from gradwise._strong_zeros import _register
from gradwise._trace._report import Finding, Report, is_received

__all__ = ["NonfiniteGradientError", "NonfiniteGuard", "SkipNonfiniteStep", "ddp_nonfinite_hook", "gather_reports",
           "nonfinite_guard"]

POLICIES = ("raise", "skip", "warn")
# DDP checks a hook's annotation against the real class; builds without torch.distributed have none
_GradBucket = dist.GradBucket if dist.is_available() else Any


# -- strong zeros: a collective's result holds other ranks' values ---------------------------------------------


def _collective(func, args, kwargs, sup):
    """A c10d collective (DDP's bucket all-reduce, FSDP's reduce-scatter) writes values of other ranks, whose
    supports this rank cannot know: every tensor it writes becomes fully supported. It is not "unruled": the
    local gradients that went in were already computed with strong zeros."""
    out = func(*args, **kwargs)
    schema = func._schema.arguments
    written = [a for a, s in zip(args, schema, strict=False) if s.alias_info is not None and s.alias_info.is_write]
    for t in tree_flatten((written, out))[0]:
        if isinstance(t, torch.Tensor):
            sup.record(t, None)
    return out


def _collective_ops() -> list[Any]:
    if not dist.is_available():
        return []
    found = []
    for namespace, names in (
        ("c10d", "allreduce_ allreduce_coalesced_ reduce_ reduce_scatter_ _reduce_scatter_base_ "
                 "reduce_scatter_tensor_coalesced_ allgather_ _allgather_base_ allgather_coalesced_ "
                 "allgather_into_tensor_coalesced_ broadcast_ scatter_ gather_ alltoall_ alltoall_base_ recv_ "
                 "recv_any_source_"),
        ("_c10d_functional", "all_reduce all_reduce_ all_reduce_coalesced all_gather_into_tensor "
                             "reduce_scatter_tensor all_to_all_single wait_tensor broadcast broadcast_"),
    ):
        for name in names.split():
            try:
                found.append(getattr(getattr(torch.ops, namespace), name))
            except (AttributeError, RuntimeError):  # an op this torch build does not have
                continue
    return found


_register(*_collective_ops())(_collective)


# -- merged trace reports ------------------------------------------------------------------------------------

_WHAT = {"nan": "the NaN", "inf": "the Inf", "contamination": "a NaN/Inf that the loss never used (contamination)"}


def _ranks(ranks: set[int]) -> str:
    """"rank 1", "ranks 0,2", "ranks 0-3" (runs of three or more are shortened)."""
    rs = sorted(ranks)
    parts, i = [], 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        parts.append(f"{rs[i]}-{rs[j]}" if j - i >= 2 else ",".join(map(str, rs[i:j + 1])))
        i = j + 1
    return f"{'rank' if len(rs) == 1 else 'ranks'} {','.join(parts)}"


def rank_story(findings: list[Finding], world_size: int | None = None) -> list[str]:
    """One line saying which ranks introduced NaN/Inf gradients and where, and which only received them
    through a collective, e.g. "rank 1 introduced the NaN at data.py:41; ranks 0,2 received it through the
    all-reduce". A rank's genuine NaN/Inf is named rather than its contamination (both would have spread).
    NaN/Inf gradients of a step gw.watch() could not replay (FSDP2; findings born at the backward call) are
    not said to be introduced by their rank: a rank that only received another rank's NaN holds it in its own
    gradient shards just the same, unless ``world_size`` is 1: the one rank received nothing, so it introduced
    them. Empty when no finding carries a rank or none is a NaN/Inf."""
    introduced: dict[int, dict[tuple[str, str], None]] = {}
    received: set[int] = set()
    unexplained: set[int] = set()  # gw.watch() could not replay the step (FSDP2): born here or received, unknown
    for f in findings:
        if f.rank is None or f.kind not in _WHAT:
            continue
        if is_received(f):
            received.add(f.rank)
        elif f.born_op == "backward":
            unexplained.add(f.rank)
        else:
            introduced.setdefault(f.rank, {}).setdefault((f.kind, f.born_location or f.location))
    # one rank in the group, and only it in the findings (a merged report's findings may carry other ranks)
    alone = world_size == 1 and not (introduced.keys() | received) - unexplained and len(unexplained) == 1
    told_unexplained = (f"{_ranks(unexplained)} had NaN/Inf gradients in a step gw.watch() could not replay: " + (
        "the only rank, it introduced them (where is not known)" if alone else
        "which rank introduced them is not known") if unexplained else "")
    if not introduced and not received:
        return [told_unexplained] if unexplained else []
    if not introduced:
        return ["; ".join(filter(None, (
            f"{_ranks(received)} received NaN/Inf through the all-reduce, but no traced rank saw it born: "
            "trace every rank (gw.trace() around the same steps)", told_unexplained)))]
    told = []
    for r in sorted(introduced):
        genuine = [(kind, where) for kind, where in introduced[r] if kind != "contamination"]
        told.append(f"rank {r} introduced " + ", ".join(f"{_WHAT[kind]} at {where}"
                                                        for kind, where in genuine or introduced[r]))
    line = "; ".join(told)
    if received:
        line += f"; {_ranks(received)} received it through the all-reduce"
    return ["; ".join(filter(None, (line, told_unexplained)))]


def gather_reports(report: Report, dst: int = 0, group: Any = None) -> Report | None:
    """Gather the ``gw.trace()`` report of every rank onto rank ``dst`` and merge them.

    Call it on every rank (it is a collective: ``torch.distributed.gather_object``). On ``dst`` it returns one
    Report whose findings are those of all ranks, each with its ``rank``, and whose ``ranks`` line says which
    rank introduced a NaN/Inf and which only received it through the all-reduce (a rank whose own ops were all
    finite but whose gradients after the all-reduce are not). Other ranks get None.

    Example (on every rank, inside a DDP training script)::

        with gw.trace() as report:
            loss = ddp(x).mean(); loss.backward()
        merged = gw.gather_reports(report)
        if merged is not None:
            print(merged)   # "rank 1 introduced the NaN at train.py:41; rank 0 received it through the all-reduce"
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gw.gather_reports needs torch.distributed: call it on every rank after "
                           "torch.distributed.init_process_group(...)")
    rank = dist.get_rank()
    payload = {"rank": rank, "findings": [{**f.as_dict(), "rank": rank if f.rank is None else f.rank}
                                          for f in report.findings],
               "unused": list(report.unused), "notes": list(report.notes), "forward_ops": report.forward_ops,
               "backward_ops": report.backward_ops, "untraced_backwards": report.untraced_backwards}
    gathered: list[Any] | None = [None] * dist.get_world_size(group) if rank == dst else None
    dist.gather_object(payload, gathered, dst=dst, group=group)
    if gathered is None:
        return None
    parts = sorted((p for p in gathered if p is not None), key=lambda p: p["rank"])
    findings = [Finding(**d) for p in parts for d in p["findings"]]
    return Report(findings=findings, unused=[f"rank {p['rank']}: {u}" for p in parts for u in p["unused"]],
                  notes=_merged_notes(parts), forward_ops=sum(p["forward_ops"] for p in parts),
                  backward_ops=sum(p["backward_ops"] for p in parts),
                  ranks=rank_story(findings, dist.get_world_size(group)),
                  untraced_backwards=sum(p.get("untraced_backwards", 0) for p in parts))


def _merged_notes(parts: list[dict]) -> list[str]:
    """The ranks' notes (tensors passed over, gw.watch()'s step): once if every rank has it, else per rank."""
    every = [n for n in parts[0]["notes"] if all(n in p["notes"] for p in parts)] if parts else []
    return every + [f"rank {p['rank']}: {n}" for p in parts for n in p["notes"] if n not in every]


# -- the communication hook ------------------------------------------------------------------------------------


class NonfiniteGradientError(RuntimeError):
    """Raised on every rank by ``gw.nonfinite_guard(model, policy="raise")`` when gradients held NaN/Inf before
    the all-reduce (DDP) or reduce-scatter (FSDP2). ``.bad`` lists ``(rank, [parameter names])`` for every
    offending rank and bucket."""

    def __init__(self, message: str, bad: list[tuple[int, list[str]]]):
        super().__init__(message)
        self.bad = bad


def _check_model(model: object) -> None:
    """Refuse, with the fix, a model that is neither DDP nor FSDP2."""
    from gradwise._fsdp_guard import is_fsdp2

    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or is_fsdp2(model):
        return
    fsdp = type(model).__name__.startswith(("FullyShardedDataParallel", "FSDP"))
    raise TypeError(
        "gw.nonfinite_guard(model, ...): model must be a DistributedDataParallel module or a module that "
        f"torch.distributed.fsdp.fully_shard (FSDP2) was applied to, got {type(model).__name__}"
        + (". FSDP1 (FullyShardedDataParallel) is not supported: use fully_shard (FSDP2); "
           "gw.strong_zeros() and gw.trace() do work under FSDP1" if fsdp else ""))


def group_ranks(process_group: Any) -> tuple[int, int, list[int]]:
    """This process's rank in ``process_group`` (None: the world), the group's size, and each group rank's
    global rank (what reports name)."""
    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ranks = [dist.get_global_rank(group, r) for r in range(world)] if process_group is not None else list(range(world))
    return rank, world, ranks


class NonfiniteGuard:
    """The state of ``gw.nonfinite_guard`` on a DDP model: per-bucket non-finite flags of the current backward (device
    tensors, never read on the host one by one), the averaged buckets, and the decision all ranks took after
    the last synchronised backward. Create it with ``gw.nonfinite_guard``."""

    def __init__(self, model: torch.nn.parallel.DistributedDataParallel, policy: str, process_group: Any = None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        _check_model(model)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError("NonfiniteGuard is DDP's guard; create the guard of an FSDP2 model with "
                            "gw.nonfinite_guard(model, policy=...)")
        self.policy = policy
        self.process_group = process_group
        self._group_rank, self._world, self._global = group_ranks(process_group)
        self._names = {id(p): n for n, p in model.module.named_parameters()}
        self._extrema: list[torch.Tensor] = []  # per bucket of this backward: its (min, max), NaN/Inf kept
        self._params: list[list[torch.Tensor]] = []
        self._reduced: list[torch.futures.Future] = []  # per bucket: the averaged bucket, once all-reduced
        self._queued = False
        self._skip = False
        self.bad: list[tuple[int, list[str]]] = []  # (rank, parameter names) of the last backward's bad buckets
        # after a backward that found NaN/Inf (the same on every rank): its .bad, and the parameters whose .grad
        # then held NaN/Inf (the same on every rank: averaged), each with a hook that flags, on the device, a
        # NaN/Inf of this rank's own arriving in it (DDP's bucket holds the accumulated .grad, NaN either way)
        self._carried: list[tuple[int, list[str]]] | None = None
        self._parameters = list(model.parameters())
        self._held: dict[int, tuple[torch.Tensor, Any]] = {}  # id -> (parameter, its hook's handle)
        self._fresh: dict[int, torch.Tensor] = {}  # id -> whether a NaN/Inf arrived since the last decision
        self._shadow_due = False
        inner = model.join_hook
        model.join_hook = lambda **kwargs: _GuardedJoinHook(inner(**kwargs), self)
        self.steps = 0  # synchronised backwards checked
        self.nonfinite_steps = 0  # ... of which some rank had NaN/Inf before the all-reduce

    def should_skip(self) -> bool:
        """True when the last synchronised backward had NaN/Inf on some rank before the all-reduce (the same
        answer on every rank): skip ``optimizer.step()`` (``gw.SkipNonfiniteStep`` does it)."""
        return self._skip

    def _hold(self) -> None:
        """After a NaN/Inf backward: watch what arrives in the gradients that hold NaN/Inf now (rare path only)."""
        self._release()
        for p in self._parameters:
            if p.grad is not None and not bool(p.grad.isfinite().all()):
                self._held[id(p)] = (p, p.register_hook(self._arrival(id(p))))

    def _release(self) -> None:
        for _, handle in self._held.values():
            handle.remove()
        self._held, self._fresh = {}, {}

    def _arrival(self, key: int) -> Callable[[torch.Tensor], None]:
        def flag(grad: torch.Tensor) -> None:
            """Before accumulation: whether this rank's own gradient holds NaN/Inf (any backward, no_sync too)."""
            bad = ~grad.isfinite().all()
            self._fresh[key] = bad if key not in self._fresh else self._fresh[key] | bad
        return flag

    def _begin(self) -> None:
        self._extrema, self._params, self._reduced, self._skip, self.bad = [], [], [], False, []

    def _after_reducer(self) -> None:
        # queued from the first bucket's hook; queueing again from a callback runs after the callback DDP's
        # reducer queues when its last bucket is ready (finalize_backward), so the decision (and a raise)
        # comes after DDP has settled its state for this iteration
        torch.autograd.Variable._execution_engine.queue_callback(self._decide)

    def _decide(self) -> None:
        """Once per backward, the same decision on every rank. The averaged buckets are the same on every
        rank, and a NaN/Inf that went into a sum comes out of it whatever the order: so whether they are all
        finite (one min/max pass, one host read) is already the same answer everywhere, with no collective.
        Only when they are not does one all-reduce of the (world x buckets) table of the flags taken before
        the reduction tell every rank which rank and which parameters brought the NaN/Inf in."""
        self._queued = False
        self.steps += 1
        if not self._nonfinite_everywhere():
            self._carried = None
            self._release()
            return
        where_from = "before the all-reduce"
        if not self.bad and self._carried and any(p.grad is not None and not bool(p.grad.isfinite().all())
                                                  for p, _ in self._held.values()):
            # no rank's own gradients held NaN/Inf: the NaN/Inf is the one an earlier backward left in .grad
            self.bad = list(self._carried)
            where_from = "before the all-reduce of an earlier backward, accumulated into these gradients"
        self._carried = self.bad
        self._hold()
        _conclude(self, where_from, "their sum overflowed")

    def _nonfinite_everywhere(self) -> bool:
        """Whether the averaged buckets hold NaN/Inf (the same answer on every rank, no collective); if they do,
        one all-reduce of the flags taken before the reduction fills ``self.bad``."""
        reduced = torch.stack([torch.stack(torch.aminmax(f.wait())).float() for f in self._reduced])
        if bool(reduced.isfinite().all()):
            return False
        local = (~torch.stack([e.float() for e in self._extrema]).isfinite()).any(-1).float()
        table = torch.zeros(self._world, len(self._extrema), device=local.device)
        table[self._group_rank] = local
        dist.all_reduce(table, group=self.process_group)
        self.bad = [(self._global[r], [self._names.get(id(p), f"<parameter {tuple(p.shape)}>")
                                       for p in self._params[b]])
                    for r, row in enumerate(table.tolist()) for b, flag in enumerate(row) if flag]
        return True

    def _shadow(self) -> None:
        """A rank that has joined (``DDP.join()``: out of data) all-reduces zero buckets, outside any backward, to
        match the others' backward; it joins their decision's collective too (a rank missing from it would leave
        the others waiting), and takes no step, so it applies no policy. Run after DDP's join hook: the others'
        decision comes after their backward's every collective (the unused-parameter map's included)."""
        self._nonfinite_everywhere()


class _GuardedJoinHook:
    """DDP's join hook, then the joined rank's part in the decision's all-reduce (``NonfiniteGuard._shadow``)."""

    def __init__(self, inner: Any, guard: NonfiniteGuard):
        self.inner, self.guard = inner, guard

    def main_hook(self) -> None:
        self.inner.main_hook()
        if self.guard._shadow_due:
            self.guard._shadow_due = False
            self.guard._shadow()

    def post_hook(self, is_last_joiner: bool) -> None:
        self.inner.post_hook(is_last_joiner)


def _conclude(guard: Any, where_from: str, overflow: str) -> None:
    """The policy, applied alike by every rank once ``guard.bad`` (the same on every rank) is known."""
    guard.nonfinite_steps += 1
    guard._skip = guard.policy == "skip"
    per_rank: dict[int, list[str]] = {}
    for r, names in guard.bad:
        per_rank.setdefault(r, []).extend(names)
    where = "; ".join(f"rank {r}: {', '.join(names)}" for r, names in per_rank.items()) or \
        f"every rank's own gradients were finite: {overflow}"
    message = f"gradwise: NaN/Inf gradients {where_from} ({where})"
    if guard.policy == "raise":
        raise NonfiniteGradientError(message + ". Every rank raises this error.", guard.bad)
    if guard.policy == "warn":
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _nonfinite_hook(state: NonfiniteGuard, bucket: _GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: record whether the bucket holds NaN/Inf (its min and max, which keep NaN and
    +-Inf, without a host read), then average it exactly like DDP's default ``allreduce_hook``."""
    if bucket.index() == 0:
        state._begin()
    buf = bucket.buffer()
    if state._held:  # (only after a NaN/Inf step) the NaN/Inf still in .grad is no new one of this rank's
        fresh = [state._fresh[id(p)] if id(p) in state._held else ~g.isfinite().all()
                 for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
                 if id(p) not in state._held or id(p) in state._fresh]
        flag = torch.stack(fresh).any() if fresh else torch.zeros((), dtype=torch.bool, device=buf.device)
        state._extrema.append(torch.where(flag, float("nan"), 0.0).expand(2))
    else:
        state._extrema.append(torch.stack(torch.aminmax(buf)))
    state._params.append(bucket.parameters())
    in_backward = torch._C._current_graph_task_id() != -1  # not so under DDP.join(): a joined rank's zeros
    if not state._queued and in_backward:
        state._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(state._after_reducer)
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buf.div_(state._world)  # the default hook's order: divide, then sum (avoids overflow in low precision)
    fut = dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])
    state._reduced.append(fut)
    if not in_backward and bucket.is_last():
        state._shadow_due = True  # (a joined rank) decided once DDP's join hook has run its collectives
    return fut


def nonfinite_guard(model: torch.nn.Module, policy: str = "raise", *, process_group: Any = None,
                    register: bool = True) -> Any:
    """Guard data-parallel gradient reduction against NaN/Inf, with the same decision on every rank.

    ``model`` is a ``DistributedDataParallel`` module or a module ``fully_shard`` (FSDP2) was applied to. The
    guard watches the reduction through the wrapper's own hook (DDP: a communication hook; FSDP2: its
    reduce-scatter, wrapped) and flags, on the device, whether the gradients held NaN/Inf *before* the
    reduction (no host read per bucket). When the backward ends, every rank takes the same decision:

    - ``"raise"``: every rank raises ``gw.NonfiniteGradientError`` naming the ranks and parameters;
    - ``"skip"``: ``guard.should_skip()`` is True on every rank; wrap the optimizer in
      ``gw.SkipNonfiniteStep(optimizer, guard)`` so that all ranks skip the step together;
    - ``"warn"``: every rank warns (``RuntimeWarning``) and training goes on.

    Cost on finite data: two min/max passes per bucket and one host read per backward; DDP needs no extra
    collective (its averaged buckets are the same on every rank), FSDP2 one tiny all-reduce of the flags per
    backward (its reduced shards differ from rank to rank). ``register=False`` (DDP only) returns the guard
    without registering: then call ``model.register_comm_hook(guard, guard.hook)`` yourself.

    Example::

        model = DistributedDataParallel(net)          # or fully_shard(net)
        guard = gw.nonfinite_guard(model, policy="skip")
        opt = gw.SkipNonfiniteStep(torch.optim.SGD(model.parameters(), lr=0.1), guard)
        loss = model(x).mean(); loss.backward(); opt.step()   # every rank skips, or none
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    _check_model(model)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gw.nonfinite_guard needs torch.distributed: call it on every rank after "
                           "torch.distributed.init_process_group(...) and wrapping the model")
    from gradwise._fsdp_guard import FSDPNonfiniteGuard, is_fsdp2

    if is_fsdp2(model):
        if not register:
            raise ValueError("gw.nonfinite_guard: register=False is for DDP's communication hook; an FSDP2 "
                             "guard is installed in the model's reduce-scatter when it is created")
        return FSDPNonfiniteGuard(model, policy, process_group)
    guard = NonfiniteGuard(model, policy, process_group)
    if register:
        model.register_comm_hook(guard, _nonfinite_hook)
    return guard


def ddp_nonfinite_hook(model: torch.nn.Module, policy: str = "raise", *, process_group: Any = None,
                       register: bool = True) -> Any:
    """The earlier name of ``gw.nonfinite_guard`` (same arguments, same result, DDP and FSDP2 alike)."""
    return nonfinite_guard(model, policy, process_group=process_group, register=register)


NonfiniteGuard.hook = staticmethod(_nonfinite_hook)  # for register=False: model.register_comm_hook(g, g.hook)


class SkipNonfiniteStep:
    """Wrap an optimizer so that ``step()`` does nothing when the guard says this step's gradients held NaN/Inf
    on some rank (every rank skips together: the decision came from one all-reduce). Everything else is the
    wrapped optimizer's (``zero_grad``, ``param_groups``, ``state_dict``...); ``skipped`` counts the skips.
    Give an LR scheduler the wrapped optimizer itself (``wrapper.optimizer``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, guard: NonfiniteGuard):
        self.optimizer = optimizer
        self.guard = guard
        self.skipped = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``optimizer.step(closure)``, or nothing when the guard flagged this step's backward. A ``closure`` runs
        the backward, so it is evaluated here first (as the optimizer would, with gradients enabled) and the
        decision read after it; the optimizer then gets that first evaluation back from its own first call of
        the closure (an optimizer that evaluates it again, like LBFGS, runs those backwards unguarded)."""
        if closure is None:
            if self.guard.should_skip():
                self.skipped += 1
                return None
            return self.optimizer.step()
        with torch.enable_grad():
            loss = closure()
        if self.guard.should_skip():  # decided by the backward the closure just ran, not the previous one
            self.skipped += 1
            return loss
        first = [loss]

        def replay() -> Any:
            return first.pop() if first else closure()

        return self.optimizer.step(replay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)
