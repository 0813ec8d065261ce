"""The lines of the step gw.watch() explained from its backward, learnt from a later traced step of the same graph.

The replay names each op from its autograd node and places it at the backward call (the untraced forward's lines
are not known), so the bug of a loop over steps (``x / n`` with n = 0) was two findings and two root causes: the
replayed step's at the backward call, the traced steps' at the real line. A fold by kind and op alone merged two
sites of one op (sqrt at one line, then at another: review_wc32). Here the sites are matched by position: the
first traced backward (of a few) whose graph has the replayed one's shape (`_planning._walked`: node types, edges
and the facts the walk reads, select/slice positions included) is the same graph up to the node objects, so the
node at each position is the same site; where every replayed node of an op sits at one traced line, that op's
findings of the replayed step are that line's (a graph made of the same ops by other lines cannot be told apart:
the one case folded wrongly; any other difference, a graph of another shape, leaves two findings as before).
Nothing here runs on a finite step: the replay's walk runs once, the match in traced backwards only.

May import: gradwise._strong_zeros, gradwise._trace._common, _findings.
"""
from __future__ import annotations

from gradwise._strong_zeros._planning import _walked
from gradwise._trace._common import _ACCUMULATE_SEQ, _fmt
from gradwise._trace._findings import Findings

_TRIES = 4  # traced backwards compared with the replayed graph before giving up (a block of other graphs)


class ReplayedGraph:
    """The replayed step's graph: its shape, the op of its node at each position (None: a leaf's), where it was
    replayed (the backward call, the step), and, once matched, its sites (op -> the traced op and line)."""

    __slots__ = ("at", "ops", "shape", "sites", "step", "tries")

    def __init__(self, roots, outs: tuple, tracer, at: tuple, step: int) -> None:
        walk = _walked(roots)
        self.shape = walk.shape
        self.ops = [nd.op if (nd := tracer.nodes.get(n._sequence_nr())) is not None else None for n in walk.nodes]
        # (a value whose birth the replay could not name, "x arrived" or "aten.mean or an op before it", is not
        # named by the birth the trace gives the same value later: that tells the later step's birth, not this one's.
        # x arriving NaN before the block then written NaN at a line from step 1, or log at one line NaN at step 0
        # and log at another at step 1, were folded into the later birth: one root cause, a wrong one at step 0;
        # review_wc33)
        self.at, self.step, self.tries = at, step, 0
        self.sites: dict[str, tuple] | None = None


def match(tracer, roots, outs: tuple) -> None:
    """At a traced backward after the replay: where its graph is the replayed one's, each replayed op whose nodes
    all sit at one traced line (and name the same op there) gets that line (``sites``)."""
    graph = tracer.replayed_graph
    graph.tries += 1
    if graph.tries > _TRIES:
        tracer.replayed_graph = None if graph.sites is None else graph
        return
    walk = _walked(roots)
    if walk.shape != graph.shape:
        return
    lines: dict[str, set] = {}
    for was, node in zip(graph.ops, walk.nodes, strict=True):
        seq = node._sequence_nr()
        if seq == _ACCUMULATE_SEQ or was is None:
            continue
        now = tracer.nodes.get(seq)
        lines.setdefault(was, set()).add((now.op, now.loc) if now is not None and now.op == was else None)
    graph.sites = {op: next(iter(got)) for op, got in lines.items() if len(got) == 1 and None not in got}
    graph.tries = _TRIES  # (matched: no further walk)


def fold(found: Findings, graph: ReplayedGraph) -> None:
    """Each finding of the replayed step whose sites (where it was met, where it was born) are known lines folds into
    the one later finding at those lines, of its kind: one finding and one root cause, first at the replayed step
    (its counts added), as gw.trace() tells the same steps."""
    if not graph.sites:
        return
    at = _fmt(graph.at)

    def moved(op, loc):
        if loc != at:
            return op, loc
        site = graph.sites.get(op)  # ("aten.sum or an op before it": no site, that may be an op before it)
        return (site[0], _fmt(site[1])) if site is not None else None

    for key, f in list(found.by_key.items()):
        if f.step != graph.step or f.location != at:
            continue
        here, born = moved(f.op, f.location), moved(f.born_op, f.born_location)
        if here is None or born is None:
            continue
        same = [g for g in found.by_key.values() if g is not f and g.kind == f.kind and g.step is not None and
                g.step > graph.step and (g.op, g.location) == here and (g.born_op, g.born_location) == born]
        if len(same) != 1:
            continue
        g = same[0]
        g.count += f.count
        g.occurrences += f.occurrences
        g.reaches = sorted(set(g.reaches) | set(f.reaches))
        g.step = graph.step
        del found.by_key[key]
        found.origin.pop(key, None)
