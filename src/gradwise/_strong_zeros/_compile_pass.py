"""Strong zeros as a graph transformation of a compiled backward (AOTAutograd's backward FX graph, post-grad).

The eager mode (``_mode._StrongZeroMode``) keeps a bool *support* per tensor at run time. Here the
supports are nodes of the graph itself: bool tensors computed next to the values they describe, from the same
facts (how supports arise, travel and annihilate), with no ``.item()``, no host sync and no data-dependent
guard, so inductor fuses them into its kernels. A support is one of

- ``None``: every element may be nonzero (the default: unknown ops, forward values, tangents);
- ``FALSE``: every element is a structural zero (a backward formula's ``full(0)``);
- an FX node: a bool tensor broadcastable to the value, False at structural zeros.

Invariant: where a support is False the value is exactly +-0 (sources are zeros, views move them, products
with a False factor are rewritten to 0). Rules (one per aten op, ``PASS_RULES``):

- sources: ``full``/``zeros`` of 0 -> FALSE; ``slice_scatter``/``select_scatter``/``constant_pad_nd``/``cat``
  -> the same op on the masks (a forward value placed beside a sensitivity: ``!= 0``, `_placed_value`);
  ``where(c, a, b)`` -> ``where(c, sup a, sup b)``; ``threshold_backward`` -> ``sup g & (x > t | isnan x)``.
- travel: views apply the same view to the mask; ``add``/``sub`` unite; ``sum`` -> ``any``; casts, ``neg``,
  ``clone`` and products with a finite Python number keep it.
- travel, reads: ``index``/``gather``/``index_select`` apply the same read to the mask.
- annihilate: ``mul(a, b)`` -> ``where(sup a & sup b, a * b, 0)``; ``div(a, b)`` with a supported numerator
  likewise; ``prims.fma(a, b, c)`` -> ``where(sup a & sup b, fma, c)``; ``mm(A, B)`` with a sensitivity A
  zeroes B's rows k where column k of A is all structural zero (and symmetrically), ``bmm`` per batch, unless
  A's zeros all mark flat regions of forward values (relu's dead units: ``_Rewriter.flat``); the CPU
  flash attention backward replaces discarded query rows and unread keys by harmless values, as its eager rule.

Only *sensitivities* (nodes that depend on a ``tangents_*`` input) and constant zeros carry supports: a forward
value recomputed in the backward (``where(x > 0, x, 0)``) is a value, and a NaN it multiplies stays. Where the
pass knows no rule the support is ``None``: a NaN/Inf may remain (the runtime check in ``_compile`` then
re-runs that backward through the eager rules), never a wrong finite number.

May import: torch (torch.fx) only.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.inductor_prims  # (registers prims.fma, which a rule below names: installed by hand too)
import torch.fx as fx

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["FALSE", "PASS_RULES", "rewrite_backward"]

FALSE = "structural-zero"  # the support of a tensor that is a structural zero everywhere

_ZERO_MAKERS = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2,
                aten.scalar_tensor.default: 0, aten.zeros.default: None, aten.zeros_like.default: None,
                aten.new_zeros.default: None}
_VIEWS = {aten.expand.default, aten.permute.default, aten.reshape.default, aten.view.default,
          aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
          aten.squeeze.default, aten.t.default, aten.transpose.int, aten.slice.Tensor, aten.select.int,
          aten.alias.default, aten.clone.default, aten.neg.default, aten.contiguous.default}
_CASTS = {aten._to_copy.default, prims.convert_element_type.default}
_CAST = prims.convert_element_type.default


def _val(x: object) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


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
        try:
            for node in list(self.graph.nodes):
                if node.op == "placeholder":
                    if node.name.startswith("tangents"):
                        self.sens.add(node)
                    continue
                if node.op != "call_function":
                    continue
                if any(a in self.sens for a in node.all_input_nodes):
                    self.sens.add(node)
                rule = PASS_RULES.get(node.target)
                val = _val(node)
                if rule is None or not _has_floating(val):
                    continue
                if node not in self.sens and (node.target not in _ZERO_MAKERS or node.meta.get(FORWARD_VALUE)):
                    continue  # a forward value (recomputed in the backward): its zeros are values
                self.cursor = node
                mask = rule(self, node)
                if mask is not None:
                    self.sup[node] = mask
        finally:
            self.mode = None
        return self.rewritten


def _floating(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _has_floating(val: Any) -> bool:
    """A floating tensor, or a tuple of outputs holding one (convolution_backward's)."""
    return _floating(val) or (isinstance(val, (tuple, list)) and any(map(_floating, val)))


def _same_shape(a: Any, b: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------------
# Rules: rule(rewriter, node) -> the node's support (None, FALSE or a bool node), rewriting it if needed.
# ---------------------------------------------------------------------------------------------------------

PassRule = Callable[[_Rewriter, fx.Node], Any]
PASS_RULES: dict[Any, PassRule] = {}


def _rule(*ops: Any) -> Callable[[PassRule], PassRule]:
    def register(rule: PassRule) -> PassRule:
        for op in ops:
            PASS_RULES[op] = rule
        return rule

    return register


@_rule(*_ZERO_MAKERS)
def _zeros(rw: _Rewriter, node: fx.Node) -> Any:
    pos = _ZERO_MAKERS[node.target]
    value = 0 if pos is None else node.args[pos] if len(node.args) > pos else node.kwargs.get("fill_value", 0)
    return FALSE if isinstance(value, (int, float)) and value == 0 else None


@_rule(*_VIEWS)
def _view(rw: _Rewriter, node: fx.Node) -> Any:
    src = node.args[0]
    mask = rw.of(src)
    if mask is None or mask is FALSE or node.target in (aten.clone.default, aten.neg.default,
                                                         aten.alias.default, aten.contiguous.default):
        return mask
    return rw.call(node.target, rw.exact(mask, src), *node.args[1:], **node.kwargs)


@_rule(aten.index.Tensor, aten.gather.default, aten.index_select.default)
def _gather(rw: _Rewriter, node: fx.Node) -> Any:
    """Reading elements moves their supports: the same op on the mask."""
    mask = rw.of(node.args[0])
    if mask is None or mask is FALSE:
        return mask
    return rw.call(node.target, rw.exact(mask, node.args[0]), *node.args[1:], **node.kwargs)


@_rule(*_CASTS)
def _cast(rw: _Rewriter, node: fx.Node) -> Any:
    return rw.of(node.args[0])


@_rule(aten.add.Tensor, aten.sub.Tensor)
def _add(rw: _Rewriter, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    if not isinstance(b, fx.Node):  # x + c: c != 0 makes every element nonzero
        return rw.of(a) if b == 0 else None
    return rw.either(rw.of(a), rw.of(b))


@_rule(aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
def _mul(rw: _Rewriter, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    if not isinstance(b, fx.Node):
        # a finite number keeps a's zeros zeros; 0 * NaN does not happen here (b is not NaN)
        return rw.of(a) if isinstance(b, (int, float)) and math.isfinite(b) else None
    divide = node.target in (aten.div.Tensor, aten.div.Scalar)
    mask = rw.of(a) if divide else rw.both(rw.of(a), rw.of(b))
    if mask is None:
        return None
    rw.annihilate(node, mask)
    return mask


@_rule(prims.fma.default)
def _fma(rw: _Rewriter, node: fx.Node) -> Any:
    """fma(a, b, c) = a * b + c (softmax's decomposed backward): where a * b is a structural zero, c."""
    a, b, c = node.args[:3]
    product = rw.both(rw.of(a), rw.of(b))
    if product is None or not isinstance(c, fx.Node):
        return None
    result = rw.either(product, rw.of(c))
    rw.annihilate(node, product, otherwise=c, result=FALSE if result is FALSE else result)
    return result


_COMPARISONS = {aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.le.Tensor, aten.lt.Tensor,
                aten.ge.Tensor, aten.gt.Tensor}


@_rule(aten.where.self)
def _where(rw: _Rewriter, node: fx.Node) -> Any:
    cond, a, b = node.args[:3]
    ma, mb = rw.of(a), rw.of(b)
    if ma is None and mb is None:
        return None
    if ma is FALSE and mb is FALSE:
        return FALSE
    sa, sb = rw.small(ma, node), rw.small(mb, node)
    if _flat_region(rw, cond):  # relu's backward as inductor decomposes it: where(x <= 0, 0, g)
        rw.flat_zeros.update(m for m, src in ((sa, ma), (sb, mb)) if src is FALSE)
    return rw.call(aten.where.self, cond, sa, sb)


def _flat_region(rw: _Rewriter, cond: Any) -> bool:
    """Whether a where's condition compares a forward activation with a threshold (relu's x <= 0): computed in
    the backward, or saved by the partitioner as a bool input named after its comparison (``le``, ``le_3`` ...;
    a padding or attention mask is an ``eq``/``ne`` or an input). A guess used for speed only."""
    if not isinstance(cond, fx.Node) or cond in rw.sens:
        return False
    if cond.op == "placeholder":
        val = _val(cond)
        return isinstance(val, torch.Tensor) and val.dtype == torch.bool \
            and cond.name.split("_")[0] in ("le", "lt", "ge", "gt")
    return cond.target in _COMPARISONS and _floating(_val(cond.args[0]))


@_rule(aten.threshold_backward.default)
def _threshold_backward(rw: _Rewriter, node: fx.Node) -> Any:
    g, x, t = node.args[:3]
    passes = rw.call(aten.logical_or.default, rw.call(aten.gt.Scalar, x, t), rw.call(aten.isnan.default, x))
    return rw.both(rw.of(g), passes)


def _placed_value(rw: _Rewriter, x: Any, other: Any) -> Any:
    """The support of a placement's operand ``x`` beside a sensitivity ``other``. A backward is linear in its
    tangents, so a forward value it places into a sensitivity holds only zeros, and they are structural: zeros
    a formula makes that the partitioner saved from the forward, where common-subexpression elimination joined
    them with the forward's own (``h[4:].zero_()``'s ``full_default``). Read as ``x != 0``, no claim is made
    where that fails."""
    mask = rw.of(x)
    if mask is None and isinstance(x, fx.Node) and x not in rw.sens and other in rw.sens and _floating(_val(x)):
        mask = rw.call(aten.ne.Scalar, x, 0)
        rw._flat[mask] = False  # zeros a formula placed, not a forward value's flat region (`_Rewriter.flat`)
    return mask


@_rule(aten.slice_scatter.default, aten.select_scatter.default)
def _scatter(rw: _Rewriter, node: fx.Node) -> Any:
    base, src = node.args[:2]
    mb, ms = _placed_value(rw, base, src), _placed_value(rw, src, base)
    if mb is None and ms is None:
        return None
    if mb is FALSE and ms is FALSE:
        return FALSE
    return rw.call(node.target, rw.exact(mb, base), rw.exact(ms, src), *node.args[2:], **node.kwargs)


@_rule(aten.constant_pad_nd.default)
def _pad(rw: _Rewriter, node: fx.Node) -> Any:
    x, pad = node.args[:2]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    mask = rw.of(x)
    if value != 0 or mask is FALSE:
        return None if value != 0 else FALSE
    return rw.call(aten.constant_pad_nd.default, rw.exact(mask, x), pad, False)


@_rule(aten.cat.default)
def _cat(rw: _Rewriter, node: fx.Node) -> Any:
    parts = node.args[0]
    masks = [rw.of(p) for p in parts]
    if all(m is None for m in masks):
        return None
    if all(m is FALSE for m in masks):
        return FALSE
    return rw.call(aten.cat.default, [rw.exact(m, p) for m, p in zip(masks, parts, strict=True)], *node.args[1:])


@_rule(aten.sum.dim_IntList, aten.sum.default)
def _sum(rw: _Rewriter, node: fx.Node) -> Any:
    x = node.args[0]
    mask = rw.of(x)
    if mask is None or mask is FALSE:
        return mask
    full = rw.exact(mask, x)
    if node.target is aten.sum.default:
        return rw.call(aten.any.default, full)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or len(dims) == 0:
        return rw.call(aten.any.default, full)
    return rw.call(aten.any.dims, full, list(dims), keepdim)


@_rule(aten.mm.default, aten.bmm.default)
def _mm(rw: _Rewriter, node: fx.Node) -> Any:
    """out[i, j] = sum_k A[i, k] B[k, j]. A row k of the value B that only structural zeros of the sensitivity A
    read is zeroed (its NaN/Inf met only zeros); the output's row i is a structural zero where A's row i is.
    Structural zeros of A not aligned with whole columns leave B alone: a NaN may stay (checked at run time)."""
    a, b = node.args[:2]
    ma, mb = rw.of(a), rw.of(b)
    if ma is None and mb is None:
        return None
    batch = node.target is aten.bmm.default
    k_a, row_a = (1, 2) if batch else (0, 1)  # A: [(b,) n, k] -> reduce over rows n / columns k
    k_b, col_b = (2, 1) if batch else (1, 0)  # B: [(b,) k, m]
    out_masks = []
    new_a, new_b = a, b
    if ma is FALSE or mb is FALSE:
        out = FALSE
    else:
        # a copy of the value operand (extern mm input: nothing fuses it) only for zeros a formula placed
        if ma is not None:
            full = rw.exact(ma, a)
            if not rw.flat(ma):
                cols = rw.call(aten.any.dims, full, [k_a], True)  # [(b,) 1, k]: column k of A meets something
                cols = rw.call(aten.permute.default, cols, _swap_last(_val(cols).dim()))  # [(b,) k, 1]
                new_b = rw.call(aten.where.self, cols, b, rw.zero(b))
            out_masks.append(rw.call(aten.any.dims, full, [row_a], True))  # [(b,) n, 1]
        if mb is not None:
            full = rw.exact(mb, b)
            if not rw.flat(mb):
                rows = rw.call(aten.any.dims, full, [k_b], True)  # [(b,) k, 1]
                rows = rw.call(aten.permute.default, rows, _swap_last(_val(rows).dim()))  # [(b,) 1, k]
                new_a = rw.call(aten.where.self, rows, a, rw.zero(a))
            out_masks.append(rw.call(aten.any.dims, full, [col_b], True))  # [(b,) 1, m]
        out = out_masks[0] if len(out_masks) == 1 else rw.both(*out_masks)
    if out is FALSE:  # all of A (or B) is structural zero: so is the product, whatever the other holds
        rw.annihilate(node, FALSE)
        return FALSE
    rw.rewire(node, new_a, new_b, *node.args[2:])
    return out


@_rule(aten.convolution_backward.default)
def _convolution_backward(rw: _Rewriter, node: fx.Node) -> Any:
    """convolution_backward(g, x, w, ...) -> (grad_input, grad_weight, grad_bias). An input position that no
    supported output position reads (in any channel) meets only structural zeros of g: it is zeroed in x before
    the weight gradient (its NaN/Inf met only zeros), and grad_input there is a structural zero (set to 0: a
    NaN/Inf in w met only zeros there too). Positions a supported output reads keep their values: a NaN there
    that only structural channels meet may stay (the runtime check re-runs that backward op by op). Returns a
    tuple of supports, one per output, read by ``operator.getitem``."""
    g, x, w = node.args[:3]
    stride, padding, dilation, transposed, output_padding = node.args[4:9]
    mg = rw.of(g)
    if mg is None or mg is FALSE or transposed or rw.of(x) is not None:
        return None
    vg, vw = _val(g), _val(w)
    positions = rw.call(aten.any.dims, rw.exact(mg, g), [1], True)  # [N, 1, *out]: some channel supported
    ones = rw.call(aten.full.default, [1, 1, *vw.shape[2:]], 1.0, dtype=vg.dtype, device=vg.device,
                   pin_memory=False)
    reads = rw.call(aten.convolution_backward.default, rw.call(_CAST, positions, vg.dtype),
                    rw.call(aten.slice.Tensor, x, 1, 0, 1), ones, None, stride, padding, dilation, False,
                    output_padding, 1, [True, False, False])
    read = rw.call(aten.gt.Scalar, rw.call(operator.getitem, reads, 0), 0)  # [N, 1, *in]
    rw.rewire(node, g, rw.call(aten.where.self, read, x, rw.zero(x)), *node.args[2:])
    return (read, None, None)


@_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _attention_backward(rw: _Rewriter, node: fx.Node) -> Any:
    """The CPU flash attention backward (g, q, k, v, out, lse, ...) -> (dq, dk, dv), as the eager rule
    (``_rules_attention``): a query row whose g is all structural zeros gets q = out = g = 0 and lse = +inf
    (its P row is exactly 0), a key no kept row of its (batch, head) reads gets k = v = 0, and their gradients
    are structural zeros. With a mask or causal masking every key of a (batch, head) with a kept row counts as
    read (a superset: a NaN it keeps stays, and the runtime check runs the node op by op). Returns one support
    per output, read by ``operator.getitem``."""
    g, q, k, v, out, lse = node.args[:6]
    mg = rw.of(g)
    if mg is None or rw.of(q) is not None or rw.of(k) is not None or rw.of(v) is not None:
        return None
    if mg is FALSE:
        return (FALSE, FALSE, FALSE)
    vq, vk, vl = _val(q), _val(k), _val(lse)
    if vq.dim() != 4 or vk.dim() != 4 or not _same_shape(vq.shape[:2], vk.shape[:2]) \
            or not _same_shape(vl.shape, vq.shape[:3]):
        return None  # grouped-query heads, another layout: no rule (the runtime check)
    kept = rw.exact(mg, g)
    rows = rw.call(aten.any.dims, kept, [3], True)  # [B, H, Lq, 1]: a query row with a supported element
    used = rw.call(aten.any.dims, rows, [2], True)  # [B, H, 1, 1]: a (batch, head) with a kept row
    rows3 = rw.call(aten.squeeze.dim, rows, 3)
    inf = rw.call(aten.full.default, [], math.inf, dtype=vl.dtype, device=vl.device, pin_memory=False)
    zero = rw.zero(q)
    replaced = ((kept, g, zero), (rows, q, zero), (used, k, zero), (used, v, zero), (kept, out, zero),
                (rows3, lse, inf))
    new = [rw.call(aten.where.self, mask, x, fill) for mask, x, fill in replaced]
    rw.rewire(node, *new, *node.args[6:])
    # dk, dv of unread keys and dq of discarded rows are exact zeros (q = g = out = 0, lse = +inf: dS = 0), except
    # dq where a key masked for every kept row holds NaN/Inf (0 x NaN): only with a mask is dq annihilated. The
    # others are not (a where fused into the bias gradient's reduction would change its summation order).
    masked = node.kwargs.get("attn_mask") is not None or node.args[7] is not False
    node.meta["gw_exact_zeros"] = (not masked, True, True)
    return (rows, used, used)


@_rule(operator.getitem)
def _getitem(rw: _Rewriter, node: fx.Node) -> Any:
    """An output of a multi-output op whose rule returned one support per output."""
    masks = rw.sup.get(node.args[0])
    if not isinstance(masks, tuple):
        return None
    mask = masks[node.args[1]]
    exact = node.args[0].meta.get("gw_exact_zeros", ())
    if mask is not None and mask is not FALSE and not (node.args[1] < len(exact) and exact[node.args[1]]):
        rw.annihilate(node, mask)
    return mask


# A zeros tensor of the forward (``zeros_like(x)``, a where's scalar 0) that the partitioner recomputes in the
# backward (``partitioner_tag == 'is_forward'``) is a value: multiplied into a sensitivity, a NaN there is
# genuine ((x * zeros).sum() * nan). Common-subexpression elimination may have joined it with a formula's own
# zeros (where's backward ``where(c, g, 0)``, a placement's base), which are structural: the node is split by
# use, and the copy that the multiplications read is marked ``FORWARD_VALUE``. (op -> its multiplying args)
FORWARD_VALUE = "gradwise_forward_value"
_MULTIPLYING = {aten.mul.Tensor: (0, 1), aten.div.Tensor: (0,), aten.mm.default: (0, 1), aten.bmm.default: (0, 1),
                aten.mv.default: (0, 1), aten.dot.default: (0, 1), aten.addmm.default: (1, 2),
                aten.baddbmm.default: (1, 2), aten.addcmul.default: (1, 2), prims.fma.default: (0, 1)}


def split_forward_zeros(graph: fx.Graph) -> bool:
    """Give the multiplications that read a recomputed forward zeros node their own copy marked FORWARD_VALUE
    (see above); whether the graph changed."""
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ZERO_MAKERS or \
                node.meta.get("partitioner_tag") != "is_forward":
            continue
        users = [u for u in node.users if any(i < len(u.args) and u.args[i] is node
                                              for i in _MULTIPLYING.get(u.target, ()))]
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


def _swap_last(ndim: int) -> list[int]:
    """permute's dims that swap the last two (transpose.int has no inductor lowering, permute has)."""
    return [*range(ndim - 2), ndim - 1, ndim - 2]
