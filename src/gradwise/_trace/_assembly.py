"""``_Assembly``: the part of the tracer that turns what it recorded into a ``Report`` (findings, causes,
what strong zeros would remove, unused NaN/Inf).

May import: torch, gradwise._masks, gradwise._trace._common, _advice, _facts, _findings, _causes, _kinds,
_replay_sites, _report, _row_parts, _store.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gradwise._masks import all_finite
from gradwise._trace import _causes, _kinds, _replay_sites
from gradwise._trace._advice import kink_fix
from gradwise._trace._common import _dist_rank, _fmt, _grad, _held, _inexact, _nonfinite, _positions, _source
from gradwise._trace._facts import _NOT_DATA, WRITTEN_MASK
from gradwise._trace._findings import (
    Findings,
    _line_order,
    _site,
    contamination,
    genuine,
    infinities_of,
    overflow_root,
    rewrite_of,
    sparse_gradient,
)
from gradwise._trace._report import Finding, Report
from gradwise._trace._row_parts import _MAX_PARTS, MERGED
from gradwise._trace._store import Birth as _Birth
from gradwise._trace._store import _order, describe_arrivals, earliest, root


class _Assembly:
    """The report from what the tracer recorded (a part of _Tracer)."""

    def fill(self, report: Report, since: int = 0) -> None:
        """Fill ``report`` (linear in the records kept); ``since`` (the store's event counter when a nested block
        began) leaves out what was last seen before it."""
        self.flush()
        report.forward_ops, report.backward_ops = self.n_fwd, self.n_bwd
        report.untraced_backwards = sum(1 for serial in self.untraced if serial > since)
        found = Findings()
        unreached, arrived, birthless = self._incident_findings(found, since)
        uses = self._output_findings(found, birthless)
        _name_arrivals(found, arrived)
        _grads_made_nonfinite_after_backward(self, found.by_key, found.add)
        for name, (count, occurrences, serial) in self.store.orphans.items():
            if serial > since:
                found.add(("nan", "unknown", name), lambda name=name: _unobserved(name, followed=False), count,
                          [name], [], occurrences)
        if self.collective_sites or self.receipts:
            self._add_received(found.by_key, since)
        for g in self.kinks.values():
            found.by_key[(g.kind, g.op, g.loc)] = Finding(
                g.kind, g.op, _fmt(g.loc), g.count, fix=kink_fix(g.kind, g.op),
                message=f"{g.count} element(s) at a {'kink' if g.kind == 'kink' else 'singular point'}",
                source=_source(g.loc), indices=g.indices, convention=g.convention, reached_gradient=g.reached,
                reaches=g.reaches,
                occurrences=g.occurrences, step=g.step)
        if self.replayed_graph is not None:  # gw.watch()'s replayed step, at the lines a later traced step told
            _replay_sites.fold(found, self.replayed_graph)
        self._finish(report, found, unreached, uses)

    def _incident_findings(self, found: Findings, since: int) -> tuple[dict, dict, set]:
        """A finding per what the incidents (NaN/Inf met in the backward) tell: contamination by where it was met
        and born, a genuine NaN/Inf by its birth. Returns what reached no gradient ((op, line) -> elements), the
        data that arrived non-finite (finding key -> its input births, in order) and the findings without a birth."""
        birthless: set = set()
        unreached: dict[tuple, int] = {}  # contamination no gradient received: (op, line) -> elements
        arrived: dict[tuple, dict] = {}  # a finding of data that arrived non-finite -> its input births (in order)
        aligned = _used_elements(self.store.incidents.values(), since)
        counted: dict[tuple, set] = {}  # a genuine finding's key -> the births (ids) whose elements it counts
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
            via = earliest(inc.births, inc.kind)
            birth = overflow_root(via)
            stand_in = self.backward_births.get(id(inc), (None, None))[1]  # born in the backward, used later
            if inc.kind == "contamination":
                # (and by the rewrite of the op that discarded it: a slice's rows and a masked_fill's column are two
                # fixes, each "unused since" its op)
                key = ("contamination", inc.op, inc.loc, birth.op if birth else None, birth.loc if birth else None,
                       rewrite_of(inc))
                found.add(key, lambda inc=inc, birth=birth, via=via: contamination(inc, birth, via), inc.count,
                          inc.reaches, inc.indices, inc.occurrences, inc.step, birth or stand_in)
                if birth is not None and birth.op == "input":
                    arrived.setdefault(key, {})[birth] = None
            elif birth is not None:  # named by where it was born
                for via, birth in _named(inc, via, birth):  # noqa: B020 (each birth it names, the first these)
                    key = _site(inc.kind, birth)
                    # each birth counted once (the DataLoader batches arriving at one line are births of their own, so
                    # are a NaN and an Inf one line writes: the Inf's 0 x inf was counted 0 beside the NaN)
                    seen = counted.setdefault(key, set())
                    new = birth not in arrived.get(key, ()) if birth.op == "input" else id(birth) not in seen
                    seen.add(id(birth))
                    if birth.op == "input":  # every input that arrived non-finite at that line, named below
                        arrived.setdefault(key, {}).update(
                            (b, None) for b in sorted(inc.births, key=_order) if b.op == "input" and b.loc == birth.loc)
                    # its elements: the born tensor's, but where every backward op that used it lines up with it
                    # (sqrt's own backward): there only those a nonzero sensitivity met, as strong zeros leave them
                    # (the born elements a slice further on drops are the contamination finding's)
                    used = aligned.get(id(birth))
                    count, indices = (birth.count, birth.indices) if used is None else used
                    if birth.formula and 0 < inc.reached_elements < count:  # (as one born in the backward, below)
                        count, indices = inc.reached_elements, inc.reached_indices
                    found.add(key, lambda inc=inc, birth=birth, via=via: genuine(inc.kind, inc, birth, via),
                              count if new else 0, inc.reaches, indices, birth.occurrences if new else 0,
                              # where it reached a gradient (the cause names where it was born); a gradient used as a
                              # value from where the line used it (the cause's 'wrote it at step 150', not the next
                              # backward's 151)
                              min(inc.step, birth.step) if birth.op == "gradient" else inc.step, birth)
            else:
                key = (inc.kind, inc.node_op, inc.loc)
                # born in the backward: its elements that reached a gradient (pad's backward crops the border)
                cropped = 0 < inc.reached_elements < inc.count
                count, indices = (inc.reached_elements, inc.reached_indices) if cropped else (inc.count, inc.indices)
                found.add(key, lambda inc=inc: genuine(inc.kind, inc, None), count, inc.reaches, indices,
                          inc.occurrences, inc.step, stand_in)
                birthless.add(key)
        return unreached, arrived, birthless

    def _output_findings(self, found: Findings, birthless: set) -> list[_Birth]:
        """A finding per NaN/Inf the outputs were born with that no incident explains yet; returns the births of
        gradients used as values whose story a cause already tells (their lines are part of its downstream)."""
        # the roots of downstream findings: an output that inherited a NaN gradient written at another line of the
        # same story (clip_grad_norm_ then the optimizer) is told in that cause, not as a finding reaching no gradient
        told = {id(root(b)) for b in found.origin.values() if b.op == "gradient"}
        uses: list[_Birth] = []
        findings, origin = found.by_key, found.origin
        pairs = _by_infinities([(via, overflow_root(via)) for via in sorted(self.output_births, key=lambda b: b.order)])
        for via, birth in pairs:
            kind = "nan" if via.nan else "inf"
            key = _site(kind, birth)
            if key not in findings and birth.op == "gradient" and id(root(birth)) in told:
                uses.append(birth)
                continue
            if key in birthless:  # the output itself is NaN/Inf from the forward: that is the explanation
                old = findings[key]
                findings[key] = genuine(kind, None, birth, via)
                findings[key].count, findings[key].indices = birth.count, birth.indices
                findings[key].occurrences, findings[key].reaches = old.occurrences, old.reaches
                findings[key].step, origin[key] = old.step, birth
            elif key not in findings:
                found.add(key, lambda birth=birth, kind=kind, via=via: genuine(kind, None, birth, via), birth.count,
                          [], birth.indices, birth.occurrences, birth.step, birth)
        return uses

    def _finish(self, report: Report, found: Findings, unreached: dict, uses: list) -> None:
        """The findings in report order, grouped into causes; what was passed over, removed and never used."""
        findings, origin = found.by_key, found.origin
        order = {k: i for i, k in enumerate(("contamination", "nan", "inf", "singular", "kink"))}
        report.findings = sorted(findings.values(), key=lambda f: (order[f.kind], *_line_order(f.location)))
        report.causes = _causes.group(report.findings, {id(f): origin[k] for k, f in findings.items()
                                                              if k in origin}, _fmt, self.store.step,
                                     self.param_writes, self.value_writes, uses)
        report.notes = [_merged_note(n) if kind == MERGED else
                        f"{kind} tensors: {n} op(s) or value(s) passed over" + (f" (first: {op})" if op else "")
                        if not kind.startswith("not explained") else f"{op or 'a value'}: {kind} ({n}x)"
                        for kind, (n, op) in self.passed.items()]
        report.removed = _causes.removed(self.strong_reads, self.store.incidents.values(), _fmt,
                                         self.strong_removed) + [
            f"NaN/Inf that the backward of {op} at {_fmt(loc)} made from finite values (an infinite derivative, 0/0)"
            f"{'' if n == 1 else f' ({n}x)'}: gw.strong_zeros() annihilated it where a structural zero met it; "
            "nothing to fix" for (op, loc), n in self.strong_made.items()]
        report.unused = self._unused(removed={b for b, _ in self.strong_reads}, found=origin.values(),
                                     notes=report.notes) + [
            f"{op} at {loc} in the backward ({n} value{'s' if n != 1 else ''})" for (op, loc), n in unreached.items()]
        rank = _dist_rank()
        for f in report.findings:
            f.rank = rank

    def _unused(self, removed=frozenset(), found=(), notes=None) -> list[str]:
        """Births no finding explains: their NaN/Inf reached no gradient (``found``: the births findings name; what
        they descend from is used too, as an Adam state's Inf that the parameter update read). Those made before
        DataLoader worker processes started, when a batch of theirs arrived non-finite, are not known to be
        unused (the workers' copies are not followed): a line in ``notes`` names them instead."""
        explained: set = set(removed)
        stack = [b for inc in self.store.incidents.values() for b in inc.births] + list(self.output_births) + \
            [b for _, b in self.backward_births.values()] + list(found)
        while stack:
            b = stack.pop()
            if b not in explained:
                explained.add(b)
                stack.extend(b.parents)
        cut = self.worker_cut if any(b.op == "input" and (b.batches or b.batch is not None) and not b.received
                                     for b in explained) else 0
        groups: dict = {}
        unknown: dict = {}
        for b in self.store.births.values():
            if b not in explained and not b.received and b.op not in _NOT_DATA:
                key = (b.op if b.op != "input" else f"input {b.name}", _fmt(b.loc))
                into = unknown if b.order <= cut else groups
                into[key] = into.get(key, 0) + b.count
        if unknown and notes is not None:
            notes.append("DataLoader worker processes sent batches that arrived with NaN/Inf, made in processes the "
                         "trace does not follow; these NaN/Inf, made before the workers started, may be where they "
                         "came from, so they are not listed as unused: " + _values(unknown))
        return [_values({key: n}) for key, n in groups.items()]


def _merged_note(n: int) -> str:
    """The note of tensors whose NaN/Inf came from more births than the trace tells apart (``_RowParts._merged``)."""
    return (f"{MERGED}: a tensor held NaN/Inf of more than {_MAX_PARTS} births ({n}x); the births of its smallest "
            "parts are named together wherever one of them is, so a finding may name a birth the output does not "
            "use (never one less): check it with that write alone under gw.strong_zeros()")


def _values(groups: dict) -> str:
    return "; ".join(f"{op} at {loc} ({n} value{'s' if n != 1 else ''})" for (op, loc), n in groups.items())


def _name_arrivals(found: Findings, arrived: dict) -> None:
    """A finding of data that arrived non-finite names every batch that brought it, and the other inputs that did."""
    for key, births in arrived.items():
        f, first = found.by_key.get(key), found.origin.get(key)
        if f is None or not f.born or first is None:
            continue
        # (not the other half of one arrival holding NaN and Inf: a birth of its own, `_input_births`)
        same = [first] + [b for b in births if b is not first and b.name == first.name and
                          (b.nan == first.nan or b.batch != first.batch or b.step != first.step)]
        if len(same) > 1:  # the batches that brought it, told as one
            f.born = f.born.replace(first.describe(), describe_arrivals(same), 1)
        also = sorted({b.name for b in births if b.name} - {first.name})
        if also:
            f.born += f"; so did {', '.join(also)}"


def _grads_made_nonfinite_after_backward(tr: _Assembly, findings: dict, add: Callable) -> None:
    """A parameter's .grad that is not finite at the end of the block although no backward finding reaches
    it: something after the backward wrote NaN/Inf into it (clip_grad_norm_ with a NaN total norm scales
    every gradient by NaN). Reported with the op that did it, from the gradient's provenance."""
    reached = {r for f in findings.values() for r in f.reaches}
    grads = []
    for leaf, name in tr.names.items():
        g = _grad(leaf)
        if name not in reached and isinstance(g, torch.Tensor) and _inexact(g) and _kinds.readable(g):
            grads.append((g, name))
        elif name not in reached and isinstance(g, torch.Tensor) and g.layout is torch.sparse_coo and _inexact(g):
            sparse_gradient(g, name, add)
    if all_finite([_held(g) for g, _ in grads]):  # the usual end of a step: no per-gradient test
        return
    # one finding per op and line (and kind): clip_grad_norm_'s one _foreach_mul_ writes into every gradient
    written: dict[tuple, list] = {}
    for g, name in grads:
        if not _nonfinite(g):
            continue
        births = [b for b in tr.prov.get(g, ()) if isinstance(b, _Birth)]
        if births and all(b.received for b in births):
            continue  # a collective's write (DDP copying the averaged bucket back): _add_received says so
        if not births or g not in tr.written:
            # no finding reaches it (nor one of an enclosing block), and no backward ran unread: never silent
            if not tr.untraced and not any(name in inc.reaches for inc in tr.store.incidents.values()):
                count, idx = _positions(~torch.isfinite(g))
                b = min(births, key=_order) if births else None  # (a .grad assigned: its value's birth)
                add(("nan", "unknown", name) if b is None else ("nan", b.op, b.loc, "grad"),
                    lambda name=name, b=b: _unobserved(name, b), count, [name], idx,
                    **({} if b is None else {"step": b.step, "birth": b}))
            continue
        kind = "nan" if bool(torch.isnan(g).any()) else "inf"
        written.setdefault((kind, *tr.written[g]), []).append((g, name, min(births, key=_order)))
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
                occurrences=int(n == 0), step=b.step, birth=b)


def _unobserved(name: str, birth: _Birth | None = None, followed: bool = True) -> Finding:
    """A non-finite gradient no finding explains, at the end of the block: with the birth of its NaN/Inf where the
    trace knows one (a .grad assigned or written after backward, by no backward op), else not observed
    (``followed``: every backward in the block was read, so the trace lost its way; else made outside it)."""
    if birth is not None:
        return Finding("nan", birth.op, _fmt(birth.loc), 0, source=_source(birth.loc), born_op=birth.op,
                       born_location=_fmt(birth.loc), born=birth.describe(),
                       message=f"the gradient of {name} is not finite, and no backward made it so: it holds "
                       f"{birth.describe()}, put into it after (or apart from) the backward",
                       fix="find the assignment or in-place write into .grad at that line (p.grad = ..., "
                           "p.grad[...] = ...) and make its value finite, or zero the gradients after it")
    why = ("no finding reaches it: the trace did not follow how it became so (a gap in gradwise: please report "
           "the program)") if followed else "its birth was not observed (made outside the traced block?)"
    return Finding("nan", "unknown", "<unknown>", 0, message=f"the gradient of {name} is not finite; {why}")


def _used_elements(incidents, since: int) -> dict[int, tuple[int, list]]:
    """Per birth (by id) whose genuine incidents all lie in tensors shaped as the born one (the backward of the op
    that made it, elementwise: sqrt's div), the elements the output used: the most any of them met, per
    occurrence of the birth (h * h meets h's NaN twice, in the same element), with its indices. A birth also met
    elsewhere (a matmul's weight gradient) keeps the born tensor's count, in its own coordinates."""
    best: dict[int, tuple[int, list]] = {}
    mixed: set[int] = set()
    # per birth: the elements met in the backward of the op that made it (its own node: the whole sensitivity of
    # every use of it arrives there), genuine and contamination; where they are all of its elements, the genuine
    # ones are those used, whatever mixes them further down (lin(where(m, sqrt(-1), 0)): not the masked rows)
    own: dict[int, list] = {}
    sensed: dict[int, _Birth] = {}
    for inc in incidents:
        if inc.serial <= since or not inc.births:
            continue
        birth = overflow_root(earliest(inc.births, inc.kind))
        if birth.sensed is not None and inc.kind != "contamination":
            sensed[id(birth)] = birth
        if inc.node_op == birth.op and inc.loc == birth.loc and inc.shape == birth.shape:
            own.setdefault(id(birth), [0, 0, birth])[inc.kind == "contamination"] += inc.count
        if inc.kind == "contamination":
            continue
        if birth.op in ("gradient", "backward", "seed") or inc.shape is None or inc.shape != birth.shape:
            mixed.add(id(birth))
        else:  # as often a step as the birth (an incident met twice a step, as in h * h, is interned once); over
            # the steps the incident occurred in only (a step whose NaN the output did not use counts none)
            per_step = (birth.occurrences / birth.in_steps) / (inc.occurrences / inc.in_steps)
            n = min(birth.count, round(inc.count * per_step))
            if n > best.get(id(birth), (0, []))[0]:
                best[id(birth)] = (n, inc.indices)
    whole = {k for k, (genuine, contaminated, birth) in own.items() if genuine + contaminated >= birth.count}
    used = {k: v for k, v in best.items() if k not in mixed or k in whole}
    # elsewhere, the elements the sensitivity reached at the node that made it (a GRU mixing a packed sequence: not
    # the padded step pack_padded_sequence never read)
    for birth in sensed.values():
        if id(birth) not in used and birth.sensed:
            used[id(birth)] = (min(birth.count, birth.sensed), birth.sensed_indices)
    return used


def _named(inc, via: _Birth, birth: _Birth) -> list:
    """The (via, root) births a genuine incident names: its explaining birth's, and every other birth of its kind
    it met, and of a NaN incident an infinity's too (inf - inf in attention scores): two used NaN writes in one
    row, carried together by a NaN sensitivity after a row sum, each alone leaving the gradient NaN, named the
    later one "reaching no gradient". Only the first where a gradient from an earlier backward explains them all,
    or where the births are a saved value's whole provenance, its parts lost (``Incident.vague``: a NaN that
    ``x.copy_(x.flip(0))`` moved into a row the output drops was a genuine finding reaching every parameter), and
    never a mask's -inf (``earliest``'s rules)."""
    named = [(via, birth)]
    if via is None or via.op == "gradient" or inc.vague:
        return named
    for b in sorted(inc.births, key=_order):
        if b is not via and (b.nan == via.nan or inc.kind == "nan") and b.op not in ("gradient", "input") and \
                (b.nan or b.parents or b.what != WRITTEN_MASK):
            named.append((b, overflow_root(b)))
    return _by_infinities(named)


def _by_infinities(named: list) -> list:
    """``named`` (via, root) pairs with a NaN root made of used infinities (``infinities_of``: inf - inf of a
    written +inf and -inf) replaced by each of those, the NaN their via (each once); kept too where an
    occurrence of it was made of none (``own``)."""
    got, seen = [], set()
    for v, r in named:
        infinities = infinities_of(r) if r is not None else []
        got.extend((r, p) for p in infinities if id(p) not in seen)
        seen.update(map(id, infinities))
        if not infinities or r.own:
            got.append((v, r))
    return got
