"""Root cause first: the trace's findings grouped by the earliest NaN/Inf birth they descend from.

One bug in a training loop makes several findings: the contamination of the step where it happened, then (once
an optimizer step has written the NaN gradient into the parameters) a genuine NaN on every later step. Each
finding is tied to the birth that explains it; following births' parents (a gradient used as a value points to
the births of the backward that made it) leads to a root. Findings that share a root form one cause, told in
one line with the step of its first occurrence; findings reached only through an inherited gradient are marked
``downstream`` (they go away when the root cause is fixed) and are not counted as problems of their own.

May import: gradwise._trace._report, gradwise._trace._store.
"""
from __future__ import annotations

from gradwise._trace._report import Finding
from gradwise._trace._store import Birth, describe_arrivals, root


def _inherited(birth: Birth) -> bool:
    """Born of a non-finite gradient used as a value (the optimizer's write), or of what such a birth led to
    (Adam's inf / inf from an Inf gradient): it follows from an earlier finding."""
    seen, stack = set(), [birth]
    while stack:
        b = stack.pop()
        if b.op == "gradient":
            return True
        if id(b) not in seen:
            seen.add(id(b))
            stack.extend(b.parents)
    return False


def _use(loc, step: int, fmt, param_writes, value_writes) -> str:
    """What the line at ``loc`` did with a non-finite gradient it read as a value."""
    if loc in param_writes:
        return f"{fmt(loc)} wrote the non-finite gradient into the parameters at step {step}"
    if loc in value_writes:  # clip_grad_norm_: a NaN/Inf total norm scales every gradient by NaN
        return f"{fmt(loc)} read it and wrote NaN/Inf into the other gradients at step {step} (a total norm " \
               "that is not finite, as in gradient clipping, scales every gradient by it)"
    return f"{fmt(loc)} used the non-finite gradient as a value at step {step}"


def group(findings: list[Finding], origin: dict[int, Birth], fmt, last_step: int, param_writes=frozenset(),
          value_writes=frozenset(), also=()) -> list[str]:
    """Mark downstream findings and return one line per root cause (earliest first). ``origin``: id(finding) ->
    the birth that explains it; ``fmt`` formats a location; ``last_step``: the last step traced;
    ``param_writes`` / ``value_writes``: the lines whose in-place ops made parameters / other tensors
    non-finite (what a line that used a non-finite gradient did with it); ``also``: births of gradients used as
    values that no finding names, told among their root's downstream lines."""
    extra: dict[int, list[Birth]] = {}
    for b in also:
        extra.setdefault(id(root(b)), []).append(b)
    by_root: dict[int, tuple[Birth, list[int]]] = {}
    for i, f in enumerate(findings, 1):
        b = origin.get(id(f))
        if b is None:
            continue
        r = root(b)
        by_root.setdefault(id(r), (r, []))[1].append(i)
        if _inherited(b) and r is not b:
            f.downstream = True
    lines = []
    for r, numbers in sorted(by_root.values(), key=lambda e: e[0].order):
        own = [n for n in numbers if not findings[n - 1].downstream]
        down = [n for n in numbers if findings[n - 1].downstream]
        # (a step gw.watch() explained from its backward, folded into the later traced steps' finding, came first)
        first = min([r.step, *(findings[n - 1].step for n in own if findings[n - 1].step is not None)])
        parts = [f"root cause at step {first}: {r.describe()}"]
        for n in own:
            f = findings[n - 1]
            when = f" at step {f.step}" if f.step is not None and f.step != first else ""
            if f.kind == "contamination":
                where = f" by {f.discarded_op} at {f.discarded_location}" if f.discarded_op else ""
                parts.append(f"discarded{where}, it reached the gradients{when} as contamination (finding {n})")
            elif f.born_op == "backward":  # gw.watch() could not replay that step: not classified
                parts.append(f"not explained (finding {n})")
            else:
                parts.append(f"the output uses it{when}: genuine {'NaN' if f.kind == 'nan' else 'Inf'} (finding {n})")
        if down:
            inherited = [origin[id(findings[n - 1])] for n in down] + extra.get(id(r), [])
            first = min(inherited, key=lambda b: b.step)
            later = max(b.last for b in inherited) - first.step
            lines_used: dict = {}  # each line that used it, at its first step (in order)
            for b in sorted(inherited, key=lambda b: (b.step, b.order)):
                lines_used.setdefault(b.loc, b.step)
            uses = [_use(loc, step, fmt, param_writes, value_writes) for loc, step in lines_used.items()]
            parts.append(f"downstream: {', then '.join(uses)}"
                         + (f", and {later} later step{'s inherit' if later != 1 else ' inherits'} it"
                            if later > 0 else "")
                         + f" (finding{'s' if len(down) > 1 else ''} {', '.join(map(str, down))}: fixed with the "
                         "root cause)")
        lines.append("; ".join(parts))
    return lines


def removed(strong_reads: dict, incidents, fmt, dropped=frozenset()) -> list[str]:
    """One line per NaN/Inf birth that gw.strong_zeros()' backward read and that no finding names (so strong
    zeros annihilated it there), or whose contamination it annihilated (``dropped``: a birth both used and
    discarded is named by its genuine finding, and removed where discarded): where it was born, which backward
    handled it, and how often."""
    named = {id(b) for inc in incidents for b in inc.births} - {id(b) for b in dropped}
    sites: dict = {}  # site -> ({birth: None}, {(backward op, loc): None})
    for (b, (op, loc)), _ in sorted(strong_reads.items(), key=lambda e: e[0][0].order):
        if id(b) not in named:  # the DataLoader batches of one arrival site (kept apart) are told together
            site = (b.op, b.loc, b.nan, b.name) if b.op == "input" else id(b)
            births, where = sites.setdefault(site, ({}, {}))
            births[b] = None
            where[(op, loc)] = None
    lines = []
    ids = {id(b) for inc in incidents for b in inc.births}  # also named by a finding
    for births, where in sites.values():
        bs = list(births)
        (op, loc), first, last = next(iter(where)), min(b.step for b in bs), max(b.last for b in bs)
        at = f"the backward of {op} at {fmt(loc)}" + (f" (and {len(where) - 1} more backward op(s) read it)"
                                                       if len(where) > 1 else "")
        steps = f" (first at step {first}, last at step {last})" if last != first else f" (step {first})"
        used = " where the output never uses it (where it does, see its finding)" if any(
            id(b) in ids for b in bs) else ""
        lines.append(f"{describe_arrivals(bs)}{steps}: gw.strong_zeros() annihilated it{used} in {at}; nothing to fix")
    return lines
