"""The graph rules of strong zeros over a compiled backward (the engine: ``_compile_pass``).

Each rule is ``rule(rewriter, node) -> support`` (``None``, ``FALSE`` or a bool node, see ``_compile_pass``),
rewriting the node where a structural zero must annihilate what it meets. Which ops take which rule is the shared
table's (``gradwise._ops._zeros``: each op's *kind*, one graph rule per kind, ``_KIND_RULES``); rules for one op
(the bilinear ops, attention) are in ``PASS_RULES``; ``pass_rule`` looks up both. In short:

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

May import: torch (torch.fx), gradwise._ops, gradwise._strong_zeros._pass_windows (and, for type checking
only, _compile_pass).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch._inductor.inductor_prims  # (registers prims.fma, which a rule below names: installed by hand too)
import torch.fx as fx

from gradwise._ops._contractions import attention_keys, attention_rows, conv_input_reads, mm_reads, mm_support
from gradwise._ops._zeros import zero_fact
from gradwise._strong_zeros._pass_windows import slice_window

if TYPE_CHECKING:
    from gradwise._strong_zeros._compile_pass import _Rewriter

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["FALSE", "PASS_RULES", "pass_rule"]

FALSE = "structural-zero"  # the support of a tensor that is a structural zero everywhere

_CAST = prims.convert_element_type.default


def _val(x: object) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x



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

PassRule = Callable[["_Rewriter", fx.Node], Any]


def _zeros(rw: _Rewriter, node: fx.Node) -> Any:
    """makes: FALSE where the value made is 0 (a formula's "no gradient here"), else None."""
    pos = zero_fact(node.target).fill
    value = 0 if pos is None else node.args[pos] if len(node.args) > pos else node.kwargs.get("fill_value", 0)
    return FALSE if isinstance(value, (int, float)) and value == 0 else None


def _view(rw: _Rewriter, node: fx.Node) -> Any:
    """views: the same view of the mask (none for a view that reinterprets the element type)."""
    src = node.args[0]
    mask = rw.of(src)
    if mask is None or mask is FALSE:
        return mask
    if _val(node).dtype != _val(src).dtype:
        return None
    # a mask may be a broadcast (a slice's window, `_pass_windows`) that view cannot reshape: reshape copies it
    target = aten.reshape.default if node.target in (aten.view.default, aten._unsafe_view.default) else node.target
    return rw.call(target, rw.exact(mask, src), *node.args[1:], **node.kwargs)


def _cast(rw: _Rewriter, node: fx.Node) -> Any:
    """keeps: the input's mask."""
    return rw.of(node.args[0])


def _add(rw: _Rewriter, node: fx.Node) -> Any:
    """union: a structural zero where every operand is one; ``x + c`` with c != 0 makes every element nonzero."""
    a, b = node.args[0], node.args[1]
    if not isinstance(b, fx.Node):
        return rw.of(a) if b == 0 else None
    return rw.either(rw.of(a), rw.of(b))


def _linear(rw: _Rewriter, node: fx.Node) -> Any:
    """product/linear: a structural zero where a factor at the fact's ``args`` is one (and outside the op's flat
    region, ``passes``); where the op also reads another tensor (mul's other factor, div's denominator, an
    activation's input) the output is rewritten to 0 there, whatever that tensor holds. A Python number factor
    that is not finite makes no claim (x * inf: 0 x inf is NaN)."""
    fact = zero_fact(node.target)
    mask = None
    for i, a in enumerate(node.args):
        if not isinstance(a, fx.Node):
            if isinstance(a, float) and not math.isfinite(a):
                return None
        elif i in fact.args:
            mask = rw.both(mask, rw.of(a))
    if mask is None:
        return None
    if fact.passes is not None:
        mask = rw.both(mask, fact.passes(_GraphMasks(rw), node.args))
    if sum(isinstance(a, fx.Node) for a in node.args) > 1:
        rw.annihilate(node, mask)
    return mask


def _gate(rw: _Rewriter, node: fx.Node) -> Any:
    """gates: ``passes ? g : 0`` never multiplies: the support of g where the op passes it, nothing rewritten."""
    return rw.both(rw.of(node.args[0]), zero_fact(node.target).passes(_GraphMasks(rw), node.args))


def _fma(rw: _Rewriter, node: fx.Node) -> Any:
    """fma(a, b, c) = a * b + c (softmax's decomposed backward; addcmul(c, a, b)): where a * b is a structural
    zero, c."""
    fact = zero_fact(node.target)
    a, b = (node.args[i] for i in fact.args)
    c = next(x for i, x in enumerate(node.args[:3]) if i not in fact.args)
    value = node.kwargs.get("value", 1)
    product = rw.both(rw.of(a), rw.of(b))
    if product is None or not isinstance(c, fx.Node) or not math.isfinite(value):
        return None
    result = rw.either(product, rw.of(c))
    rw.annihilate(node, product, otherwise=c, result=FALSE if result is FALSE else result)
    return result


_COMPARISONS = {aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.le.Tensor, aten.lt.Tensor,
                aten.ge.Tensor, aten.gt.Tensor}


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
    mask = rw.call(aten.where.self, cond, sa, sb)
    undecided = _undecided(rw, cond)
    if undecided is not None:  # either branch may hold the gradient there
        mask = rw.call(aten.where.self, undecided, rw.call(aten.logical_or.default, sa, sb), mask)
    return mask


def _undecided(rw: _Rewriter, cond: Any) -> Any:
    """Where a backward formula's comparison (through and/or/not) selects nothing, as the shared facts'
    ``undecided`` says (a comparison of a NaN: hardsigmoid's decomposed backward ``where((x > -3) & (x < 3), g / 6,
    0)`` at x = NaN, where hardsigmoid(NaN) = NaN is used); None where it decides everywhere. A comparison the
    partitioner recomputed from the forward (``partitioner_tag == 'is_forward'``, a user's ``where(x > 0, ...)``)
    did select: a NaN there went to the other branch."""
    if _saved_formula_mask(cond):
        return rw.call(aten.logical_not.default, cond)
    if not isinstance(cond, fx.Node) or cond.op != "call_function" or \
            cond.meta.get("partitioner_tag") == "is_forward":
        return None
    fact = zero_fact(cond.target)
    if fact is not None and fact.kind == "compares" and fact.undecided is not None:
        a, b = cond.args[:2]
        if a is b or not any(_floating(_val(t)) for t in (a, b)):
            return None
        return fact.undecided(_GraphMasks(rw, _val(cond).device), (a, b))
    if fact is not None and fact.kind == "logic" and fact.how in ("and", "or", "not"):
        parts = [u for t in cond.args if (u := _undecided(rw, t)) is not None]
        if not parts:
            return None
        undecided = parts[0]
        for part in parts[1:]:
            undecided = rw.call(aten.logical_or.default, undecided, part)
        return undecided
    return None


def _saved_formula_mask(cond: Any) -> bool:
    """A bool mask a backward formula made that the partitioner computed in the forward and saved (inductor's
    hardsigmoid backward ``(x > -3) & (x < 3)``): an input here, whose comparisons are out of sight. A formula's
    mask is an and/or of orderings and equalities, False at a NaN: its True was decided, its False may be a NaN's
    (undecided), as the op-by-op run reads it while the outputs are not finite (``_graph_forms._mask_again``)."""
    return isinstance(cond, fx.Node) and cond.op == "placeholder" and getattr(_val(cond), "dtype", None) is \
        torch.bool and (cond.meta.get("autograd_backward") or cond.meta.get("partitioner_tag") == "is_backward")


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


def _placed_value(rw: _Rewriter, x: Any, others: list) -> Any:
    """The support of a placement's operand ``x`` beside sensitivities among ``others``. A backward is linear in
    its tangents, so a forward value it places into a sensitivity holds only zeros, and they are structural: zeros
    a formula makes that the partitioner saved from the forward, where common-subexpression elimination joined
    them with the forward's own (``h[4:].zero_()``'s ``full_default``). Read as ``x != 0``, no claim is made
    where that fails."""
    mask = rw.of(x)
    if mask is None and isinstance(x, fx.Node) and x not in rw.sens and any(o in rw.sens for o in others) \
            and _floating(_val(x)):
        mask = rw.call(aten.ne.Scalar, x, 0)
        rw._flat[mask] = False  # zeros a formula placed, not a forward value's flat region (`_Rewriter.flat`)
    return mask


def _operand_masks(rw: _Rewriter, node: fx.Node, placed: bool = False) -> dict | None:
    """The masks of ``node``'s floating operands (``placed``: a forward value beside a sensitivity by its zeros,
    `_placed_value`); None where no operand has one."""
    tensors = [a for a in node.all_input_nodes if _floating(_val(a))]
    masks = {a: _placed_value(rw, a, tensors) if placed else rw.of(a) for a in tensors}
    return None if all(m is None for m in masks.values()) else masks


def _moved(rw: _Rewriter, node: fx.Node, placed: bool = False) -> Any:
    """moves: the same op on the masks (True for an operand without one), False where it creates elements, or
    True there where the fact's ``fill`` value is not 0 (constant_pad_nd's). ``placed``: slice/select_scatter,
    where a forward value beside a sensitivity counts by its zeros."""
    fact = zero_fact(node.target)
    fill = 0
    if fact.fill is not None:
        fill = node.args[fact.fill] if len(node.args) > fact.fill else node.kwargs.get("value", 0)
        if not isinstance(fill, (int, float)):
            return None
    masks = _operand_masks(rw, node, placed)
    if masks is None:
        return None
    if all(m is FALSE for m in masks.values()) and fill == 0:
        return FALSE
    args = fx.node.map_arg(node.args, lambda a: rw.exact(masks[a], a) if a in masks else a)
    if fact.fill is not None and len(args) > fact.fill:
        args = (*args[:fact.fill], fill != 0, *args[fact.fill + 1:])
    return rw.call(node.target, *args, **node.kwargs)


def _placed(rw: _Rewriter, node: fx.Node) -> Any:
    """slice_scatter/select_scatter: ``moves``, a forward value beside a sensitivity counted by its zeros. Where
    the placed operand's mask does not vary along the dim (none, a constant: every slice's backward; a window of
    an earlier slice on another dim), it is ``where(window, src, base)`` with the window made of index
    comparisons (`_pass_windows`, which says why: a bool ``slice_scatter`` keeps inductor from vectorizing the
    kernel, and finite gradients came out an ulp off). A placed mask that varies along the dim keeps the
    scatter on masks."""
    masks = _operand_masks(rw, node, placed=True)
    if masks is None or not isinstance(node.args[1], fx.Node):
        return _moved(rw, node, placed=True)
    base, src = node.args[0], node.args[1]
    base_mask, src_mask = masks.get(base) if isinstance(base, fx.Node) else None, masks.get(src)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    select = node.target is aten.select_scatter.default
    window = slice_window(rw, node)
    if window is None:
        return _moved(rw, node, placed=True)
    if isinstance(src_mask, fx.Node):
        shape, nd = list(_val(src_mask).shape), _val(node).dim()
        d = dim % nd
        if select:  # the placed value has no such dim: its mask, exactly, with a dim of 1 there
            src_mask = rw.call(aten.unsqueeze.default, rw.exact(src_mask, src), d)
        elif len(shape) >= nd - d and shape[d - nd] != 1:  # (right-aligned: a shorter mask broadcasts)
            return _moved(rw, node, placed=True)
    outside = FALSE if base_mask is FALSE else rw.both(rw.call(aten.logical_not.default, window), base_mask)
    return rw.either(rw.both(window, src_mask), outside)


def _counted(rw: _Rewriter, node: fx.Node) -> Any:
    """adds: the op on 0/1 numbers in place of the masks (1 for an operand without one) is != 0 exactly where a
    supported element lands (the coefficients are non-negative; a number the op writes, scatter's value, may
    be negative: a value, so != 0 rather than > 0)."""
    masks = _operand_masks(rw, node)
    if masks is None:
        return None
    if all(m is FALSE for m in masks.values()):
        return FALSE
    args = fx.node.map_arg(node.args, lambda a: rw.call(_CAST, rw.exact(masks[a], a), _val(a).dtype)
                           if a in masks else a)
    return rw.call(aten.ne.Scalar, rw.call(node.target, *args, **node.kwargs), 0)


def _sum(rw: _Rewriter, node: fx.Node) -> Any:
    """reduces: any of the mask over the summed dims."""
    x = node.args[0]
    mask = rw.of(x)
    if mask is None or mask is FALSE:
        return mask
    full = rw.exact(mask, x)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None or len(dims) == 0:
        return rw.call(aten.any.default, full)
    return rw.call(aten.any.dims, full, list(dims), keepdim)


def _mm(rw: _Rewriter, node: fx.Node) -> Any:
    """out[i, j] = sum_k A[i, k] B[k, j], supports and reads from the shared fact (``_contractions.mm_support``,
    ``mm_reads``). A row k of the value B that only structural zeros of the sensitivity A read is zeroed (its
    NaN/Inf met only zeros); the output's row i is a structural zero where A's row i is. Structural zeros of A not
    aligned with whole columns leave B alone: a NaN may stay (checked at run time)."""
    a, b = node.args[:2]
    ma, mb = rw.of(a), rw.of(b)
    if ma is None and mb is None:
        return None
    o = _GraphMasks(rw)
    out_masks = []
    new_a, new_b = a, b
    if ma is FALSE or mb is FALSE:
        out = FALSE
    else:
        # a copy of the value operand (extern mm input: nothing fuses it) only for zeros a formula placed
        for slot, (m, value) in enumerate(((ma, b), (mb, a))):
            if m is None:
                continue
            full = rw.exact(m, node.args[slot])
            if not rw.flat(m):
                cleaned = rw.call(aten.where.self, mm_reads(o, slot, full), value, rw.zero(value))
                new_a, new_b = (new_a, cleaned) if slot == 0 else (cleaned, new_b)
            out_masks.append(mm_support(o, slot, full))
        out = out_masks[0] if len(out_masks) == 1 else rw.both(*out_masks)
    if out is FALSE:  # all of A (or B) is structural zero: so is the product, whatever the other holds
        rw.annihilate(node, FALSE)
        return FALSE
    rw.rewire(node, new_a, new_b, *node.args[2:])
    return out


def _convolution_backward(rw: _Rewriter, node: fx.Node) -> Any:
    """convolution_backward(g, x, w, ...) -> (grad_input, grad_weight, grad_bias). An input position that no
    supported output position reads in any channel (the shared fact, ``_contractions.conv_input_reads``) meets
    only structural zeros of g: it is zeroed in x before the weight gradient (its NaN/Inf met only zeros), and
    grad_input there is a structural zero (set to 0: a NaN/Inf in w met only zeros there too). Positions a
    supported output reads keep their values: a NaN there that only structural channels meet may stay (the runtime
    check re-runs that backward op by op). Not transposed. Where g's zeros all mark relu's dead units
    (``_Rewriter.flat``) there is no rule: the reads would cost a second convolution per layer (7% of a compiled
    CNN step) for a NaN that is rare there and that the runtime check still catches. Returns a tuple of supports,
    one per output, read by ``operator.getitem``."""
    g, x = node.args[:2]
    mg = rw.of(g)
    if mg is None or mg is FALSE or node.args[7] or rw.of(x) is not None:
        return None
    if rw.flat(mg):  # relu's dead units only: a second convolution to find what they read buys little (as `_mm`)
        return None
    read = conv_input_reads(_GraphMasks(rw), node.args, rw.exact(mg, g))  # [N, 1, *in]
    rw.rewire(node, g, rw.call(aten.where.self, read, x, rw.zero(x)), *node.args[2:])
    return (read, None, None)


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
    o = _GraphMasks(rw)
    rows3 = attention_rows(o, kept)  # [B, H, Lq]: a query row with a supported element
    # [B, H, 1, 1]: a (batch, head) with a kept row (the mask's structure is not read: a superset)
    used = o.unsqueeze(attention_keys(o, rows3), -1)
    rows = o.unsqueeze(rows3, -1)
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


class _GraphMasks:
    """The mask algebra the shared facts are written in (``gradwise._ops._zeros``' ``passes``,
    ``gradwise._ops._contractions``' support formulas), as graph nodes (``gradwise._masks.EagerMasks`` on
    tensors)."""

    def __init__(self, rw: _Rewriter, device: Any = None) -> None:
        self.rw, self.device = rw, device

    def _compare(self, name: str, a: Any, b: Any) -> fx.Node:
        packet = getattr(aten, name)
        return self.rw.call(packet.Tensor if isinstance(b, fx.Node) else packet.Scalar, a, b)

    def le(self, a: Any, b: Any) -> fx.Node:
        return self._compare("le", a, b)

    def ge(self, a: Any, b: Any) -> fx.Node:
        return self._compare("ge", a, b)

    def gt(self, a: Any, b: Any) -> fx.Node:
        return self._compare("gt", a, b)

    def lt(self, a: Any, b: Any) -> fx.Node:
        return self._compare("lt", a, b)

    def abs(self, a: Any) -> fx.Node:
        return self.rw.call(aten.abs.default, a)

    def isnan(self, a: Any) -> fx.Node:
        if not isinstance(a, fx.Node):  # a Python number compared with (no zero a formula placed: `flat`)
            node = self.rw.call(aten.full.default, [], isinstance(a, float) and math.isnan(a), dtype=torch.bool,
                                device=self.device, pin_memory=False)
            self.rw.flat_zeros.add(node)
            return node
        return self.rw.call(aten.isnan.default, a)

    def not_(self, m: fx.Node) -> fx.Node:
        return self.rw.call(aten.logical_not.default, m)

    def and_(self, a: fx.Node, b: fx.Node) -> fx.Node:
        return self.rw.call(aten.logical_and.default, a, b)

    def or_(self, a: fx.Node, b: fx.Node) -> fx.Node:
        return self.rw.call(aten.logical_or.default, a, b)

    both = and_

    def any(self, m: fx.Node, dims: list[int], keepdim: bool) -> fx.Node:
        return self.rw.call(aten.any.dims, m, list(dims), keepdim)

    def swap_last(self, m: fx.Node) -> fx.Node:
        return self.rw.call(aten.permute.default, m, _swap_last(_val(m).dim()))

    def unsqueeze(self, m: fx.Node, dim: int) -> fx.Node:
        return self.rw.call(aten.unsqueeze.default, m, dim)

    def shape(self, t: fx.Node) -> tuple:
        return tuple(_val(t).shape)

    def ones(self, like: fx.Node, shape: list) -> fx.Node:
        v = _val(like)
        return self.rw.call(aten.full.default, list(shape), 1.0, dtype=v.dtype, device=v.device, pin_memory=False)

    def cast(self, m: fx.Node, like: fx.Node) -> fx.Node:
        return self.rw.call(_CAST, m, _val(like).dtype)

    def narrow(self, t: fx.Node, dim: int, start: int, length: int) -> fx.Node:
        return self.rw.call(aten.slice.Tensor, t, dim, start, start + length)

    def call(self, op: Any, *args: Any) -> fx.Node:
        return self.rw.call(op, *args)

    def pick(self, result: fx.Node, i: int) -> fx.Node:
        return self.rw.call(operator.getitem, result, i)


# One graph rule per kind of the shared table; kinds left out have no graph rule (support None: a NaN may stay and
# the runtime check re-runs the backward op by op): compares/logic (masks, not sensitivities), values,
# uninitialised, signed, masked_fill/index_fill (decomposed into where before this pass), bilinear (per op below).
_KIND_RULES: dict[str, PassRule] = {
    "makes": _zeros, "views": _view, "keeps": _cast, "moves": _moved, "adds": _counted, "union": _add,
    "reduces": _sum, "product": _linear, "linear": _linear, "gates": _gate, "where": _where, "fma": _fma,
}
# Rules for one op: the bilinear ops with a graph rule, the CPU flash attention backward, a multi-output op's
# getitem, and slice/select_scatter's refinement of ``moves``.
PASS_RULES: dict[Any, PassRule] = {
    aten.mm.default: _mm, aten.bmm.default: _mm, aten.convolution_backward.default: _convolution_backward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _attention_backward,
    operator.getitem: _getitem, aten.slice_scatter.default: _placed, aten.select_scatter.default: _placed,
}


def pass_rule(target: Any) -> PassRule | None:
    """The graph rule of a node's target: its own, else its kind's, else None."""
    rule = PASS_RULES.get(target)
    if rule is None:
        fact = zero_fact(target)
        rule = None if fact is None else _KIND_RULES.get(fact.kind)
    return rule


def _makes(target: Any) -> bool:
    fact = zero_fact(target)
    return fact is not None and fact.kind == "makes"


def _swap_last(ndim: int) -> list[int]:
    """permute's dims that swap the last two (transpose.int has no inductor lowering, permute has)."""
    return [*range(ndim - 2), ndim - 1, ndim - 2]
