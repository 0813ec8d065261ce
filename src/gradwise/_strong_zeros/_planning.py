"""The plan before backward: ``_plan`` chooses plain, check or strong from the graph (which nodes can make a
structural zero, ``_zero_reach``) and the finiteness of what those nodes saved (``_all_finite``).

May import: torch, gradwise._masks, _carry, _contract, _hooks, _traced, _autograd_graph, _node_facts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradwise._masks import all_finite as _all_finite
from gradwise._masks import inexact
from gradwise._strong_zeros import _carry, _contract, _hooks
from gradwise._strong_zeros._autograd_graph import _root_nodes
from gradwise._strong_zeros._node_facts import (
    _NODE_TYPES,
    FLAT_ZEROS,
    HIDES_ITS_FORMULA,
    SCALES_BY_ITS_ZEROS,
    UNUSED_OUTPUTS,
    WEIGHTS_END,
    WEIGHTS_READER,
    _node_type,
    _readable,
    covers,
    keep_per_type,
    node_info,
    per_type,
)
from gradwise._strong_zeros._traced import traced


class _Walk(NamedTuple):
    nodes: dict[Any, int]  # node -> its position in walk order, every node of the graph once
    edges: list[tuple]  # per position, the node's edges (next_functions)
    facts: list  # (node, what its type's fact reader read): the nodes whose type alone does not decide
    watched: list  # custom Functions' and compiled backwards' nodes (the strong pass hooks or swaps them)
    shape: tuple  # the graph's structure and the node facts above: equal shapes get the same plan (_Shaped)


class _Graph(NamedTuple):
    nodes: dict[Any, tuple]  # node -> its edges (next_functions), every node of the graph once, in walk order
    makers: dict[Any, bool]  # the nodes that make structural zeros -> whether those reach their outputs
    special: list  # nodes with a fact to check: not known to gradwise, a singular-point or zero-output test
    senders: list  # the makers whose zeros reach their outputs
    consumers: dict[Any, int]  # node -> how many edges lead to it (counted only when a split or a sender needs it)
    slots: dict[Any, list[int]]  # node -> the outputs other than 0 that edges lead to, one entry per edge
    watched: list  # custom Functions' and compiled backwards' nodes (the strong pass hooks or swaps them)
    picks: dict[Any, tuple]  # select/slice nodes -> the positions they read (_SELECTED)
    pending: list  # (node, its number of outputs): makers only if some output has no consumer (UNUSED_OUTPUTS)
    shape: tuple  # see _Walk


def _graph(roots: Sequence[Any]) -> _Graph:
    """Every node of the graph once, its makers and consumers (``_walked``, ``_derived``, then ``_resolved``)."""
    return _resolved(_derived(_walked(roots)))


_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _walked(roots: Sequence[Any]) -> _Walk:
    """Every node of the graph once, in one walk that does as little per node as it can: it runs before every
    backward, and most nodes (matmuls, views, activations, AccumulateGrad) have nothing to check unless a structural
    zero reaches them. What the plan's structure needs beyond types and edges (makers, picks, splits: ``_derived``)
    is worked out only for a shape not planned before.

    The walk writes down the graph's ``shape``: per node popped, its type (a new node: then, where the type alone
    does not decide where zeros start and spread, what its fact reader read, ``_node_facts._fact_reader``; and the
    output slot of each edge it pushes) or its index among the nodes met so far (a node met again). The stack replays
    from that sequence alone, so two graphs with equal shapes are the same graph up to the node objects, with the
    same facts: ``_Shaped`` is a function of the shape, never of values (those are read per backward). An mm/bmm's
    fact (WEIGHTS_READER) is read at the end, and only where the graph holds a node that may end a weights path
    (WEIGHTS_END); elsewhere it is the one its reader would give without a read."""
    nodes: dict[Any, int] = {}
    edges_of: list[tuple] = []
    facts: list = []
    watched: list = []
    shape: list = [len(roots)]
    add = shape.append
    later: list = []  # (mm/bmm/addmm/baddbmm node, its fact's place in shape, its type's info): WEIGHTS_READER
    ends = False  # whether a node that may end a weights path is in the graph (WEIGHTS_END)
    types = _NODE_TYPES
    stack = list(roots)
    pop, push = stack.pop, stack.append
    while stack:
        node = pop()
        i = nodes.get(node)
        if i is not None:
            add(i)
            continue
        cls = node.__class__
        nodes[node] = len(edges_of)
        add(cls)
        if cls is _ACCUMULATE_GRAD:  # a leaf's: no edges and nothing to check (next_functions would be one more call)
            edges_of.append(())
            continue
        info = types.get(cls) or _node_type(node)
        edges = node.next_functions
        edges_of.append(edges)
        if not info[8]:
            if info[11] is WEIGHTS_READER:  # an mm-like node: its fact once the walk knows if a softmax may feed it
                later.append((node, len(shape), info))
                add(None)
            else:
                if info[11] is WEIGHTS_END:
                    ends = True
                if info[10] is not None:
                    fact = info[10](node)
                    facts.append((node, fact))
                    add(fact)  # (a tuple: never taken for a type or an index)
            if info[9]:
                watched.append(node)
        for n, slot in edges:
            if n is not None:
                push(n)
                add(~slot)  # negative: never taken for an index
    for node, at, info in later:
        # Sound without a WEIGHTS_END node: _no_masked_weights follows the mm/bmm's producers (its edges, theirs, ...:
        # nodes of this graph, each popped above; AccumulateGrad, never an end, unread) to a node whose name() is in
        # WEIGHTS_ENDS, finds none, and answers True (makes no zeros) before reading any value: the reader's fact is
        # then the rest of its test's (info[12]: mm/bmm's (False, False), addmm/baddbmm's of alpha and beta;
        # test_perf_sz35, test_review_perf_sz35 hold the walk's facts equal to each node's reader). That walk of
        # the producers cost ~12 us an mm cold after a forward (name() and next_functions per hop): ~45 us of the
        # SDPA block's plan; ~3 us each Linear's addmm warm.
        fact = info[10](node) if ends else info[12](node)
        facts.append((node, fact))
        shape[at] = fact
    return _Walk(nodes, edges_of, facts, watched, tuple(shape))


def _derived(w: _Walk) -> _Graph:
    """The graph of ``w`` with what the structural part of its plan needs: the nodes that make structural zeros
    (and whether those leave them), the select/slice picks, the splits to resolve, the nodes with a fact to check.
    Read from the node types and the facts the walk read, never from the nodes again."""
    types = _NODE_TYPES
    facts = dict(w.facts)
    makers: dict[Any, bool] = {}
    special: list = []
    pending: list = []  # nodes that make zeros only for outputs nothing uses
    picks: dict[Any, tuple] = {}
    for node in w.nodes:
        info = types.get(type(node)) or _node_type(node)
        if info[8]:
            continue
        makes, inside = info[4], False
        if info[10] is not None:
            fact = facts[node]
            if info[7] is not None:  # a select/slice: it makes zeros unless it reads every position (the test
                # _MAKES_NO_ZEROS_IF holds for it, from the same pick)
                if info[6] is not None:
                    fact, inside = fact
                picks[node] = fact
                makes = not covers([fact])
            elif makes is UNUSED_OUTPUTS:
                fact, inside = fact
                pending.append((node, fact))
                makes = True
            else:
                makes, inside = fact
        if makes:
            makers[node] = not inside
        if not info[2] or info[3] is not None or info[5] is not None:
            special.append(node)
    nodes = dict(zip(w.nodes, w.edges, strict=True))
    return _Graph(nodes, makers, special, [], {}, {}, w.watched, picks, pending, w.shape)


def _resolved(w: _Graph) -> _Graph:
    """``w`` (``_walked``) with its consumers counted where needed, a split or unbind whose every output has a
    consumer taken off the makers (UNUSED_OUTPUTS: it makes no zeros), and its senders."""
    nodes, makers = w.nodes, dict(w.makers)
    consumers: dict[Any, int] = {}
    slots: dict[Any, list[int]] = {}
    if w.pending or any(makers.values()):
        consumers, slots = _consumers(nodes)
    for node, outputs in w.pending:
        others = slots.get(node, ())
        used = set(others)
        if consumers.get(node, 0) > len(others):
            used.add(0)
        if len(used) == outputs:  # (a root's seeded outputs are not edges: it stays a maker)
            del makers[node]
    return w._replace(makers=makers, senders=[n for n, sends in makers.items() if sends], consumers=consumers,
                      slots=slots)


def _consumers(nodes: dict[Any, tuple]) -> tuple[dict[Any, int], dict[Any, list[int]]]:
    """How many edges lead to each node; and, per node, the outputs other than 0 they lead to (one per edge)."""
    consumers: dict[Any, int] = {}
    slots: dict[Any, list[int]] = {}
    for edges in nodes.values():
        for n, slot in edges:
            if n is not None:
                consumers[n] = consumers.get(n, 0) + 1
                if slot:
                    slots.setdefault(n, []).append(slot)
    return consumers, slots


def _zero_reach(roots: Sequence[Any], g: _Graph) -> set:
    """The nodes a structural zero reaches from above (those that make their own are ``g.makers``). The
    engine adds the contributions of all consumers of a node's output, and a sum is a structural zero only where
    every term is one, so zeros arrive at an output only when *every* consumer of it sends them (a transformer's
    residual connection sends none: below it nothing is reached), and not when the consumers are selects/slices
    that between them read every position and receive no zeros from above (``covers``). A root's sensitivity
    is its seed, a value.

    Zeros spread from the nodes that send their own, so the cost follows the region they reach, not the graph:
    an output is decided when its last consumer sends, and decided again if a select among them is later
    reached from above (its pick no longer stands for all of its zeros). Reach only grows: no order is needed."""
    if not g.senders:
        return set()
    nodes, consumers, slots = g.nodes, g.consumers, g.slots
    is_root = set(roots)
    above: set = set()  # reached from above
    sending = set(g.senders)
    count: dict[Any, int] = {}  # node (its output 0) or (node, slot) -> how many of its consumers send zeros
    picks: dict[Any, list] = {}  # the same keys -> (consumer, what it selects or None)
    fed: dict[Any, list] = {}  # consumer -> the keys it sends to (re-decided when it is reached from above)

    queue = list(g.senders)  # nodes whose zeros are still to spread to their edges
    ready: list = []  # outputs (keys) every consumer of which sends zeros: to decide
    # (no nested functions: one referring to itself would be a reference cycle holding the graph past backward)
    while queue or ready:
        if ready:
            key = ready.pop()
            n = key[0] if key.__class__ is tuple else key
            if n in above or n in is_root:
                continue
            got = [pick for consumer, pick in picks[key] if pick is not None and consumer not in above]
            if len(got) == len(picks[key]) and covers(got):
                continue
            above.add(n)
            if n not in sending:
                sending.add(n)
                queue.append(n)
            elif node_info(n)[7] is not None:  # its zeros spread already, but its picks no longer stand for them
                ready.extend(k for k in fed.get(n, ()) if count[k] == _consumers_of(k, consumers, slots))
            continue
        node = queue.pop()
        select = node_info(node)[7]
        pick = g.picks[node] if select is not None and node not in above else None
        keys = fed[node] = []
        for n, slot in nodes[node]:
            if n is None:
                continue
            key = (n, slot) if slot else n
            keys.append(key)
            picks.setdefault(key, []).append((node, pick))
            c = count[key] = count.get(key, 0) + 1
            if c == _consumers_of(key, consumers, slots):
                ready.append(key)
    return above


def _consumers_of(key: Any, consumers: dict[Any, int], slots: dict[Any, list[int]]) -> int:
    """How many edges lead to this output of a node: ``node`` (output 0) or ``(node, slot)``."""
    if key.__class__ is tuple:
        return slots[key[0]].count(key[1])
    return consumers[key] - len(slots.get(key, ()))


_COMPILED_ONLY = frozenset(("CompiledFunctionBackward", "AccumulateGrad"))


def _plan(t_outputs: Sequence[Any], seeds: Sequence[Any], watched: list | None = None, everyday: bool = False,
          results: list | None = None) -> str:
    """'plain' (PyTorch is already right), 'strong' (a NaN/Inf or a singular point is in the graph where a
    structural zero can reach it), 'check' (the graph has nodes gradwise knows nothing about: one pass under
    the mode, as 'strong'), or 'compiled' (as 'check', where the only such nodes are torch.compile'd backwards:
    each then runs compiled, and op by op only where that made NaN; ``_compile._hybrid``). Raises
    _contract.Unreadable on a saved tensor it cannot read (the backward runs plain).

    This runs before every backward under strong zeros, so it is written for speed: one walk over the graph, a
    pass over the region structural zeros spread to (_zero_reach), reading only what a structural zero could reach
    (see MAKES_NO_ZEROS; a node reached through some consumers but not all receives none), each saved tensor once,
    and one reduction per saved tensor (small ones together). The singular tests run only when those are finite
    (a NaN/Inf there chooses 'strong' already); those of nodes no zero reaches from above only when a softmax/exp
    node below holds exact zeros in its output (_ZERO_OUTPUT_TESTS). ``watched`` receives the graph's custom
    Function and compiled nodes (``_graph``), so that the strong pass need not walk the graph again for them.
    ``everyday``: the caller found every tensor a plain dense one, with no transform or compile under way
    (``_engine._everyday``): nothing is traced, and ``traced`` need not ask. ``results``: a backward nested in a
    'check' pass (``_engine._nested``) passes ``[its inputs]`` (empty: the leaves it accumulates into); where the
    plan is 'plain', how structural zeros reach them is appended (``_results_reach``)."""
    # a traced backward (torch.compile, make_fx): a graph, no data to read; compiled graphs get strong zeros from
    # gradwise._strong_zeros._compile instead
    if not everyday and traced((*t_outputs, *seeds)):
        return "plain"
    roots = [r for r in _root_nodes(t_outputs) if r is not None]
    w = _walked(roots)
    if watched is not None:
        watched.extend(w.watched)
    if _carry.CARRIED and _carry.reaches(w.nodes):  # the gradient of a create_graph pass that annihilated
        return "strong"
    if _carry.CARRIED_VALUES and _carry.values_reached(w.nodes):  # ... or that saved its structural zeros
        return "strong"
    if _hooks.HOOKED and _hooks.hooked(w.nodes):
        return "check"  # a tensor hook of the user's: its torch ops are followed by the rules (see _hooks)
    shaped = _SHAPED.get(w.shape)
    if shaped is None or (results is not None and shaped.results is None):  # (see _Shaped.results)
        shaped = _shaped(roots, _resolved(_derived(w)), results is not None)
        _keep(w.shape, shaped)
    if shaped.compiled_only:  # a whole step compiled: nothing outside its graphs to read, and zeros made inside
        return "compiled"  # them are the pass's (one check per node's result)
    order = list(w.nodes)
    known_all, only_compiled = shaped.known_all, shaped.only_compiled
    saved: list[torch.Tensor] = []
    seen: dict[int, list[torch.Tensor]] = {}
    singular_tests: list = []
    for i, read, singular, hides in shaped.reads:
        node = order[i]
        readable = _read_saved(node, read, seen, saved) and not hides
        known_all &= readable
        only_compiled &= readable
        if singular is not None and readable:
            singular_tests.append((node, singular))
    if saved and seeds:  # a seed's NaN/Inf matters only where a structural zero can meet it
        saved.extend(t for t in seeds if isinstance(t, torch.Tensor) and inexact(t))
    if not _all_finite(saved):
        return "strong"
    if singular_tests and any(singular(node) for node, singular in singular_tests):
        return "strong"
    # a softmax/exp output of exactly 0 is a structural zero of its own: an infinite derivative (sqrt of a masked
    # softmax, its entropy) meets it inside that node's backward. The singular tests (on small tensors, usually)
    # go first; the outputs are read only when one of them holds.
    if shaped.deferred and shaped.zero_outputs and \
            any(_readable(n) and test(n) for n, test in ((order[i], t) for i, t in shaped.deferred)) and \
            any(_readable(n) and test(n) for n, test in ((order[i], t) for i, t in shaped.zero_outputs)):
        return "strong"
    if shaped.scaling and not _sensitivity_finite([order[i] for i in shaped.above_scaling], seeds, seen):
        return "strong"
    if known_all and results is not None:
        results.append(_results_reach(shaped, w.nodes, order, results[0]))
    return "plain" if known_all else "compiled" if only_compiled else "check"


_PARAMETER = torch.nn.Parameter  # (issubclass: its metaclass's isinstance test costs ~0.5 us a leaf)


def _results_reach(shaped: _Shaped, at: dict[Any, int], order: list, inputs: Sequence[Any]) -> int:
    """How structural zeros of a backward reach its results: the gradients of ``inputs``, else of the leaves that
    are no parameter (a reentrant checkpoint's detached inputs; a parameter's .grad goes into no op of a pass).
    2: those of dropped or masked padding (``_handed``: the backward runs strong), 1: only those of FLAT_ZEROS
    (relu's), 0: none."""
    reached, handed, leaves = shaped.results
    if not reached:
        return 0
    if inputs:
        nodes = [t.node if isinstance(t, GradientEdge) else get_gradient_edge(t).node for t in inputs
                 if isinstance(t, GradientEdge) or (isinstance(t, torch.Tensor) and t.requires_grad)]
        ends = [i for i in (at.get(n) for n in nodes) if i is not None and i in reached]
    else:
        ends = [i for i in leaves if not issubclass(order[i].variable.__class__, _PARAMETER)]
    return 2 if any(i in handed for i in ends) else 1 if ends else 0


class _Shaped(NamedTuple):
    """What the plan knows of a graph from its shape alone (``_Graph.shape``: node types, edges, and the facts read
    from nodes that decide which make structural zeros and where those spread), with nodes as their index in walk
    order. Kept per shape (``_SHAPED``): a training loop's graph has the same shape every step, and its plan then
    costs one walk and the reads of values. Every value (saved tensors, singular points) is read per backward."""
    compiled_only: bool  # every node a torch.compile'd backward or AccumulateGrad
    known_all: bool  # every node known to NODE_FACTS (before what the reads find unreadable)
    only_compiled: bool  # every unknown node a compiled backward (the same)
    reads: tuple  # (index, saved attributes to read, singular test or None, hides its formula) per reached node
    deferred: tuple  # (index, singular test) of nodes no structural zero reaches from above
    zero_outputs: tuple  # (index, zero-output test) (_ZERO_OUTPUT_TESTS)
    scaling: bool  # a node of SCALES_BY_ITS_ZEROS makes zeros
    above_scaling: tuple  # the indices of the nodes above those (_sensitivity_finite reads them)
    # for a backward nested in a 'check' pass (_results_reach), None until one is planned (a graph whose shape changes
    # every step pays nothing for it): the indices of the nodes a structural zero reaches from above (_zero_reach),
    # of those the zeros of dropped or masked padding reach (_handed), and of the AccumulateGrad nodes among the first
    results: tuple[frozenset, frozenset, tuple] | None


_SHAPED: dict[tuple, _Shaped] = {}
_SHAPED_MAX = 64  # shapes
_SHAPED_TOKENS = 1 << 20  # entries of the shapes kept, all together (a pointer each: 8 MiB)


def _keep(shape: tuple, shaped: _Shaped) -> None:
    """Keep ``shaped`` for ``shape``; when the shapes kept would exceed _SHAPED_MAX or _SHAPED_TOKENS (graphs whose
    shape changes every step: a slice's bounds, an RNN's length), start over. A shape larger than that is not kept."""
    if len(shape) > _SHAPED_TOKENS:
        return
    if len(_SHAPED) >= _SHAPED_MAX or sum(map(len, _SHAPED)) + len(shape) > _SHAPED_TOKENS:
        _SHAPED.clear()
    _SHAPED[shape] = shaped


def _shaped(roots: Sequence[Any], g: _Graph, nested: bool = False) -> _Shaped:
    """The structural part of the plan of ``g`` (``_resolved``): reads only what ``g.shape`` holds (types, edges,
    node facts), never a value. ``nested``: with ``results`` (a backward nested in a 'check' pass)."""
    index = {n: i for i, n in enumerate(g.nodes)}
    if all(type(n).__name__ in _COMPILED_ONLY for n in g.nodes):
        return _Shaped(True, True, True, (), (), (), False, (), (frozenset(), frozenset(), ()))
    above = _zero_reach(roots, g)
    known_all = True
    only_compiled = True  # every node gradwise knows nothing about is a torch.compile'd backward
    deferred: list = []  # singular-point tests of nodes no structural zero reaches from above
    zero_outputs: list = []  # nodes whose backward multiplies by their own output (softmax, exp)
    for node in g.special:
        _, _, known, singular, _, zero_output, _, _, _, _, _, _, _ = node_info(node)
        if not known:
            known_all = False
            only_compiled = only_compiled and type(node).__name__ == "CompiledFunctionBackward"
        if zero_output is not None:
            zero_outputs.append((index[node], zero_output))
        if singular is not None and not g.makers.get(node) and node not in above:
            deferred.append((index[node], singular))
    # every node a structural zero reaches (one that keeps its own inside is read only if one arrives from above)
    reached = sorted(index[n] for n in (*g.senders, *(n for n in above if not g.makers.get(n))))
    order = list(g.nodes)
    reads = []
    for i in reached:
        info = node_info(order[i])
        hides = type(order[i]).__name__ in HIDES_ITS_FORMULA
        if info[1] or info[3] is not None or hides:  # (a node with nothing to read, test or hide: no entry)
            reads.append((i, info[1], info[3], hides))
    scaling = [n for n in g.makers if type(n).__name__ in SCALES_BY_ITS_ZEROS]
    return _Shaped(False, known_all, only_compiled, tuple(reads), tuple(deferred), tuple(zero_outputs),
                   bool(scaling), tuple(sorted(index[n] for n in _above(scaling, g.nodes))) if scaling else (),
                   ((frozenset(index[n] for n in above), frozenset(index[n] for n in _handed(roots, g)) if above
                     else frozenset(), tuple(index[n] for n in above if n.__class__ is _ACCUMULATE_GRAD))
                    if nested else None))


def _handed(roots: Sequence[Any], g: _Graph) -> set:
    """The nodes the structural zeros of a select, slice, pad, index, where or masked_fill reach (dropped or masked
    padding), FLAT_ZEROS' aside (relu's, a max's: where each value falls, whole rows of a product at most)."""
    slabs = [n for n in g.senders if type(n).__name__ not in FLAT_ZEROS]
    return _zero_reach(roots, g._replace(senders=slabs)) if slabs else set()


def _above(scaling: list, nodes: dict[Any, tuple]) -> set:
    """The nodes between the roots and those of ``scaling`` (their ancestors toward the roots)."""
    parents: dict[Any, list] = {}
    for node, edges in nodes.items():
        for n, _ in edges:
            if n is not None:
                parents.setdefault(n, []).append(node)
    above, stack = set(), list(scaling)
    while stack:
        for p in parents.get(stack.pop(), ()):
            if p not in above:
                above.add(p)
                stack.append(p)
    return above


def _sensitivity_finite(above: list, seeds: Sequence[Any], seen: dict[int, list[torch.Tensor]]) -> bool:
    """Whether the sensitivity reaching each node of SCALES_BY_ITS_ZEROS (it multiplies that sensitivity by its own
    structural zeros) can only be finite: the seeds, and every saved value, saved number and singular point of the
    nodes ``above`` it (between the roots and it, ``_above``), are finite and regular. A NaN/Inf there would meet
    its zeros inside the node ((w.amax(-1) * inf).sum(): inf x 0 = NaN at w's unselected elements, which the
    strong-zero rule annihilates). Read only where such a node is in the graph."""
    saved = [t for t in seeds if isinstance(t, torch.Tensor) and inexact(t)]
    for node in above:
        info = node_info(node)
        names, singular = info[0], info[3]
        if not _read_saved(node, names, seen, saved):
            return False  # (a checkpoint's or FSDP's hook would run: not known, so not finite)
        if singular is not None and singular(node):
            return False
        for name in _saved_numbers(node, names):
            if isinstance(value := getattr(node, name, None), float) and not math.isfinite(value):
                return False
    return _all_finite(saved)


_NUMBERS: dict[type, tuple[str, ...]] = {}  # node type -> its saved attributes that are not tensors


def _saved_numbers(node: Any, raw: tuple[str, ...]) -> tuple[str, ...]:
    """The ``_saved_*`` attributes of ``node``'s type that hold no tensor (``raw``: its ``_raw_saved_*``; the
    tensors were read through those already), looked up once per type."""
    names = per_type(_NUMBERS, type(node), "_gradwise_saved_numbers")
    if names is None:
        tensors = {"_saved_" + a[len("_raw_saved_"):] for a in raw}
        names = keep_per_type(_NUMBERS, type(node), "_gradwise_saved_numbers",
                              tuple(a for a in dir(node) if a.startswith("_saved_") and a not in tensors))
    return names


_PLAIN_CLASSES = (torch.Tensor, torch.nn.Parameter)  # (a layer's weight is often saved as it is)


def _read_saved(node: Any, read: tuple[str, ...], seen: dict[int, list[torch.Tensor]],
                saved: list[torch.Tensor]) -> bool:
    """Adds the floating-point tensors ``node`` saved under ``read`` to ``saved``, each once (a layer's output saved
    by two nodes, q/k/v views of one projection: identified by what they read, ``seen``: data pointer -> those
    added). False where they cannot be read without running a hook (a checkpoint's recomputation, FSDP's
    resharded parameters)."""
    readable = True
    strided = torch.strided
    for name in read:
        try:
            value = getattr(node, name, None)
        except RuntimeError:  # freed by an earlier backward: nothing to read (the engine raises if it needs it)
            continue
        # (attribute tests written out, in the order that rejects soonest: this runs per saved tensor, per backward)
        for raw in value if value.__class__ is tuple or value.__class__ is list else (value,):
            if raw is None:
                continue
            if raw.unpack_hook is not None:  # a checkpoint's hook would recompute the forward
                readable = False
                continue
            t = raw.data
            if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or not t.numel():
                continue
            layout = t.layout
            if t.__class__ not in _PLAIN_CLASSES or layout != strided or t.is_meta or t.is_nested:
                _contract.check_saved(t)  # raises Unreadable for a kind it cannot read (the backward runs plain)
            if layout != strided:  # (each unpack is a new object: nothing to compare it with)
                saved.append(t)
                continue
            ptr = t.data_ptr()
            if ptr == t.storage_offset() * t.element_size():  # storage freed until a hook refills it
                # (FSDP's resharded parameters): a freed storage's pointer is 0, plus the view's offset
                readable = False
                continue
            # the same elements: the same pointer, dtype, shape and strides (compared only where pointers meet)
            same = seen.get(ptr)
            if same is None:
                seen[ptr] = [t]
            elif any(u.dtype == t.dtype and u.shape == t.shape and u.stride() == t.stride() for u in same):
                continue
            else:
                same.append(t)
            saved.append(t)
    return readable
