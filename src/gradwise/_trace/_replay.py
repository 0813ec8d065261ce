"""What gw.watch() can know of a forward it did not trace: the births of the non-finite values the step's autograd
graph saved, found in the forward's order before the backward is replayed.

gw.watch() explains its first non-finite step by differentiating the kept graph again under the trace. The replay
meets the graph's saved values in the backward's order, last-computed first, and each non-finite one it met was a
birth of its own ('arrived non-finite'): the earliest-made of them, the root cause, was then a layer's output or
the logits ("tensor[48, 50]") where gw.trace() names the data ("x ... in DataLoader batch 150"), and the data,
met last, could be listed as a NaN no gradient used. So before the replay the graph is walked once in the
forward's order (nodes by sequence number), as the trace would have carried its values forward:

- a saved value that no node made (data, a parameter) and is non-finite is data that arrived so: an input birth,
  named as the DataLoader batch tensor whose storage it shares (with the batch's index) where there is one, or
  as the one unsaved non-finite batch tensor of its size (autocast saves a bf16 copy of x);
- a node's output is non-finite when a value that it or another node saved of it is, finite when such values
  are finite (the NaN padding a slice dropped stops there), else unknown. A non-finite or unknown output carries
  the births that reached the node's inputs; a non-finite output that none reached was born:
  1. at the node's op, when that op can make NaN/Inf (it is no ``_FINITE_PRESERVING`` op) and every input it saved
     or that a node made is known finite (log of a negative);
  2. else in this step's DataLoader data that no node saved (GPT2's inputs_embeds: the add of the position
     embeddings saves neither operand);
  3. else, a value no node made (a leaf) arrived non-finite, named by a variable or its shape (as the replay named
     it); a value a node made is born at "that node's op or an op before it" (ops that save nothing, a compiled
     or TorchScript graph: which one is not known), never called data that arrived.
- a saved view's base was made by its own node: that node's output is non-finite too (linear's reshape of log's
  output, saved by the mm, is log's).

The births are made in that order (the earliest is the root cause); the replay looks each value up by its storage
(``_Provenance._origin``), since an unpacked saved output is a new tensor object at every unpack.

May import: torch, gradwise._strong_zeros, gradwise._trace._advice, _common, _facts, _kinds, _store.
"""
from __future__ import annotations

import re

import torch

from gradwise import _strong_zeros
from gradwise._strong_zeros._node_facts import keep_per_type, per_type
from gradwise._trace import _kinds
from gradwise._trace._advice import _EXPLAIN
from gradwise._trace._common import (
    _ACCUMULATE_SEQ,
    TORCHSCRIPT,
    _has_nan,
    _inexact,
    _is_internal,
    _nonfinite,
    _nonfinite_mask,
    _user_frame,
)
from gradwise._trace._facts import _FINITE_PRESERVING, aten_packet
from gradwise._trace._store import Birth

_ACCUMULATE_GRAD = _strong_zeros._autograd_graph._ACCUMULATE_GRAD
_KEEPS_FINITE = {f"aten.{op.__name__}" for op in _FINITE_PRESERVING}  # as node records name their op
_RAW = "_raw_saved_"
_OFF_GRAPH = "an op outside the autograd graph"
_RAW_NAMES: dict[type, tuple] = {}  # node type -> ((its _raw_saved_* attribute, whether it is an output), ...)


def _raw_names(node, op: str) -> tuple:
    """A node type's saved attributes, each with whether it holds an output of the node's op: autograd names
    saved outputs ``result``, ``result1``... or by the op's named returns (flash attention's ``logsumexp``). A
    non-differentiable output (layer norm's mean and rstd) unpacks without the node as its ``grad_fn``: it is no
    data that arrived non-finite."""
    names = per_type(_RAW_NAMES, type(node), "_gradwise_raw_names")
    if names is None:
        packet = aten_packet(op)
        returns = {r.name for o in (packet.overloads() if packet is not None else ())
                   for r in getattr(packet, o)._schema.returns if r.name}
        names = keep_per_type(_RAW_NAMES, type(node), "_gradwise_raw_names", tuple(
            (a, a[len(_RAW):].rstrip("0123456789") == "result" or a[len(_RAW):] in returns)
            for a in dir(node) if a.startswith(_RAW)))
    return names


def _saved(node, op: str) -> list[tuple[torch.Tensor, bool]]:
    """The tensors ``node`` saved, unpacked, each with whether it is an output of the node; not those behind an
    unpack hook (a checkpoint would run its forward again to give them) nor freed ones."""
    out = []
    for name, output in _raw_names(node, op):
        try:
            raw = getattr(node, name)
            if any(r is not None and r.unpack_hook is not None for r in (raw if isinstance(raw, tuple | list)
                                                                          else (raw,))):
                continue
            plain = "_saved_" + name[len(_RAW):]
            value = getattr(node, plain) if hasattr(node, plain) else node.saved_tensors  # (a custom Function's)
        except RuntimeError:  # freed by an earlier backward
            continue
        out.extend((v, output or v.grad_fn is node) for v in (value if isinstance(value, tuple | list) else (value,))
                   if isinstance(v, torch.Tensor))
    return out


def _bad(t: torch.Tensor) -> bool:
    return _inexact(t) and t.layout is torch.strided and _kinds.readable(t) and t.numel() > 0 and _nonfinite(t)


def _storage(t: torch.Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.layout is torch.strided and _kinds.readable(t) else None


def _order(node) -> int:
    """Forward order: a leaf's AccumulateGrad (which reports the largest sequence number) before every op."""
    seq = node._sequence_nr()
    return -1 if seq == _ACCUMULATE_SEQ else seq


def forward_origins(tracer, roots, at: tuple, batches: dict, outs: tuple = ()) -> dict[int, frozenset]:
    """Storage -> births of the non-finite values the graph under ``roots`` saved (``at``: the backward call's
    location, where values of the untraced forward are born; ``batches``: DataLoader tensor -> (batch index, its
    key in a dict batch or None)), and of the non-finite ``outs`` the backward starts from (a NaN loss whose
    gradients are finite: inf - inf, whose backward reads no value).
    ``tracer.nodes`` already holds each node's op."""
    nodes = sorted(_strong_zeros._walk(roots), key=_order)
    ops = {n: _op(tracer, n) for n in nodes}
    saved = {n: _saved(n, ops[n]) for n in nodes if type(n) is not _ACCUMULATE_GRAD}
    known: dict = {}  # node -> an output of it that some node saved is non-finite (absent: none saved)
    outputs: dict = {}  # node -> its first non-finite saved output
    bad: dict[int, bool] = {}
    for n, vals in saved.items():
        for v, output in vals:
            nf = bad[id(v)] = _bad(v)
            g = n if output else v.grad_fn
            if g is None or not _inexact(v):
                continue
            if nf:
                known[g] = True
                outputs.setdefault(g, v)
                # a saved view (mm's of linear's reshape of log(x)): the node that made its base made the NaN/Inf
                # it holds (else the view's node, which makes none, took it for data that arrived so)
                base = v._base
                if base is not None and base.grad_fn is not None and base.grad_fn is not g and _inexact(base):
                    known[base.grad_fn] = True
                    outputs.setdefault(base.grad_fn, base)
            elif v.grad_fn is g and len(g._input_metadata) == 1:
                # finite evidence only from a node's one differentiable output (not layer norm's mean beside it,
                # nor one piece of an unbind)
                known.setdefault(g, False)
    roots_bad = [t for t in outs if isinstance(t, torch.Tensor) and t.grad_fn is not None and _bad(t)]
    for t in roots_bad:  # (what the backward starts from is its node's output)
        known[t.grad_fn] = True
        outputs.setdefault(t.grad_fn, t)
    by_storage = {k: (t, *tag) for t, tag in batches.items() if (k := _storage(t)) is not None}
    seen = {_storage(v) for vals in saved.values() for v, _ in vals}
    unseen = [(t, i) for t, i in batches.items() if _storage(t) not in seen and _bad(t)]
    frame = _user_frame()
    data: dict[int, frozenset] = {}

    def arrived(v: torch.Tensor) -> frozenset:
        k = _storage(v)
        got = data.get(k)
        if got is None:
            hit = by_storage.get(k)
            if hit is None:  # a copy of unsaved batch data (autocast's bf16 cast of x): the one of its size
                whole = v if v._base is None else v._base
                same = [(t, *batches[t]) for t, _ in unseen if t.numel() == whole.numel()]
                hit = same[0] if len(same) == 1 else None
            src, batch, key = hit or (v if v._base is None else v._base, None, None)
            name = tracer.names.get(src) or tracer._search_name(src, frame)
            if key and name.startswith("tensor["):  # no variable holds it (a Trainer's inputs dict): its key
                name = key
            elif hit is None and name.startswith("tensor[") and (held := _held_name(src, frame)) is not None:
                name = held  # a module's buffer (BatchNorm's running_var), a list's item: data held
            elif hit is None and name.startswith("tensor[") and not src.requires_grad:
                # no batch, no variable, no parameter: log(x) of an x that needs no gradient makes a value no node
                # records, as data would be: which it was is not known (it was told as data that arrived so)
                got = data[k] = untraced(tracer, v, _OFF_GRAPH, at)
                return got
            got = data[k] = tracer._input_births(src, at, name, batch)  # (NaN and Inf both: a birth each)
        return got

    def inside(v: torch.Tensor, graph: str) -> frozenset:
        k = _storage(v)
        got = data.get(k)
        if got is None:
            got = data[k] = untraced(tracer, v, graph, at)
        return got

    def born(node) -> frozenset:
        """A non-finite output none of whose inputs' births reached ``node`` (the cases 1-3 above)."""
        v, op = outputs[node], ops[node]
        if (graph := _opaque(node)) is not None:
            return inside(v, graph)
        ins = [s for s, output in saved[node] if not output]
        edges = [p for p, _ in node.next_functions if p is not None]
        if op.startswith("aten.") and op not in _KEEPS_FINITE and ins and not any(bad[id(s)] for s in ins) and \
                all(known.get(p) is False or type(p) is _ACCUMULATE_GRAD for p in edges):
            nan, mask = _has_nan(v), _nonfinite_mask(v)
            return frozenset([tracer._birth(op, at, nan, None, mask, lambda idx: Birth(
                op, at, _why(op, ins, v, mask), 0, idx, nan))])
        if unseen:
            return frozenset().union(*(arrived(t) for t, _ in unseen))
        if v.grad_fn is None and (v._base is None or v._base.grad_fn is None):
            return arrived(v)
        # a value the graph made (it has a node), whose NaN/Inf no node saved before: made by this node's op or an
        # op before it that saves nothing (an index_select, a where), or by data those ops passed on: not known
        return inside(v, f"{op} or an op before it")

    out: dict = {}  # node -> births of its output's NaN/Inf
    for n in nodes:
        if type(n) is _ACCUMULATE_GRAD:
            var = n.variable
            out[n] = arrived(var) if _bad(var) else frozenset()
            continue
        came = frozenset().union(*(out.get(p, ()) for p, _ in n.next_functions if p is not None))
        graph = _opaque(n)
        for s, output in saved[n]:
            if not output and s.grad_fn is None and bad[id(s)]:
                came |= arrived(s) if graph is None or _storage(s) in by_storage else inside(s, graph)
        status = known.get(n)
        out[n] = frozenset() if status is False else born(n) if status and not came else came
    origins: dict[int, frozenset] = {}
    for n, vals in saved.items():
        for v, output in vals:
            if bad[id(v)]:
                got = out.get(n) if output else data.get(_storage(v)) if v.grad_fn is None else out.get(v.grad_fn)
                if not got and not output and v.grad_fn is not None and v.grad_fn not in out:
                    # made by a node the walk from the roots never met (a packed GRU's hidden state, saved as
                    # the clone it was when the mul saved it, since rebased by an in-place write): which op made
                    # its NaN/Inf is not known (it was told as 'tensor[1, 4] arrived with 4 NaN value(s)')
                    got = inside(v, f"{_unwalked_op(v.grad_fn)} or an op before it")
                if got:
                    origins.setdefault(_storage(v), got)
    for t in roots_bad:
        if out.get(t.grad_fn):
            origins.setdefault(_storage(t), out[t.grad_fn])
    return origins


def _held_name(t: torch.Tensor, frame) -> str | None:
    """``module.path`` of the buffer ``t`` is, of a module a user frame holds, or ``batch[0]`` of the (small) list
    or tuple a user frame holds it in (the outermost such frame wins), else None: a value no node made that is a
    buffer or an item of the program's own batches (``model(batch[0])``, no DataLoader) is data that arrived (not
    made off the graph: "an op outside the autograd graph" where gw.trace() said "tensor[3] arrived")."""
    found = None
    while frame is not None:
        if not _is_internal(frame.f_code):
            for k, v in list(frame.f_locals.items()):
                if isinstance(v, torch.nn.Module):
                    got = next((n for n, b in v.named_buffers() if b is t), None)
                    if got is not None:
                        found = f"{k}.{got}"
                        break
                elif isinstance(v, (list, tuple)) and len(v) <= _ITEMS:
                    got = next((i for i, b in enumerate(v) if b is t), None)
                    if got is not None:
                        found = f"{k}[{got}]"
                        break
        frame = frame.f_back
    return found


_ITEMS = 16  # (a list that long is read item by item: a batch's (x, y), not a dataset)


def untraced(tracer, v: torch.Tensor, graph: str, at: tuple) -> frozenset:
    """The birth of a non-finite value ``v`` made in the forward gw.watch() did not trace (``graph``: a compiled
    or TorchScript graph, "aten.x or an op before it"): made there or data that arrived so; the replay cannot tell
    which, and says so (no 'arrived' claim). A value holding NaN and Inf both is a NaN and an Inf birth, as data
    that arrived is (`_input_births`): one NaN birth of NaN padding and a used Inf was a genuine NaN finding
    "reaching no gradient" of every element, beside the Inf's (wc33)."""
    nan = _has_nan(v)
    parts = [(nan, _nonfinite_mask(v))] if not nan or not bool(torch.isinf(v).any()) else \
        [(True, torch.isnan(v)), (False, torch.isinf(v))]
    return frozenset(tracer._birth(graph, at, nan, None, mask, lambda idx, nan=nan: Birth(
        graph, at, f"a value {graph} made holds NaN/Inf: made there or data that arrived so (gw.watch() "
        "did not trace the forward and no autograd node saved it before; gw.trace() names the op)", 0, idx, nan))
        for nan, mask in parts)


def made_by(node) -> str:
    """What made a value whose node is ``node`` in a forward gw.watch() did not trace: an opaque graph, else "that
    node's op or an op before it" (ops that save nothing: which one is not known)."""
    return _opaque(node) or f"{_unwalked_op(node)} or an op before it"


def _unwalked_op(node) -> str:
    """'CloneBackward0' -> 'aten.clone': the op of a node no walk recorded (its name, in aten's spelling)."""
    base = re.sub(r"Backward\d*$", "", node.name())
    return "aten." + re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower() if base != node.name() else node.name()


def _opaque(node) -> str | None:
    """What a node whose forward ran as one graph the replay cannot see into is (its saved values are the
    graph's inputs and intermediates alike, none with a node of its own); None for other nodes."""
    name = node.name()
    if "CompiledFunction" in name:
        return "a compiled graph (torch.compile)"
    return TORCHSCRIPT if "DifferentiableGraphBackward" in name else None


def _why(op: str, ins: list, out: torch.Tensor, mask: torch.Tensor) -> str:
    """What made ``out``'s NaN/Inf from finite inputs: the trace's explanation where the op saved its one input
    (log of values below 0), which is then the op's first argument."""
    explain = _EXPLAIN.get(aten_packet(op))
    what = explain(ins, out, mask) if explain is not None and len(ins) == 1 else "made from finite inputs"
    return f"{what} (in this step's forward, not traced by gw.watch(): the op is its autograd node's)"


def _op(tracer, node) -> str:
    nd = tracer.nodes.get(node._sequence_nr())
    return nd.op if nd is not None else node.name()
