"""``_Checks``: the part of the tracer that checks op outputs for NaN/Inf (at once, or batched every
``sync_every`` ops) and reads what the strong-zero mode ran; the gradients a backward starts from are ``_roots``',
collectives ``_received``'s.

May import: torch, gradwise._masks, gradwise._strong_zeros, gradwise._trace._common, _facts, _kinds, _store,
_shadow.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from threading import get_ident

import torch
from torch._C import _set_grad_enabled
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import _StopRecomputationError

from gradwise import _strong_zeros
from gradwise._trace import _common, _kinds
from gradwise._trace._common import _held, _inexact, _nonfinite, _op_name, _tensors
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident

_STRIDED = torch.strided


def _flag(o: torch.Tensor) -> torch.Tensor:
    """A real scalar that is finite when ``o`` is (its sum; a complex one's parts added): one reduction over what
    ``o`` stores. It can overflow on finite values: an alarm is confirmed element-wise (``_nonfinite``)."""
    total = _held(o).sum()
    return total.real + total.imag if total.is_complex() else total


def _annihilates(func, args, kwargs, out) -> bool:
    """Whether the strong-zero rule's result ``out`` is finite somewhere the plain op's is not."""
    with torch.utils._python_dispatch._disable_current_modes():
        plain = func(*args, **kwargs)
    for p, o in zip(_tensors((plain,)), _tensors((out,)), strict=False):
        if _inexact(p) and p.shape == o.shape and bool(((~torch.isfinite(p)) & torch.isfinite(o)).any()):
            return True
    return False


class _Checks:
    """Checking outputs for NaN/Inf, and the gradients a backward starts from (a part of _Tracer)."""

    def _strong_read(self, seq, ins, func=None, args=(), kwargs=None, out=None) -> None:
        """A backward op of gw.strong_zeros()' pass reads a forward value known to be non-finite: remember the
        births and the node; the ones no incident names at the end were annihilated by strong zeros. Where the
        op's plain result is non-finite at elements the rule left finite, those births were (also) removed as
        contamination, even when a genuine finding names them elsewhere (``strong_removed``)."""
        read = []
        for t in ins:
            got = self.prov.get(t)
            if got and t not in self.sens:
                nd = self.nodes.get(seq)
                site = (nd.op, nd.loc) if nd is not None else ("?", ("<backward>", 0))
                for b in got:
                    if isinstance(b, _Birth):
                        key = (b, site)
                        self.strong_reads[key] = self.strong_reads.get(key, 0) + 1
                        read.append(b)
        if read and func is not None and not func._schema.is_mutable and not self.strong_removed.issuperset(read) \
                and self._safely(func, _annihilates, func, args, kwargs or {}, out):
            self.strong_removed.update(read)
        incs = {i for t in ins if t in self.sens for i in self.prov.get(t, ()) if isinstance(i, _Incident)} \
            if func is not None and not func._schema.is_mutable else set()
        carried = {b for i in incs for b in i.births}
        made = {(i.node_op, i.loc) for i in incs if not i.births}  # made in the backward (amax's g / 0)
        if (made or not self.strong_removed.issuperset(carried)) \
                and self._safely(func, _annihilates, func, args, kwargs or {}, out):
            # a NaN/Inf sensitivity the output uses (genuine) meets a structural zero here (amax's unselected
            # elements): the rule annihilates it there, and its births are removed there too
            nd = self.nodes.get(seq)
            site = (nd.op, nd.loc) if nd is not None else ("?", ("<backward>", 0))
            for b in carried:
                self.strong_reads[(b, site)] = self.strong_reads.get((b, site), 0) + 1
            self.strong_removed.update(carried)
            for key in made:
                self.strong_made[key] = self.strong_made.get(key, 0) + 1
        elif not read and self.dirty and func is not None and not func._schema.is_mutable \
                and not any(_inexact(t) and _nonfinite(t) for t in ins) \
                and self._safely(func, _annihilates, func, args, kwargs or {}, out):
            # from finite values, the plain op makes NaN/Inf (0/0 at sqrt's singular point behind a selection) and
            # the rule annihilates it: no birth to name, the backward op that made it is
            nd = self.nodes.get(seq)
            site = (nd.op, nd.loc) if nd is not None else ("?", ("<backward>", 0))
            self.strong_made[site] = self.strong_made.get(site, 0) + 1

    # -- finiteness checks: one fused reduction per output, batched off the CPU -------------------------------

    def _pass_over(self, kind: str, func) -> None:
        """Note an op the trace ran without reading (a tensor kind it cannot read, or an internal error)."""
        name = _op_name(func) if hasattr(func, "overloadpacket") else func if isinstance(func, str) else None
        entry = self.passed.setdefault(kind, [0, name if name != "a value" else None])
        entry[0] += 1

    def _pass_over_backward(self, call: str, kind: str) -> None:
        """Note a backward call the trace ran without reading (under a torch.func transform, batched seeds, recorded
        by make_fx): its gradients are not examined, so the report must not say that none is NaN or used a NaN."""
        self._pass_over(kind, call)
        self.store.serial += 1  # (an event: a nested block begun before it counts it)
        self.untraced.append(self.store.serial)

    @contextlib.contextmanager
    def passing(self) -> Iterator[None]:
        """While a backward call passed over (``_pass_over_backward``) runs: its ops are not a backward nobody
        started (the tracer's test for TorchScript's)."""
        self.passed_calls += 1
        try:
            yield
        finally:
            self.passed_calls -= 1

    def _safely(self, func, fn, *args):
        """``fn(*args)``, or None with a note: an explanation must never break the program it explains."""
        mode = torch.is_grad_enabled()
        try:
            if mode:  # the trace's own ops build no autograd graph (the C switch, as in _check: no context manager)
                _set_grad_enabled(False)
            return fn(*args)
        except _StopRecomputationError:  # checkpoint's early stop: control flow of the program, not a failure
            raise
        except Exception as exc:  # any failure inside the trace is reported as a note, never raised
            first = next(iter(str(exc).splitlines()), "")  # some exceptions carry no message
            self._pass_over(f"not explained ({type(exc).__name__}: {first[:120]})", func)
            return None
        finally:
            if mode:
                _set_grad_enabled(True)

    def _below_a_pass(self) -> bool:
        """Whether a strong-zero pass's mode runs below this trace: the trace's own reads of an op's outputs (a sum,
        its .item()) then run with the dispatch modes off. That mode took the .item() of an all-structural-zero
        output (a where's never-selected branch) for structural zeros lost in an op with no rule, and on a genuine
        NaN warned "structural zeros reached aten._local_scalar_dense.default ... may be contamination"."""
        return _strong_zeros._STATE.in_mode or (self.thread != get_ident() and _strong_zeros.in_pass())

    def _own_reads(self) -> contextlib.AbstractContextManager:
        return _disable_current_modes() if self._below_a_pass() else contextlib.nullcontext()

    def _read_flags(self, outs) -> list[float]:
        if self._below_a_pass():
            with _disable_current_modes():
                return [_flag(o).item() for o in outs]
        return [_flag(o).item() for o in outs]  # (the everyday path: no context manager per op)

    def _check(self, outs, dig) -> None:
        # PyTorch runs some ops' handlers with autograd live (a detach its autograd kernel calls): a reduction on
        # a tensor that requires grad would then make a node, and take an autograd sequence number. (The C
        # switch, not torch.no_grad(): this runs on every op, and the context manager costs ~1.4 us.)
        grad = torch.is_grad_enabled()
        if grad:
            _set_grad_enabled(False)
        try:
            if len(outs) == 1 and self._checked_now(outs[0], dig):
                return None
            return self._check_values(outs, dig)
        finally:
            if grad:
                _set_grad_enabled(True)

    def _check_values(self, outs, dig) -> None:
        odd = [o for o in outs if o.layout is not torch.strided or o._is_zerotensor() or o.is_nested or o.is_meta]
        if odd:  # sparse, mkldnn, nested, meta, ZeroTensor: nothing to reduce (or no dense reduction)
            for o in odd:
                self._pass_over(_kinds.kind(o) or "unreadable", "a value")
            outs = [o for o in outs if all(o is not d for d in odd)]
            if not outs:
                return
        if (outs[0].device.type == "cpu" and not _common._DEFER_ON_CPU) or self.sync_every <= 1:
            if self.pending:
                self.flush()
            try:
                # a sum per output (no stacking on CPU), over what it stores (an expanded view: once)
                finite = all(math.isfinite(v) for v in self._read_flags(outs))
            except RuntimeError:  # a functorch-wrapped value (vmap): it cannot be read here
                self._pass_over(_kinds.kind(outs[0]) or "unreadable", "a value")
                return
            if not finite:
                self._safely("a value", dig, [o for o in outs if _nonfinite(o)])
        else:
            with self._own_reads():
                flag = _flag(outs[0]) if len(outs) == 1 else torch.stack([_flag(o).float() for o in outs]).sum()
            self.pending.append((flag, outs, dig))
            if len(self.pending) >= self.sync_every:
                self.flush()

    def _checked_now(self, o: torch.Tensor, dig) -> bool:
        """The everyday case in one frame (True when done): one dense CPU output, its sum read at once, without
        batching (a frame less per op than the general path: ~0.6 us of a check's ~5)."""
        if not o.is_cpu or _common._DEFER_ON_CPU or o.layout is not _STRIDED or o.is_nested or o._is_zerotensor():
            return False
        if self.pending:
            self.flush()
        try:
            if self._below_a_pass():
                with _disable_current_modes():
                    flag = _flag(o).item()
            else:
                flag = _flag(o).item()  # (the everyday path: no context manager per op)
        except RuntimeError:  # a functorch-wrapped value (vmap): the general path passes it over
            return False
        if not math.isfinite(flag) and _nonfinite(o):  # (a sum can overflow on finite values)
            self._safely("a value", dig, [o])
        return True

    def flush(self) -> None:
        """Settle the pending finiteness checks (one host sync for the whole batch)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        with _common.unprofiled(), self._own_reads():
            flags = torch.stack([p[0].float() for p in pending]).tolist()
        for v, (_, outs, dig) in zip(flags, pending, strict=True):
            if not math.isfinite(v):
                bad = [o for o in outs if _nonfinite(o)]
                if bad or not outs:  # no outputs: a kink check
                    self._safely("a value", dig, bad)

    # -- digging in: only when an output was not finite ------------------------------------------------------

    def outputs_finite(self) -> bool:
        """Whether every output of the running backward is finite (read once per backward, inside a handler):
        strong zeros take an exactly-0 softmax or exp output as structural only then."""
        if self.finite_outputs is None:
            outs = [r() for r in self.root_outputs]
            self.finite_outputs = all(o is None or (_kinds.readable(o) and not _nonfinite(o)) for o in outs)
        return self.finite_outputs

    # -- autograd entry points -------------------------------------------------------------------------------


# births that are no data of the program: uninitialised memory (overwritten before use) and NaN gradients used
# as values (consequences of findings, reported there)
