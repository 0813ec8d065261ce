"""Strong-zero rules for creation, comparison and mask ops, elementwise products and sums, casts, where /
masked_fill, placement backwards (slice/select/index... backward) and copy_.

May import: torch, gradwise._masks, _supports, _rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from gradwise._masks import EagerMasks, mask_any
from gradwise._ops._zeros import LOG_SPACE_SUMS, NAN_DISCARDS, ZERO_FACTS, ZeroFact, zero_fact
from gradwise._strong_zeros._rules import (
    Rule,
    _annihilate,
    _hooked,
    _in_formula,
    _is_float,
    _reads_nodes,
    _register,
    _run_unruled,
)
from gradwise._strong_zeros._supports import _STATE, _Supports, stood_aside_for_the_batch

aten = torch.ops.aten


def _creates_zeros(func, args, kwargs, sup):
    """zeros / zeros_like / new_zeros / scalar_tensor(0) / full(0) / fill_(0) / zero_: a zero made by a
    backward formula stands for "no gradient flows here", so all of it is a structural zero. Zeros made by
    a checkpoint's forward recomputation are values, and stay ordinary."""
    out = func(*args, **kwargs)
    pos = zero_fact(func).fill
    is_zero = pos is None or (not isinstance(args[pos], torch.Tensor) and args[pos] == 0)
    if _in_formula() and is_zero and _is_float(out):
        sup.record(out, torch.zeros((), dtype=torch.bool, device=out.device))
    else:
        sup.record(out, None)
    return out




def _creates_values(func, args, kwargs, sup):
    """ones / ones_like / new_ones: values, every element nonzero (a tracked argument lends only its shape)."""
    return _run_unruled(func, args, kwargs, sup, None)




@_register(aten.broadcast_tensors)
def _broadcast_tensors(func, args, kwargs, sup):
    """broadcast_tensors (met inside a decomposition): expanded views of its inputs, which read their storages'
    masks like any view, so there is nothing to record (marking them fully supported would wipe the inputs')."""
    return func(*args, **kwargs)


def _selected(mask: torch.Tensor, sup: _Supports) -> torch.Tensor | None:
    """The support a formula's bool mask gives a product: False where it is False and meaningful."""
    if mask not in sup.selections:
        return None
    valid = sup.selections[mask]
    return mask if valid is None else mask | ~valid


def _select(out: torch.Tensor, masks: list, sup: _Supports, kind: str = "and") -> None:
    """Record ``out`` (a bool tensor made in a backward formula from ``masks`` by and / or / not) as a selection.
    It is meaningful where its inputs are, and also where one meaningful input decides it alone (a False for
    `and`, a True for `or`). Not a selection if an input is a bool tensor the formula did not make."""
    if not _in_formula():
        return
    bools = [m for m in masks if m.dtype == torch.bool]
    if any(m not in sup.selections for m in bools):
        sup.selections.pop(out, None)  # (in place, ``m &= user_mask``: m is no selection any more)
        return
    valids = [sup.selections[m] for m in bools]
    if all(v is None for v in valids):
        sup.selections[out] = None
        return
    full = [torch.ones((), dtype=torch.bool, device=out.device) if v is None else v for v in valids]
    valid = full[0]
    for v in full[1:]:
        valid = valid & v
    if kind != "not":
        for m, v in zip(bools, full, strict=True):
            valid = valid | ((~m if kind == "and" else m) & v)
    sup.selections[out] = valid.expand(out.shape)


def _same(a: object, b: object) -> bool:
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                      and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


def _comparison(func, args, kwargs, sup):
    """eq/ne/lt/... in a backward formula make a selection mask, meaningless where the shared fact's
    ``undecided`` says the comparison selects nothing: both operands NaN for eq/ne (amax's `self == result`
    where the NaN was the maximum; one NaN is simply not equal), either operand NaN for an ordering
    (hardsigmoid's `x > -3` at a NaN x, used by the forward). A tensor compared with itself (`x == x`, a NaN
    test) is meaningful everywhere."""
    out = func(*args, **kwargs)
    if _in_formula() and out.dtype == torch.bool:
        a, b = args[0], args[1]
        if _same(a, b) or not any(_is_float(t) for t in (a, b)):
            sup.selections[out] = None
        else:
            operands = tuple(t if _is_float(t) else torch.tensor(float(t) if isinstance(t, float) else 0.0,
                                                                 device=out.device) for t in (a, b))
            # a lone NaN decided in fmax's/fmin's formula: undecided where both are NaN (both used), as eq's
            fact = zero_fact(aten.eq if _lone_nan_loses(func, a, b, out) else func)
            undecided = fact.undecided(_PlainMasks, operands)
            sup.selections[out] = (~undecided).expand(out.shape) if bool(undecided.any()) else None
    return out


_ORDERINGS = {aten.lt: True, aten.le: True, aten.gt: False, aten.ge: False}  # True: "a is below b"
_NAN_DISCARD_NODES = dict(NAN_DISCARDS.values())  # node name -> the op keeps the larger operand


def _lone_nan_loses(func, a: object, b: object, out: torch.Tensor) -> bool:
    """In fmax's/fmin's formula (``NAN_DISCARDS``), an ordering of the two operands where exactly one is NaN: that
    NaN loses (below every number in fmax's, above in fmin's), so ``out`` is made True where the NaN is the side it
    says is below (above) and the formula fills that operand's gradient with a structural zero: fmax ignored the NaN.
    torch 2.14's ``masked_fill(self < other, 0)`` otherwise passed it the whole gradient, and a NaN made below it
    (sqrt(-1)) stayed. Finite operands are untouched (bitwise PyTorch's formula). Whether it applied."""
    below = _ORDERINGS.get(func.overloadpacket)
    if below is None or not (_is_float(a) and _is_float(b)):
        return False
    larger = next((keeps for name, keeps in _NAN_DISCARD_NODES.items() if _in_node(name)), None)
    if larger is None:
        return False
    nan, other = (a, b) if below == larger else (b, a)  # the operand that loses this comparison when it is NaN
    out.logical_or_(nan.isnan() & ~other.isnan())
    return True


_comparison.makes_selections = True  # (in place: the mask written is decided again, _mode._overwritten)




def _mask_logic(kind: str) -> Rule:
    def rule(func, args, kwargs, sup):
        out = func(*args, **kwargs)
        if out.dtype == torch.bool:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if kind == "test" and not any(t.dtype == torch.bool for t in tensors):
                if _in_formula():
                    sup.selections[out] = None  # isnan / isinf / isfinite of values: meaningful everywhere
            else:
                _select(out, tensors, sup, "and" if kind == "test" else kind)
        return out

    rule.__doc__ = "Tests and logic on masks in a backward formula (`~isnan(x)`, `a & b`) make selection masks."
    rule.makes_selections = True  # type: ignore[attr-defined]
    return rule




def _product(mult_args: Sequence[int], flat: Callable[[tuple], torch.Tensor] | None = None) -> Rule:
    """Rule factory for pointwise ops linear in the sensitivities at ``mult_args`` (mul, div's numerator, the
    ``*_backward`` of activations): the output is a structural zero wherever one of those is, and there it is
    0 even if the other factor is NaN/Inf. ``flat`` marks extra structural zeros: an activation's flat region
    (relu below 0, hardtanh outside its bounds), where no gradient flows whatever the sensitivity."""

    def product(func, args, kwargs, sup):
        out = func(*args, **kwargs)
        support = None
        if out.dtype == torch.bool:  # mask & mask (nan_to_num's): still a selection where both are meaningful
            _select(out, [a for a in args[:2] if isinstance(a, torch.Tensor)], sup)
            return out
        like = None  # the one factor whose support the output's is
        for i in mult_args:
            a = args[i] if i < len(args) else None
            # a bool mask the backward formula computed selects (max's `self == result`, nansum's
            # `~isnan(self)`): where it is False (and meaningful) no gradient flows, by construction. A bool
            # tensor the forward multiplied by is a value like any other.
            s = _selected(a, sup) if isinstance(a, torch.Tensor) and a.dtype == torch.bool else \
                sup.of(a, broadcast=True)
            if s is not None:
                like = a if support is None else None
                support = s if support is None else _dense(support) & _dense(s)
        if flat is not None:
            f = flat(args)
            support = f if support is None else _dense(support) & f
            like = None
        if support is not None:
            support = support.expand(out.shape)
            _annihilate(out, support)
        sup.record(out, support, like=like if like is not None and like.dtype == out.dtype else None)
        return out

    product.__doc__ = _product.__doc__
    return product


def _dense(m: torch.Tensor) -> torch.Tensor:
    """A broadcast (stride-0) support made whole before a bool and/or: those run ~5x faster on whole masks."""
    return m.contiguous() if 0 in m.stride() else m


def _cast(func, args, kwargs, sup):
    """_to_copy: a float copy of a selection mask stays a selection (see _product); any other copy keeps its
    input's support."""
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        out = func(*args, **kwargs)
        s = _selected(x, sup)
        if _is_float(out) and s is not None:
            sup.record(out, s.expand(out.shape))
        elif out.dtype == torch.bool:
            _select(out, [x], sup)
        return out
    return _linear(func, args, kwargs, sup)


_mul = _product((0, 1))
_linear = _product((0,))  # ops linear in their first argument alone


def _in_node(*names: str) -> bool:
    """Whether the backward formula running now is that of one of these autograd nodes."""
    if _STATE.formula_of is not None:
        return _STATE.formula_of in names
    node = torch._C._current_autograd_node()
    return node is not None and node.name() in names


def _exp_result_mul(func, args, kwargs, sup):
    """mul, as _product. In exp's backward (g * result), a result of exactly 0 is exp(-inf), a masked entry: a
    structural zero when every output being differentiated is finite (see _softmax_backward)."""
    out = _mul(func, args, kwargs, sup)
    result = args[1] if len(args) > 1 else None  # derivatives.yaml: exp's backward is grad * result
    if (_STATE.outputs_finite or _STATE.outputs_batched) and _is_float(result) and _in_formula() \
            and _in_node("ExpBackward0"):
        zero = result == 0
        if not bool(mask_any(zero)):
            return out
        if _STATE.outputs_finite:
            support = (~zero if sup.of(out) is None else sup.of(out) & ~zero).expand(out.shape)
            sup.record(_annihilate(out, support), support)
        else:
            stood_aside_for_the_batch(sup)
    return out


LOGADDEXP_NODES = (LOG_SPACE_SUMS[aten.logaddexp], LOG_SPACE_SUMS[aten.logaddexp2])  # their saved arguments are read


def _logaddexp_weight_div(func, args, kwargs, sup):
    """div, as _linear (the numerator's support). In logaddexp's and logaddexp2's backward (``g / (1 + exp(b -
    a))``, base 2 for logaddexp2) the quotient is a's weight exp(a - result); where a is exactly -inf and b is not,
    the denominator is +inf and the weight exactly 0: the -inf argument itself (a log(0), a masked or unreachable
    log-space state), a structural zero as logsumexp's ``exp(x - result)`` of a -inf entry (_exp). An overflow of
    finite arguments (a - b below -710) is not: neither is -inf there."""
    out = _linear(func, args, kwargs, sup)
    den = args[1] if len(args) > 1 else None
    if not (_in_formula() and isinstance(den, torch.Tensor) and _is_float(den)
            and _in_node(*LOGADDEXP_NODES) and _reads_nodes()):
        return out
    if _STATE.formula_of is not None:  # a compiled backward's graph run op by op: the arguments come with it
        if _STATE.formula_saved is None:
            return out
        a, b = _STATE.formula_saved
    else:
        node = torch._C._current_autograd_node()
        if _hooked(node, "_raw_saved_self", "_raw_saved_other"):  # a checkpoint's allows one unpack: PyTorch's
            return out
        a, b = node._saved_self, node._saved_other
    one_minus_inf = (a == -math.inf) != (b == -math.inf)
    weightless = (den == math.inf) & one_minus_inf.expand(den.shape)
    if bool(mask_any(weightless)):
        s = sup.of(out)
        support = (~weightless if s is None else s & ~weightless).expand(out.shape)
        sup.record(_annihilate(out, support), support)
    return out


def _selecting(passes: Callable[[tuple], torch.Tensor]) -> Rule:
    """Rule factory for activation backwards that select, ``passes(x) ? grad : 0`` (relu's threshold_backward,
    hardtanh's: ReLU6): the region where nothing passes is a structural zero; a NaN input is in none (every
    comparison with NaN is False: PyTorch passes the gradient there, relu(NaN) = NaN is used). The formula never
    multiplies, so where grad is a structural zero (exactly 0) the output is 0 already: nothing to annihilate,
    only the support to compute. That is ATen's CPU and CUDA kernels (a NaN grad where nothing passes gives 0);
    another backend's might multiply, so there the output is annihilated as any product's."""

    def selecting(func, args, kwargs, sup):
        out = func(*args, **kwargs)
        kept = passes(args)
        if kept.shape != out.shape:  # vmap's rule broadcasts an unbatched input against the batched grad
            kept = kept.expand(out.shape).clone()
        s = sup.of(args[0])
        support = kept if s is None else kept.logical_and_(s.expand(out.shape))
        if out.device.type not in ("cpu", "cuda"):
            _annihilate(out, support)
        sup.record(out, support, fresh=True)
        return out

    selecting.__doc__ = _selecting.__doc__
    return selecting




def _glu_backward(func, args, kwargs, sup):
    """glu_backward(g, x, dim): both halves of x's gradient are g times a function of x, so each half is a
    structural zero where g is."""
    out = func(*args, **kwargs)
    s = sup.of(args[0])
    support = None if s is None else torch.cat([s, s], args[2])
    sup.record(_annihilate(out, support), support)
    return out


_register(aten.glu_backward)(_glu_backward)


def _foreach_pairs(base: Any) -> Rule:
    """Rule factory for ``torch._foreach_<op>.List(xs, ys)`` (a custom Function's backward, an optimizer step run
    inside a backward): the list of ``<op>(xs[i], ys[i])``, each through ``<op>``'s own rule, as PyTorch's CPU
    kernel computes it (one op per pair), so each output gets the support its pair's op gives it."""

    def foreach_pairs(func, args, kwargs, sup):
        from gradwise._strong_zeros._rules import lookup

        xs, ys = args[0], args[1]
        if kwargs or len(args) != 2 or len(xs) != len(ys):
            return _run_unruled(func, args, kwargs, sup, "a form its rule does not take")
        rule = lookup(base)
        return [rule(base, (x, y), {}, sup) for x, y in zip(xs, ys, strict=True)]

    foreach_pairs.__doc__ = _foreach_pairs.__doc__
    return foreach_pairs


_register(aten._foreach_mul.List)(_foreach_pairs(aten.mul.Tensor))


def _uninitialised(func, args, kwargs, sup):
    """new_empty(_strided): memory a backward formula allocates and then writes (a circular pad's backward):
    its support is whatever the writes give it."""
    out = func(*args, **kwargs)
    sup.record(out, None)
    return out




# Backward formulas whose exp recomputes softmax weights (exp(x - result)): there a weight of exactly 0 from a
# -inf entry is the masked entry itself. Elsewhere exp is a factor of a derivative (erf's exp(-x**2) at x = inf
# is an arithmetic 0).
_EXP_AS_WEIGHTS = {LOG_SPACE_SUMS[aten.logsumexp]}


@_register(aten.exp)
def _exp(func, args, kwargs, sup):
    """exp in logsumexp's backward (`g * exp(x - result)`): an output that is exactly 0 because its input is
    -inf (a masked or log(0) entry) is a structural zero; an underflow of a finite input is not. Every other
    output is nonzero, a structural zero's too: exp(0) = 1 (its input's support, kept here until 2026-12-07,
    annihilated a custom backward's ``g * exp(n)`` where ``n`` held structural zeros: finite gradients changed,
    a genuine NaN hidden)."""
    out = func(*args, **kwargs)
    x = args[0]
    support = None
    if _in_formula() and _is_float(x) and _in_node(*_EXP_AS_WEIGHTS) and bool(mask_any(x == -math.inf)):
        support = x != -math.inf
    sup.record(out, support)
    return out


def _index_fill(func, args, kwargs, sup):
    """index_fill(g, dim, index, 0) in a backward formula (index_copy's and index_fill's own backward): the
    filled slices were overwritten in the forward, so they are structural zeros; other values are ordinary."""
    self, dim, index, value = args[0], args[1], args[2], args[3]
    before = _full_support(self, sup).expand(self.shape).clone()
    out = func(*args, **kwargs)
    filled = not isinstance(value, torch.Tensor) and value == 0 and _in_formula()
    if filled or sup.tracked(self):
        sup.record(out, before.index_fill(dim, index, not filled))
    return out


def _sum(func, args, kwargs, sup):
    """add / sub (and the engine's gradient accumulation): an element is a structural zero only where it is
    one in every operand; adding never multiplies, so nothing needs annihilating."""
    out = func(*args, **kwargs)
    a, b = args[0], args[1]
    sa, sb = sup.of(a), sup.of(b)
    support = None
    if sa is not None and sb is not None and isinstance(b, torch.Tensor):
        support = (sa | sb).expand(out.shape)
    elif sa is not None and not isinstance(b, torch.Tensor) and b == 0:  # g + 0 (a hook's): zeros stay zeros
        support = sa.expand(out.shape)
    sup.record(out, support)
    return out




def _multiply_add(fact: ZeroFact) -> Rule:
    """Rule factory for ``a * b + c`` ops (``addcmul(c, a, b, value=v)``; the factors at ``fact.args``): where a
    factor is a structural zero the product is one, so the output is ``c`` there even if the other factor is
    NaN/Inf (group norm's decomposed backward from torch 2.14: ``addcmul(-ds, db, mean)``, db a zero where a
    sample is unused, mean NaN); c itself, not ``c + 0``, so a -0.0 there stays -0.0. Elsewhere the op's own
    result, bitwise; a structural zero only where c is one too."""
    factors = fact.args

    def multiply_add(func, args, kwargs, sup):
        c = next(a for i, a in enumerate(args[:3]) if i not in factors)
        product = None
        for i in factors:
            s = sup.of(args[i], broadcast=True)
            if s is not None:
                product = s if product is None else _dense(product) & _dense(s)
        if product is None:
            return _run_unruled(func, args, kwargs, sup, None)
        mutates = func._schema.is_mutable  # addcmul_ writes c: its old values are what the zeros keep
        addend = c.clone() if mutates else c
        out = func(*args, **kwargs)
        if out.requires_grad and torch.is_grad_enabled():  # create_graph: out= cannot be differentiated
            kept = torch.where(product, out, addend.to(out.dtype))
            out = out.copy_(kept) if mutates else kept
        else:
            torch.where(product, out, addend.to(out.dtype), out=out)
        sc = sup.of(c)
        sup.record(out, None if sc is None else (_dense(product) | sc).expand(out.shape))
        return out

    return multiply_add


def _full_support(t: object, sup: _Supports, device: torch.device | None = None) -> torch.Tensor:
    """``t``'s support, all True where it has none recorded; a Python number (where.ScalarSelf/ScalarOther,
    met in decompositions) is a value: fully supported."""
    s = sup.of(t)
    return torch.ones((), dtype=torch.bool, device=device or t.device) if s is None else s


def _zero_literal(x: object) -> bool:
    """A number 0 as a branch of where in a backward formula (``where.ScalarOther(c, g, 0)``): what
    ``scalar_tensor(0)`` is after autograd's decomposition (``_creates_zeros``), which inference mode skips."""
    return not isinstance(x, torch.Tensor) and x == 0 and _in_formula()


def _branch_support(x: object, sup: _Supports, device: torch.device) -> torch.Tensor:
    """A where branch's support: a formula's literal 0 is a structural zero; any other number a value."""
    if _zero_literal(x):
        return torch.zeros((), dtype=torch.bool, device=device)
    return _full_support(x, sup, device)


def _where(func, args, kwargs, sup):
    """where(cond, a, b): selects, so the output's support is selected the same way. This is how the
    unselected branch of a forward ``where`` becomes a structural zero in backward. Where ``cond`` is a
    formula's selection that decides nothing (a comparison of a NaN: ``_comparison``), either branch may
    hold the gradient: the union of their supports (a genuine NaN of hardsigmoid(NaN) stays)."""
    out = func(*args, **kwargs)
    cond, a, b = args
    if sup.tracked(a) or sup.tracked(b) or _zero_literal(a) or _zero_literal(b):
        sa, sb = _branch_support(a, sup, out.device), _branch_support(b, sup, out.device)
        support = torch.where(cond, sa, sb)
        valid = sup.selections.get(cond) if isinstance(cond, torch.Tensor) and cond.dtype == torch.bool else None
        if valid is not None:
            support = torch.where(valid, support, sa | sb)
        sup.record(out, support.expand(out.shape))
    else:
        sup.record(out, None)
    return out




# Nodes whose formula fills a value of the derivative, not a sensitivity the forward discarded: the 2-norm's
# (self / norm).masked_fill_(norm == 0, 0) (norm_backward), PyTorch's subgradient 0 at a zero norm, which the
# formula then multiplies by the sensitivity. The norm used that slice: an infinite sensitivity there (g / norm of
# a zero slice, norm_except_dim's zero slice in weight_norm) is a genuine singular point, NaN as in PyTorch.
FILLS_A_VALUE = frozenset(("LinalgVectorNormBackward0", "NormBackward0", "NormBackward1", "NormBackward2",
                           "NormBackward3", "DistBackward0"))
# a compiled backward names no node: there ``_graph_forms._guarded_division`` finds the same fill by its form,
# ``(x / n).masked_fill(n == 0, 0)``, and runs it as in the formula of this name
GUARDED_DIVISION = "(x / n).masked_fill(n == 0, 0)"


def _masked_fill(func, args, kwargs, sup):
    """masked_fill(g, mask, 0) in a backward formula zeroes what the forward discarded: structural zeros where
    ``mask`` (except in the formulas of ``FILLS_A_VALUE``: there a 0 value of the derivative, no structural zero)."""
    self, mask, value = args[0], args[1], args[2]
    before = _full_support(self, sup)
    out = func(*args, **kwargs)
    filled = not isinstance(value, torch.Tensor) and value == 0 and _in_formula() and not _fills_a_value()
    if filled or sup.tracked(self):
        nonzero = torch.tensor(not filled, device=out.device)
        sup.record(out, torch.where(mask, nonzero, before).expand(out.shape))
    return out




def _fills_a_value() -> bool:
    return _in_node(*FILLS_A_VALUE, GUARDED_DIVISION)


def _placement(func, args, kwargs, sup):
    """Ops that move, gather, pad, pool or sum sensitivities with non-negative coefficients (slice/select
    backward, index_put, scatter, gather, cat, sum, avg/max-pool backward, embedding backward, ...). Running
    the op on the supports as 0/1 numbers gives != 0 exactly where a supported element lands. Elements the op
    creates (a slice's padding, the unselected elements of a max-pool window) are structural zeros. Nothing is
    multiplied by a value, so nothing needs annihilating."""
    return _placement_counts(func, args, kwargs, sup, func(*args, **kwargs))


def _placement_counts(func, args, kwargs, sup, out):
    def as_number(t):
        if not _is_float(t):
            return t
        s = sup.of(t)
        return torch.ones_like(t) if s is None else s.to(t.dtype)

    counts = func(*tree_map(as_number, args), **tree_map(as_number, kwargs))
    for o, c in zip(*(x if isinstance(x, (tuple, list)) else (x,) for x in (out, counts)), strict=True):
        if _is_float(o):
            # != 0, not > 0: a number the op writes may be negative (scatter's value), and it is a value
            sup.record(o, (c.real if c.is_complex() else c) != 0)  # complex counts: 0/1 real parts, imag 0
    return out


def _moved(func, args, kwargs, sup):
    """Ops that copy each output element from at most one input element or create it as 0 (slice/select
    backward, cat, stack, padding, flip, roll, repeat, gather, index_select, tril/triu): the support is the same
    op on the bool supports, False where the op creates zeros, without _placement's float copies and count."""
    out = func(*args, **kwargs)
    if "out" in kwargs:  # an out= overload would write the support into a mask: count on float copies instead
        return _placement_counts(func, args, kwargs, sup, out)

    def as_support(t):
        if not _is_float(t):
            return t
        s = sup.of(t)
        return torch.ones((), dtype=torch.bool, device=t.device).expand(t.shape) if s is None else s

    sup.record(out, func(*tree_map(as_support, args), **tree_map(as_support, kwargs)), fresh=True)
    return out




def _summed(func, args, kwargs, sup):
    """sum / mean (a Linear's bias gradient, the engine's broadcast reductions): an output element is a
    structural zero where every element it adds is one, so its support is the input support's any over the
    reduced dims, one byte reduction (as _placement on 0/1 numbers, without their float copy). Nothing is
    multiplied by a value, so nothing needs annihilating."""
    out = func(*args, **kwargs)
    if not _is_float(out):
        return out
    s = sup.of(args[0])
    if s is None:
        sup.record(out, None)
        return out
    dims = args[1] if len(args) > 1 else kwargs.get("dim")  # (dtype is keyword-only)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    if dims is None or not len(dims):
        support = mask_any(s).reshape((1,) * out.dim() if keepdim else out.shape)
    elif all(isinstance(d, int) for d in dims):
        support = mask_any(s, list(dims), keepdim=keepdim)
    else:  # named dims
        return _placement_counts(func, args, kwargs, sup, out)
    sup.record(out, support.expand(out.shape))
    return out




def _placement_signed(func, args, kwargs, sup):
    """As _placement, for linear maps with weights of both signs (bicubic interpolation's backward): on 0/1
    supports a positive and a negative weight could cancel, so the supports are scaled by random weights in
    [1, 2) first; an output that a supported element reaches is then 0 only by a coincidence of measure zero."""
    out = func(*args, **kwargs)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def as_number(t):
        if not _is_float(t):
            return t
        s = sup.of(t)
        r = (1 + torch.rand(t.shape, generator=gen, dtype=torch.float64)).to(t.device, t.dtype)
        return r if s is None else r * s
    counts = func(*tree_map(as_number, args), **tree_map(as_number, kwargs))
    if _is_float(out):
        sup.record(out, counts != 0)
    return out




def _placement_scaled(func, args, kwargs, sup):
    """As _placement, for an op whose coefficients are values (embedding_bag's backward, scaled by the
    per-sample weights): an output that no supported element reaches is exactly 0, so a NaN/Inf coefficient
    met there is annihilated."""
    out = _placement(func, args, kwargs, sup)
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if _is_float(o) and o.layout == torch.strided:
            _annihilate(o, sup.of(o))
    return out


def bag_of(indices: torch.Tensor, offsets: torch.Tensor | None, offset2bag: torch.Tensor) -> torch.Tensor:
    """The bag each index of an embedding_bag feeds: offset2bag where the forward filled it (it is empty on the
    fast path), else from the bags' start offsets."""
    if offset2bag.numel() == indices.numel() or offsets is None:
        return offset2bag
    pos = torch.arange(indices.numel(), device=indices.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, pos, right=True) - 1


def _embedding_bag_backward(func, args, kwargs, sup):
    """embedding_bag's backward places each bag's g row on the rows its indices name, scaled by the per-sample
    weights. A bag whose g row holds only structural zeros (a bag the output discards) still multiplies its
    weights: a NaN weight there would meet 0 on a row a kept bag shares. Its weights are set to 0 first (they
    meet nothing else), then the rule of `_placement_scaled`."""
    dense = func.overloadpacket is aten._embedding_bag_dense_backward
    at = 8 if dense else 10  # per_sample_weights
    positional = len(args) > at
    s, psw = sup.of(args[0]), args[at] if positional else kwargs.get("per_sample_weights")
    if psw is not None and s is not None and _is_float(psw) and args[0].dim() == 2:
        dead = ~mask_any(s.expand(args[0].shape), 1)
        bags = bag_of(args[1], None if dense else args[2], args[2] if dense else args[3]) if mask_any(dead) else None
        if bags is not None and bags.numel() == psw.numel():
            psw = psw.masked_fill(dead[bags], 0)
            if positional:
                args = (*args[:at], psw, *args[at + 1:])
            else:
                kwargs = {**kwargs, "per_sample_weights": psw}
    return _placement_scaled(func, args, kwargs, sup)


_register(aten._embedding_bag_backward, aten._embedding_bag_dense_backward)(_embedding_bag_backward)


def _copy(func, args, kwargs, sup):
    """copy_(dst, src): dst's elements take src's support (the engine's and CopySlices' way to write a
    gradient into a buffer); copy(dst, src), its functional form in AOTAutograd's graphs: a new tensor, the same."""
    out = func(*args, **kwargs)
    sup.record(out, sup.of(args[1]) if sup.tracked(args[1]) else None)
    return out


_register(aten.copy_, aten.copy)(_copy)


class _PlainMasks(EagerMasks):
    """``gradwise._masks.EagerMasks`` with not_/and_/or_ out of place (operands of any shapes, numbers made tensors
    by the caller): a comparison's ``undecided`` fact reads operands that are not fresh masks."""

    not_, and_, or_ = (staticmethod(f) for f in (torch.logical_not, torch.logical_and, torch.logical_or))


def _passes(fact: ZeroFact) -> Callable[[tuple], torch.Tensor] | None:
    return None if fact.passes is None else lambda args: fact.passes(EagerMasks, args)


# One eager rule per kind of the shared table (gradwise._ops._zeros), where each op's kind is written once. Kind
# left out: "bilinear" (one rule per op, _rules_bilinear); op left out: prims.fma, named by a string (inductor
# registers it), whose rule the graph forms register with inductor's other ops (`_graph_forms.register_graph_ops`).
_KIND_RULES: dict[str, Callable[[ZeroFact], Rule]] = {
    "makes": lambda f: _creates_zeros, "values": lambda f: _creates_values,
    "uninitialised": lambda f: _uninitialised, "compares": lambda f: _comparison,
    "logic": lambda f: _mask_logic(f.how), "views": lambda f: _moved, "keeps": lambda f: _cast,
    "moves": lambda f: _moved, "adds": lambda f: _placement, "signed": lambda f: _placement_signed,
    "union": lambda f: _sum, "reduces": lambda f: _summed,
    "product": lambda f: _mul if f.args == (0, 1) else _linear if f.args == (0,) else _product(f.args),
    "linear": lambda f: _linear if f.args == (0,) and f.passes is None else _product(f.args, flat=_passes(f)),
    "gates": lambda f: _selecting(_passes(f)), "where": lambda f: _where, "masked_fill": lambda f: _masked_fill,
    "index_fill": lambda f: _index_fill, "fma": _multiply_add,
}
# mul's one rule is _rules_bilinear._zero_alpha_mul: its kind's product refined by exp's result in exp's backward
# (_exp_result_mul, here) and by the literal 0 of an alpha = 0 product's backward (a fact of those nodes, there)
_REGISTERED_ELSEWHERE = frozenset((aten.mul, aten.mul_))
for _op, _fact in ZERO_FACTS.items():
    if _fact.kind in _KIND_RULES and _op not in _REGISTERED_ELSEWHERE and not isinstance(_op, str):
        _register(_op)(_KIND_RULES[_fact.kind](_fact))
# A refinement of div's kind rule (the overload is looked up before the packet): logaddexp's weights.
_register(aten.div.Tensor)(_logaddexp_weight_div)
