"""``_Assembly``: the part of the tracer that turns what it recorded into a ``Report`` (findings, causes,
what strong zeros would remove, unused NaN/Inf).

May import: torch, gradwise._masks, gradwise._trace._common, _advice, _facts, _causes, _kinds, _report, _store.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradwise._masks import all_finite
from gradwise._trace import _causes, _kinds
from gradwise._trace._advice import (
    _GENUINE_FIX,
    _GRADIENT_FIX,
    _INPUT_FIX,
    _KINK_FIX,
    _SEED_FIX,
    _SINGULAR_FIX,
    _SOFTMAX_INF,
    _SOFTMAX_INF_FIX,
    _UNDECIDED,
    _UNEXPLAINED_FIX,
)
from gradwise._trace._common import _dist_rank, _fmt, _grad, _held, _inexact, _nonfinite, _positions, _source, aten
from gradwise._trace._facts import _DISCARDS, _NOT_DATA, _OVERFLOW_NAMES, _ZERO_OUTPUTS, _discard_key
from gradwise._trace._report import Finding, Report
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import Incident as _Incident
from gradwise._trace._store import _order, describe_arrivals, earliest, root


def _site(kind: str, birth: _Birth) -> tuple:
    """A genuine finding's key: where its NaN/Inf was born; a gradient used as a value (an optimizer step) also
    by the birth itself, which is one per root cause (two bugs whose gradients one line writes: two findings)."""
    return (kind, birth.op, birth.loc) + ((birth.order,) if birth.op == "gradient" else ())


def _aten(op: str) -> object:
    """The aten op packet a report's op name ("aten.exp") names, or None (a library's op, "mylib.fused")."""
    return getattr(aten, op[5:], None) if op.startswith("aten.") else None


class _Assembly:
    """The report from what the tracer recorded (a part of _Tracer)."""

    def fill(self, report: Report, since: int = 0) -> None:
        """Fill ``report`` (linear in the records kept); ``since`` (the store's event counter when a nested block
        began) leaves out what was last seen before it."""
        self.flush()
        report.forward_ops, report.backward_ops = self.n_fwd, self.n_bwd
        report.untraced_backwards = sum(1 for serial in self.untraced if serial > since)
        findings: dict[tuple, Finding] = {}

        origin: dict[tuple, _Birth] = {}  # finding key -> the birth that explains it (root causes)

        def add(key, make, count, reaches, indices, occurrences=1, step=None, birth=None):
            f = findings.get(key)
            if f is None:
                f = findings[key] = make()
                f.count, f.indices, f.occurrences = 0, indices, 0
                if birth is not None:
                    origin[key] = birth
            f.count += count
            f.occurrences += occurrences
            f.reaches = sorted(set(f.reaches) | set(reaches))
            if step is not None and (f.step is None or step < f.step):
                f.step = step

        birthless: set = set()
        unreached: dict[tuple, int] = {}  # contamination no gradient received: (op, line) -> elements
        arrived: dict[tuple, dict] = {}  # a finding of data that arrived non-finite -> its input births (in order)
        for inc in sorted(self.store.incidents.values(), key=lambda i: i.order):
            if inc.serial <= since:
                continue
            if inc.annihilated and not inc.reaches:
                continue  # a structural zero downstream annihilated it: the contamination found there says so
            if inc.covered and not inc.reaches:
                continue  # a gradient took it in beneath a genuine NaN/Inf at every element: that finding says so
            if not inc.reaches and (inc.kind == "contamination" or not inc.births):
                # made in the backward (contamination, or from finite values: sqrt'(0) behind a relu), then dropped
                # before any gradient: harmless
                unreached[(inc.op, _fmt(inc.loc))] = unreached.get((inc.op, _fmt(inc.loc)), 0) + inc.count
                continue
            via = earliest(inc.births)
            birth = overflow_root(via)
            stand_in = self.backward_births.get(id(inc), (None, None))[1]  # born in the backward, used later
            if inc.kind == "contamination":
                key = ("contamination", inc.op, inc.loc, birth.op if birth else None, birth.loc if birth else None)
                add(key, lambda inc=inc, birth=birth, via=via: self._contamination(inc, birth, via), inc.count,
                    inc.reaches, inc.indices, inc.occurrences, inc.step, birth or stand_in)
                if birth is not None and birth.op == "input":
                    arrived.setdefault(key, {})[birth] = None
            elif birth is not None:  # named by where it was born: count and elements are the born tensor's
                key = _site(inc.kind, birth)
                # each birth counted once (the DataLoader batches arriving at one line are births of their own)
                new = key not in findings or (birth.op == "input" and birth not in arrived.get(key, ()))
                if birth.op == "input":  # every input that arrived non-finite at that line, named below
                    arrived.setdefault(key, {}).update(
                        (b, None) for b in sorted(inc.births, key=_order) if b.op == "input" and b.loc == birth.loc)
                add(key, lambda inc=inc, birth=birth, via=via: self._genuine(inc.kind, inc, birth, via),
                    birth.count if new else 0, inc.reaches, birth.indices, birth.occurrences if new else 0,
                    # where it reached a gradient (the cause names where it was born); a gradient used as a value
                    # from where the line used it (the cause's 'wrote it at step 150', not the next backward's 151)
                    min(inc.step, birth.step) if birth.op == "gradient" else inc.step, birth)
            else:
                key = (inc.kind, inc.node_op, inc.loc)
                add(key, lambda inc=inc: self._genuine(inc.kind, inc, None), inc.count, inc.reaches, inc.indices,
                    inc.occurrences, inc.step, stand_in)
                birthless.add(key)
        # the roots of downstream findings: an output that inherited a NaN gradient written at another line of the
        # same story (clip_grad_norm_ then the optimizer) is told in that cause, not as a finding reaching no gradient
        told = {id(root(b)) for b in origin.values() if b.op == "gradient"}
        uses: list[_Birth] = []  # such births (their lines are part of the cause's downstream)
        for via in sorted(self.output_births, key=lambda b: b.order):
            kind, birth = "nan" if via.nan else "inf", overflow_root(via)
            key = _site(kind, birth)
            if key not in findings and birth.op == "gradient" and id(root(birth)) in told:
                uses.append(birth)
                continue
            if key in birthless:  # the output itself is NaN/Inf from the forward: that is the explanation
                old = findings[key]
                findings[key] = self._genuine(kind, None, birth, via)
                findings[key].count, findings[key].indices = birth.count, birth.indices
                findings[key].occurrences, findings[key].reaches = old.occurrences, old.reaches
                findings[key].step, origin[key] = old.step, birth
            elif key not in findings:
                add(key, lambda birth=birth, kind=kind, via=via: self._genuine(kind, None, birth, via), birth.count,
                    [], birth.indices, birth.occurrences, birth.step, birth)
        for key, births in arrived.items():
            f, first = findings.get(key), origin.get(key)
            if f is None or not f.born or first is None:
                continue
            same = [first] + [b for b in births if b is not first and b.name == first.name]
            if len(same) > 1:  # the batches that brought it, told as one
                f.born = f.born.replace(first.describe(), describe_arrivals(same), 1)
            also = sorted({b.name for b in births if b.name} - {first.name})
            if also:
                f.born += f"; so did {', '.join(also)}"
        self._grads_made_nonfinite_after_backward(findings, add)
        for name, (count, occurrences, serial) in self.store.orphans.items():
            if serial > since:
                add(("nan", "unknown", name), lambda name=name: Finding(
                    "nan", "unknown", "<unknown>", 0, message=f"the gradient of {name} is not finite; its birth was "
                    "not observed (made outside the traced block?)"), count, [name], [], occurrences)
        if self.collective_sites or self.receipts:
            self._add_received(findings, since)
        for g in self.kinks.values():
            findings[(g.kind, g.op, g.loc)] = Finding(
                g.kind, g.op, _fmt(g.loc), g.count, fix=_KINK_FIX if g.kind == "kink" else _SINGULAR_FIX,
                message=f"{g.count} element(s) at a {'kink' if g.kind == 'kink' else 'singular point'}",
                source=_source(g.loc), indices=g.indices, convention=g.convention, reached_gradient=g.reached,
                occurrences=g.occurrences, step=g.step)
        order = {k: i for i, k in enumerate(("contamination", "nan", "inf", "singular", "kink"))}
        report.findings = sorted(findings.values(), key=lambda f: (order[f.kind], *_line_order(f.location)))
        report.causes = _causes.group(report.findings, {id(f): origin[k] for k, f in findings.items()
                                                              if k in origin}, _fmt, self.store.step,
                                     self.param_writes, self.value_writes, uses)
        report.notes = [f"{kind} tensors: {n} op(s) or value(s) passed over" + (f" (first: {op})" if op else "")
                        if not kind.startswith("not explained") else f"{op or 'a value'}: {kind} ({n}x)"
                        for kind, (n, op) in self.passed.items()]
        report.removed = _causes.removed(self.strong_reads, self.store.incidents.values(), _fmt,
                                         self.strong_removed) + [
            f"NaN/Inf that the backward of {op} at {_fmt(loc)} made from finite values (an infinite derivative, 0/0)"
            f"{'' if n == 1 else f' ({n}x)'}: gw.strong_zeros() annihilated it where a structural zero met it; "
            "nothing to fix" for (op, loc), n in self.strong_made.items()]
        report.unused = self._unused(removed={b for b, _ in self.strong_reads}, found=origin.values()) + [
            f"{op} at {loc} in the backward ({n} value{'s' if n != 1 else ''})" for (op, loc), n in unreached.items()]
        rank = _dist_rank()
        for f in report.findings:
            f.rank = rank

    def _add_received(self, findings: dict, since: int = 0) -> None:
        """Under data parallelism a rank whose own ops were all finite can still end with NaN/Inf gradients:
        another rank's, averaged in by the all-reduce. Each step's receipt was recorded when its backward ended
        (``note_received``); the gradients held now are checked too (a collective after the last backward)."""
        receipts = {s: r for s, r in self.receipts.items() if r[4] > since}
        if self.store.step not in receipts and (now := self.received(
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

    def _contamination(self, inc: _Incident, birth: _Birth | None, via: _Birth | None = None) -> Finding:
        disc_op, disc_loc = inc.discarded if inc.discarded else (None, None)
        key = _discard_key(disc_op) if disc_op else None
        rewrite = _DISCARDS.get(key) or _ZERO_OUTPUTS.get(key)
        if rewrite is None:
            rewrite = "mask the value before the op that makes NaN/Inf (e.g. before the division)"
        if disc_op is None:  # no op upstream discards values: the zero may be one the program computes
            return Finding(
                "contamination", inc.op, _fmt(inc.loc), inc.count,
                message=f"{inc.what}; the sensitivity there is 0, but no op that discards values (slice, where, "
                "mask...) made it: if the program computes that 0 (0 * x), it is an ordinary zero and the NaN is "
                "genuine for gw.grad too", source=_source(inc.loc), born_op=birth.op if birth else inc.op,
                born_location=_fmt(birth.loc) if birth else _fmt(inc.loc),
                born=_born(birth, via) if birth else f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op}",
                fix=f"if the zero stands for 'not used', gw.strong_zeros() removes it only where a discarding op "
                    f"made it: a kernel that skipped these elements (an RNN-T loss past the lengths) can declare "
                    f"them with gw.mark_unused(x, unused) before it; otherwise {rewrite}")
        born = _born(birth, via) if birth else \
            f"a NaN/Inf in a sparse (non-strided) operand of the backward of {inc.node_op}, whose values the trace " \
            "does not read" if inc.unfollowed else \
            f"0/0 or 0 x Inf in {inc.op}, the backward of {inc.node_op} at {_fmt(inc.loc)}"
        fix = (f"gw.strong_zeros() cannot remove it: a sparse (or mkldnn, nested) tensor takes part in this "
               f"backward, which it runs as plain PyTorch. Rewrite: {rewrite}." if inc.unfollowed else
               f"gw.strong_zeros() (or gw.grad / gw.backward) removes it. Local rewrite: {rewrite}.")
        return Finding(
            "contamination", inc.op, _fmt(inc.loc), inc.count, message=f"{inc.what}; the output never used it",
            source=_source(inc.loc), born_op=birth.op if birth else inc.op,
            born_location=_fmt(birth.loc) if birth else _fmt(inc.loc), born=born,
            discarded_op=disc_op, discarded_location=_fmt(disc_loc) if disc_loc else None, fix=fix)

    def _genuine(self, kind: str, inc: _Incident | None, birth: _Birth | None, via: _Birth | None = None) -> Finding:
        if birth is not None:
            op, loc = birth.op, birth.loc
            fix = _INPUT_FIX if birth.op == "input" else _GRADIENT_FIX if birth.op == "gradient" else \
                _SEED_FIX if birth.op == "seed" else _UNEXPLAINED_FIX if birth.op == "backward" else \
                _SOFTMAX_INF_FIX if birth.what.startswith(_SOFTMAX_INF) else \
                _GENUINE_FIX.get(_aten(birth.op), "")
            message = f"{birth.what}; " + (_UNDECIDED.format(op=inc.op) if inc is not None and inc.undecided
                                           else "every gradient it reaches uses it" if birth.op == "seed"
                                           else "whether the output used it (genuine) or not (contamination) is "
                                           "not known" if birth.op == "backward"
                                           else "the output depends on it")
        else:
            op, loc = inc.node_op, inc.loc
            fix = _GENUINE_FIX.get(_aten(op), "")
            message = inc.what
        born = _born(birth, via) if birth else (inc.what if inc else None)
        return Finding(kind, op, _fmt(loc), 0, fix=fix or "find why the value is not finite where it is used",
                       message=message, source=_source(loc), born_op=birth.op if birth else (inc.op if inc else None),
                       born_location=_fmt(birth.loc) if birth else (_fmt(inc.loc) if inc else None), born=born)

    def _grads_made_nonfinite_after_backward(self, findings: dict, add: Callable) -> None:
        """A parameter's .grad that is not finite at the end of the block although no backward finding reaches
        it: something after the backward wrote NaN/Inf into it (clip_grad_norm_ with a NaN total norm scales
        every gradient by NaN). Reported with the op that did it, from the gradient's provenance."""
        reached = {r for f in findings.values() for r in f.reaches}
        grads = []
        for leaf, name in self.names.items():
            g = _grad(leaf)
            if name not in reached and isinstance(g, torch.Tensor) and _inexact(g) and _kinds.readable(g):
                grads.append((g, name))
            elif name not in reached and isinstance(g, torch.Tensor) and g.layout is torch.sparse_coo and _inexact(g):
                self._sparse_gradient(g, name, add)
        if all_finite([_held(g) for g, _ in grads]):  # the usual end of a step: no per-gradient test
            return
        # one finding per op and line (and kind): clip_grad_norm_'s one _foreach_mul_ writes into every gradient
        written: dict[tuple, list] = {}
        for g, name in grads:
            if not _nonfinite(g):
                continue
            births = [b for b in self.prov.get(g, ()) if isinstance(b, _Birth)]
            if not births or g not in self.written or all(b.received for b in births):
                continue  # a collective's write (DDP copying the averaged bucket back): _add_received says so
            kind = "nan" if bool(torch.isnan(g).any()) else "inf"
            written.setdefault((kind, *self.written[g]), []).append((g, name, min(births, key=_order)))
        for (kind, op, loc), hit in written.items():
            b = hit[0][2]
            names = [name for _, name, _ in hit]
            whose = f"the gradient of {names[0]} was" if len(names) == 1 else \
                f"the gradients of {', '.join(names)} were"
            into = "it" if len(names) == 1 else "them"
            for n, (g, name, _) in enumerate(hit):
                count, idx = _positions(~torch.isfinite(g))
                add((kind, op, loc, "grad"), lambda b=b, kind=kind, op=op, loc=loc, whose=whose, into=into: Finding(
                    kind, op, _fmt(loc), 0, source=_source(loc), born_op=b.op, born_location=_fmt(b.loc),
                    born=b.describe(), message=f"{whose} finite after backward; {op} wrote "
                    f"{'NaN' if kind == 'nan' else 'Inf'} into {into} afterwards, from {b.describe()}",
                    fix="a step after backward mixes gradients (clip_grad_norm_'s total norm, a NaN guard): fix the "
                        "non-finite gradient it read (see the other findings), or skip the step when the total norm "
                        "is not finite (clip_grad_norm_(..., error_if_nonfinite=True))"), count, [name], idx,
                    occurrences=int(n == 0), birth=b)

    def _sparse_gradient(self, g: torch.Tensor, name: str, add: Callable) -> None:
        """A sparse gradient that holds NaN/Inf: the trace reads no sparse values, so it cannot say where it came
        from, but says that it is there (the report said 'No NaN/Inf gradients')."""
        values = g.coalesce()._values()
        if bool(torch.isfinite(values).all()):
            return
        kind = "nan" if bool(torch.isnan(values).any()) else "inf"
        add((kind, "sparse", name), lambda: Finding(
            kind, "sparse gradient", name, 0, source="", born_op=None, born_location=None,
            born="not observed: it came through sparse ops, whose values the trace does not read",
            message=f"the sparse gradient of {name} holds {'NaN' if kind == 'nan' else 'Inf'}; the trace cannot "
            "follow sparse ops, so it cannot tell where it was born nor whether strong zeros remove it",
            fix="trace the step with a dense gradient (nn.Embedding(sparse=False)) to see its birth; "
                "gw.grad / gw.strong_zeros() remove contamination that dense ops make before the sparse one"),
            int((~torch.isfinite(values)).sum()), [name], [])

    def _unused(self, removed=frozenset(), found=()) -> list[str]:
        """Births no finding explains: their NaN/Inf reached no gradient (``found``: the births findings name; what
        they descend from is used too, as an Adam state's Inf that the parameter update read)."""
        explained: set = set(removed)
        stack = [b for inc in self.store.incidents.values() for b in inc.births] + list(self.output_births) + \
            [b for _, b in self.backward_births.values()] + list(found)
        while stack:
            b = stack.pop()
            if b not in explained:
                explained.add(b)
                stack.extend(b.parents)
        groups: dict = {}
        for b in self.store.births.values():
            if b not in explained and not b.received and b.op not in _NOT_DATA:
                key = (b.op if b.op != "input" else f"input {b.name}", _fmt(b.loc))
                groups[key] = groups.get(key, 0) + b.count
        return [f"{op} at {loc} ({n} value{'s' if n != 1 else ''})" for (op, loc), n in groups.items()]


def _born(birth: _Birth, via: _Birth | None) -> str:
    """The birth in words; when it is an overflow's infinity that a later op turned into NaN, that op too."""
    text = birth.describe()
    if via is not None and via is not birth:
        text += f"; then {via.op} at {_fmt(via.loc)} made NaN of it: {via.what}"
    return text


def overflow_root(b: _Birth | None) -> _Birth | None:
    """A NaN an op made from infinities alone, all born of an overflow (inf / inf in a naive softmax after exp
    overflowed, inf - inf) is explained by where the overflow happened, not by the op that met it. An infinity
    written on purpose (a -inf mask) is no root: the op that made NaN of it is (a fully masked softmax row)."""
    while b is not None and b.nan and b.parents and b.op not in _NOT_DATA and b.op != "input" \
            and all(not p.nan and p.op in _OVERFLOW_NAMES for p in b.parents):
        b = min(b.parents, key=_order)
    return b


def _line_order(location: str) -> tuple[str, int, str]:
    """A location's sort key: file, then line as a number ("f.py:9" before "f.py:10")."""
    file, _, line = location.rpartition(":")
    return (file, int(line), location) if line.isdigit() else (location, 0, location)
