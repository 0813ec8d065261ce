"""Strong zeros as a graph transformation of a compiled backward (AOTAutograd's backward FX graph, post-grad).

The eager mode (``_mode._StrongZeroMode``) keeps a bool *support* per tensor at run time. Here the
supports are nodes of the graph itself: bool tensors computed next to the values they describe, from the same
facts (how supports arise, travel and annihilate), with no ``.item()``, no host sync and no data-dependent
guard, so inductor fuses them into its kernels. A support is one of

- ``None``: every element may be nonzero (the default: unknown ops, forward values, tangents);
- ``FALSE``: every element is a structural zero (a backward formula's ``full(0)``);
- an FX node: a bool tensor broadcastable to the value, False at structural zeros.

Invariant: where a support is False the value is exactly +-0 (sources are zeros, views move them, products with a
False factor are rewritten to 0). The rules, one per kind of the shared table and a few per op, are in
``_compile_rules``; this module is the engine that walks the graph, keeps the supports and rewrites nodes
(``_Rewriter``), and the entry points the compile hook calls.

Only *sensitivities* (nodes that depend on a ``tangents_*`` input) and constant zeros carry supports: a forward
value recomputed in the backward (``where(x > 0, x, 0)``) is a value, and a NaN it multiplies stays. Where the
pass knows no rule the support is ``None``: a NaN/Inf may remain (the runtime check in ``_compile`` then
re-runs that backward through the eager rules), never a wrong finite number.

May import: torch (torch.fx), gradwise._ops, gradwise._strong_zeros._compile_rules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from gradwise._ops._zeros import multiplying_args, zero_fact
from gradwise._strong_zeros._compile_rules import (
    FALSE,
    PASS_RULES,
    _floating,
    _has_floating,
    _makes,
    _same_shape,
    _val,
    pass_rule,
)

aten = torch.ops.aten

__all__ = ["FALSE", "PASS_RULES", "pass_rule", "rewrite_backward"]


class _Rewriter:
    """One pass over one backward graph (instances live for one call: no reference to the fake mode is kept)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self.sup: dict[fx.Node, Any] = {}
        self.sens: set[fx.Node] = set()
        self.cursor: fx.Node | None = None
        self.rewritten = 0
        self.created: set[fx.Node] = set()
        self.flat_zeros: set[fx.Node] = set()  # False constants that stand for a flat region (see `flat`)
        self._flat: dict[fx.Node, bool] = {}

    # -- building nodes ---------------------------------------------------------------------------------
    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """A new node after the cursor, with its fake value (inductor's lowering reads node.meta['val'])."""
        with self.graph.inserting_after(self.cursor):
            node = self.graph.call_function(target, args, kwargs)
        self.cursor = node
        vals = torch.fx.node.map_arg((args, kwargs), _val)
        with self.mode:
            node.meta["val"] = target(*vals[0], **vals[1])
        self.created.add(node)
        return node

    def flat(self, mask: Any) -> bool:
        """Whether every False of ``mask`` stands for a flat region of a forward value (relu's dead units: a
        ``where`` on a comparison of a forward activation, ``threshold_backward``), none for zeros a formula
        placed (slices, padding, masks): copying a value operand to zero what meets only such zeros buys little
        (a NaN there is rare, and then the runtime check re-runs the backward op by op, exactly)."""
        if mask is None:
            return True
        if mask is FALSE or not isinstance(mask, fx.Node):
            return False
        stack = [mask]  # iterative: a deep network's masks form long chains of created nodes
        while stack:
            node = stack[-1]
            if node in self._flat:
                stack.pop()
                continue
            if node.target is aten.full.default and node in self.created:  # made here: True, or a False
                self._flat[node] = node in self.flat_zeros or node.args[1] is not False
                stack.pop()
                continue
            inputs = [a for a in node.all_input_nodes if a in self.created]
            pending = [a for a in inputs if a not in self._flat]
            if pending:
                stack.extend(pending)
                continue
            self._flat[node] = all(self._flat[a] for a in inputs)
            stack.pop()
        return self._flat[mask]

    def shape_of(self, like: fx.Node) -> list:
        """``like``'s sizes as graph arguments (sym_size nodes for symbolic ones)."""
        out = []
        for d, s in enumerate(_val(like).shape):
            out.append(s if isinstance(s, int) else self.call(aten.sym_size.int, like, d))
        return out

    def const(self, value: bool, like: fx.Node) -> fx.Node:
        return self.call(aten.full.default, self.shape_of(like), value, dtype=torch.bool,
                         device=_val(like).device, pin_memory=False)

    def exact(self, mask: Any, like: fx.Node) -> fx.Node:
        """The mask as a bool node of exactly ``like``'s shape."""
        if mask is None or mask is FALSE:
            return self.const(mask is None, like)
        if _same_shape(_val(mask).shape, _val(like).shape):
            return mask
        return self.call(aten.expand.default, mask, self.shape_of(like))

    def small(self, mask: Any, like: fx.Node) -> fx.Node:
        """The mask as a bool node broadcastable to ``like`` (a 0-dim constant where it is constant)."""
        if mask is None or mask is FALSE:
            return self.call(aten.full.default, [], mask is None, dtype=torch.bool, device=_val(like).device,
                             pin_memory=False)
        return mask

    def both(self, a: Any, b: Any) -> Any:
        if a is FALSE or b is FALSE:
            return FALSE
        if a is None or b is None:
            return b if a is None else a
        return self.call(aten.logical_and.default, a, b)

    def either(self, a: Any, b: Any) -> Any:
        if a is None or b is None:
            return None
        if a is FALSE or b is FALSE:
            return b if a is FALSE else a
        return self.call(aten.logical_or.default, a, b)

    def of(self, x: object) -> Any:
        """The support of an argument: a node's, or for a Python number FALSE when it is 0."""
        if isinstance(x, fx.Node):
            return self.sup.get(x)
        if isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0:
            return FALSE
        return None

    def zero(self, like: fx.Node) -> fx.Node:
        """A 0-dim 0 of ``like``'s dtype and device."""
        val = _val(like)
        return self.call(aten.full.default, [], 0, dtype=val.dtype, device=val.device, pin_memory=False)

    def rewire(self, node: fx.Node, *args: Any) -> None:
        """Give ``node`` new arguments built after it, and move it after them (to the cursor)."""
        node.args = args
        self.cursor.append(node)
        self.cursor = node
        self.rewritten += 1

    def annihilate(self, node: fx.Node, mask: Any, otherwise: fx.Node | None = None, result: Any = None) -> None:
        """Replace ``node``'s uses by ``where(mask, node, otherwise)`` (0 by default), of support ``result``
        (``mask`` by default)."""
        if otherwise is None:
            otherwise = self.zero(node)
        new = self.call(aten.where.self, self.small(mask, node), node, otherwise)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        self.sup[new] = mask if result is None else result  # the node's users now read ``new``
        self.sens.add(new)
        self.rewritten += 1

    # -- the walk ---------------------------------------------------------------------------------------
    def run(self) -> int:
        from torch._guards import detect_fake_mode

        vals = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        self.mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if self.mode is None:
            return 0
        self.sens = _sensitivities(self.graph)
        try:
            for node in list(self.graph.nodes):
                if node.op != "call_function":
                    continue
                rule = pass_rule(node.target)
                val = _val(node)
                if rule is None or not _has_floating(val):
                    continue
                if node not in self.sens and (not _makes(node.target) or node.meta.get(FORWARD_VALUE)):
                    continue  # a forward value (recomputed in the backward): its zeros are values
                self.cursor = node
                mask = rule(self, node)
                if mask is not None:
                    self.sup[node] = mask
        finally:
            self.mode = None
        return self.rewritten


# A zeros tensor of the forward (``zeros_like(x)``, a where's scalar 0) that the partitioner recomputes in the
# backward (``partitioner_tag == 'is_forward'``) is a value: multiplied into a sensitivity, a NaN there is
# genuine ((x * zeros).sum() * nan). Common-subexpression elimination may have joined it with a formula's own
# zeros (where's backward ``where(c, g, 0)``, a placement's base), which are structural: the node is split by
# use, and the copy that the multiplications (and recomputed forward ops) read is marked ``FORWARD_VALUE``
# (which arguments an op multiplies: the shared facts', ``multiplying_args``).
FORWARD_VALUE = "gradwise_forward_value"


def split_forward_zeros(graph: fx.Graph) -> bool:
    """Give the multiplications that read a recomputed forward zeros node their own copy marked FORWARD_VALUE
    (see above); whether the graph changed."""
    changed = False
    sens = _sensitivities(graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and _makes(node.target) and node not in sens and not node.meta.get(
                FORWARD_VALUE) and not _meets_a_sensitivity(node, sens):
            # its zeros reach values only (``tangent * 0`` folded by inductor into a constant that multiplies a
            # forward value): values, as the pass reads them (it gives supports along sensitivities only)
            node.meta[FORWARD_VALUE] = True
            changed = True
            continue
        if node.op != "call_function" or not _makes(node.target) or \
                node.meta.get("partitioner_tag") != "is_forward":
            continue
        # (and a forward op recomputed with it, ``xlogy(zeros, y)``: under the mode a structural zero would
        # give it another value than the forward's, xlogy's 0 where it is NaN)
        users = [u for u in node.users if u.meta.get("partitioner_tag") == "is_forward" or
                 any(i < len(u.args) and u.args[i] is node for i in multiplying_args(u.target))]
        if not users:
            continue
        if len(users) == len(node.users):
            node.meta[FORWARD_VALUE] = True
        else:
            with graph.inserting_after(node):
                copy = graph.call_function(node.target, node.args, dict(node.kwargs))
            copy.meta = {**node.meta, FORWARD_VALUE: True}
            for u in users:
                u.replace_input_with(node, copy)
        changed = True
    return changed


def _sensitivities(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that depend on a ``tangents_*`` input."""
    sens: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or \
                any(a in sens for a in node.all_input_nodes):
            sens.add(node)
    return sens


def _meets_a_sensitivity(node: fx.Node, sens: set[fx.Node]) -> bool:
    """Whether a zeros node reaches a sensitivity, directly or through views of it that are not sensitivities
    (``expand(full(0))`` as a placement's base)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in sens or user.op == "output":
                return True
            fact = zero_fact(user.target) if user.op == "call_function" else None
            if fact is not None and fact.kind == "views" and user not in seen:
                seen.add(user)
                stack.append(user)
    return False


def rewrite_backward(graph: fx.Graph) -> int:
    """Apply strong zeros to a backward graph in place; returns how many nodes were rewritten. A graph without
    ``tangents_*`` inputs (a forward graph, an inference graph) is left alone."""
    if not any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes):
        return 0
    split_forward_zeros(graph)
    count = _Rewriter(graph).run()
    if count:
        graph.eliminate_dead_code()
        graph.lint()
    return count


def append_finite_flag(graph: fx.Graph) -> None:
    """Add to a backward graph's outputs one 0-dim bool: whether every floating output is finite (one sum per
    output, reduced where inductor produces it, instead of reading every gradient back afterwards). Only for the
    strong variant gradwise compiles and calls itself (``_compile._Flagged`` strips it): always added, so that a
    variant served from inductor's cache has it too."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    results = out.args[0]
    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]) or FakeTensorMode()
    floats = [r for r in results if isinstance(r, fx.Node) and _floating(_val(r))]

    def call(target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with graph.inserting_before(out):
            node = graph.call_function(target, args, kwargs)
        v = torch.fx.node.map_arg((args, kwargs), _val)
        with mode:
            node.meta["val"] = target(*v[0], **v[1])
        return node

    if floats:
        flag = None  # (|sum| < inf, and-ed: isfinite and stack are decomposed before this pass, not lowered)
        for r in floats:
            total = call(aten.sum.default, r, dtype=torch.float32)
            finite = call(aten.lt.Scalar, call(aten.abs.default, total), math.inf)
            flag = finite if flag is None else call(aten.logical_and.default, flag, finite)
    else:
        flag = call(aten.full.default, [], True, dtype=torch.bool, pin_memory=False)
    out.args = ((*results, flag),)
