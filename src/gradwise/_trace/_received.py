"""``_Received``: the part of the tracer that follows collectives (DDP's gradient all-reduce, FSDP's
reduce-scatter): the buffers other ranks write, and the NaN/Inf a gradient received from another rank, which no
local finding explains.

May import: torch, gradwise._masks, gradwise._trace._common, _kinds, _report.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from gradwise._masks import all_finite
from gradwise._trace import _common, _kinds
from gradwise._trace._common import _fmt, _grad, _held, _inexact, _loc, _nonfinite, _source, _tensors, _user_frame
from gradwise._trace._report import Finding


class _Received:
    """Collectives and what a gradient received through them (a part of _Tracer)."""
    def _collective(self, func, args, kwargs):
        """A collective (DDP's gradient all-reduce, FSDP's reduce-scatter): its buffers are written by the
        other ranks, possibly later (async), so they are not checked here; they are remembered, so that a
        NaN/Inf read from them later, or a final gradient that is not finite while every local op was, is
        reported as received from another rank."""
        frame = _user_frame()
        loc = _loc(frame)
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        self.collective_sites.setdefault((name, loc))
        self.collectives += 1
        self.last_collective = (name, loc)
        out = _common.run_op(func, args, kwargs)
        if len(self.collective_bufs) > 4096:  # FSDP allocates new buffers every step: forget the freed ones
            self.collective_bufs = {k: v for k, v in self.collective_bufs.items() if not v[0].expired()}
        for t in _tensors([*args, *kwargs.values(), out]):
            if t.is_floating_point() and t.layout == torch.strided:
                storage = t.untyped_storage()
                self.collective_bufs[storage._cdata] = (StorageWeakRef(storage), name, loc)
        return out

    def remember_received(self, t: torch.Tensor, site: tuple) -> None:
        """``t`` (a .grad) holds what the untraced collective ``site`` wrote (gw.watch() saw the all-reduce only
        through its result): its NaN/Inf, read later (accumulated onto by the next micro-batch, stepped with), is
        another rank's. Without it, the next backward's accumulation into it looked like a NaN its AccumulateGrad
        made from finite values: a genuine NaN of this rank."""
        if t.layout != torch.strided or t in self.prov:
            return
        key = t.untyped_storage()._cdata
        kept = self.collective_bufs.get(key)
        self.collective_bufs[key] = (StorageWeakRef(t.untyped_storage()), *site)
        try:
            self._origin(t, site[1])  # its provenance: a birth "received from another rank" at the collective
        finally:  # the storage itself is no collective's buffer (a later NaN of this rank's in it is its own)
            if kept is None:
                del self.collective_bufs[key]
            else:
                self.collective_bufs[key] = kept

    def _received_through(self, t: torch.Tensor) -> tuple | None:
        """(op, loc) of the collective whose buffer ``t`` reads, or None."""
        if not self.collective_bufs or t.layout != torch.strided:
            return None
        entry = self.collective_bufs.get(t.untyped_storage()._cdata)
        return None if entry is None or entry[0].expired() else entry[1:]

    def nonfinite_grads(self) -> set[str]:
        """Names of the leaves whose gradient holds NaN/Inf now. Taken before a backward under a process group: a
        gradient this backward accumulates onto (no_sync micro-batches, accumulation without zero_grad) that was
        already NaN/Inf holds this rank's own earlier NaN, or one received at an earlier step, not a receipt of
        this backward's collective."""
        if _common._dist_rank() is None or not self.names:
            return set()
        with torch.utils._python_dispatch._disable_current_modes():  # the trace's reads, not the program's ops
            grads = [(g, name) for leaf, name in list(self.names.items()) for g in (_grad(leaf),)
                     if isinstance(g, torch.Tensor) and _inexact(g) and _kinds.readable(g)]
            if all_finite([_held(g) for g, _ in grads]):  # the usual step: one check of all gradients
                return set()
            return {name for g, name in grads if _nonfinite(g)}

    def note_received(self, local: set[str], site: tuple | None = None) -> None:
        """Record this step's receipt (``received``) when a backward that ran a collective ends: the next step's
        zero_grad clears the evidence long before the block ends. Once per step."""
        self.receipts_checked = (self.store.step, self.collectives)  # the block's end need not check it again
        if self.store.step not in self.receipts and (got := self.received(local, site)) is not None:
            self.store.serial += 1  # (a nested block reports what happened after it began)
            self.receipts[self.store.step] = (*got, self.store.serial)

    def received(self, local: set[str], site: tuple | None = None) -> tuple | None:
        """(op, loc, {leaf name: elements}, NaN seen) of the leaves whose gradient holds NaN/Inf now that no local
        finding reaches (``local``: the names local findings reach): another rank's, received through the
        collective ``site`` (default: the latest one, the backward's all-reduce, not DDP's set-up broadcast).
        None when there are none."""
        site = site or self.last_collective
        if site is None:
            return None
        with torch.utils._python_dispatch._disable_current_modes():  # the trace's reads, not the program's ops
            grads = [(g, name) for leaf, name in list(self.names.items()) if name not in local
                     for g in (_grad(leaf),)
                     if isinstance(g, torch.Tensor) and _inexact(g) and _kinds.readable(g)]
            if all_finite([_held(g) for g, _ in grads]):  # the usual step: one check of all gradients
                return None
            counts = {name: int((~torch.isfinite(_held(g))).sum()) for g, name in grads if _nonfinite(g)}
            if not counts:
                return None
            has_nan = any(bool(torch.isnan(_held(g)).any()) for g, name in grads if name in counts)
        return (*site, counts, has_nan)

    def _add_received(self, findings: dict, since: int = 0) -> None:
        """Under data parallelism a rank whose own ops were all finite can still end with NaN/Inf gradients:
        another rank's, averaged in by the all-reduce. Each step's receipt was recorded when its backward ended
        (``note_received``); the gradients held now are checked too (a collective after the last backward)."""
        receipts = {s: r for s, r in self.receipts.items() if r[4] > since}
        checked = self.receipts_checked == (self.store.step, self.collectives)
        if self.store.step not in receipts and not checked and (now := self.received(
                {name for f in findings.values() for name in f.reaches})) is not None:
            receipts[self.store.step] = (*now, self.store.serial + 1)
        if not receipts:
            return
        op, loc = next(iter(receipts.values()))[:2]
        counts: dict[str, int] = {}
        for r in receipts.values():
            for name, n in r[2].items():
                counts[name] = counts.get(name, 0) + n
        has_nan = any(r[3] for r in receipts.values())
        findings[("received", op, loc)] = Finding(
            "nan" if has_nan else "inf", op, _fmt(loc), sum(counts.values()), reaches=sorted(counts),
            source=_source(loc), occurrences=len(receipts), step=min(receipts),
            message=f"received through {op}: this rank's own ops were finite, its gradients after the collective "
                    "are not",
            born_op=op, born_location=_fmt(loc), born=f"another rank's {'NaN' if has_nan else 'Inf'}, received "
            f"through {op}", fix="gw.gather_reports(report) on every rank names the rank that introduced it; "
            "gw.ddp_nonfinite_hook stops or skips such a step on every rank")
