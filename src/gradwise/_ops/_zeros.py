"""How structural zeros arise, travel and meet values through each aten op: ``ZERO_FACTS`` (aten overload packet ->
``ZeroFact``), ``zero_fact``, ``ops_of_kind`` and ``multiplying_args``.

A *structural zero* is an element of a sensitivity that a backward formula made to say "no gradient flows here"
(a slice's padding, a where's unselected branch, relu's dead units). Strong zeros make it annihilate whatever
NaN/Inf it meets. Each op's fact is a data-independent description of what it does to them, by *kind*:

=============  =====================================================================================================
kind           what the op does to structural zeros (its *support*: False at structural zeros)
=============  =====================================================================================================
makes          creates them: ``zeros``/``full(0)``/``fill_(0)`` in a backward formula (``fill``: the fill value's
               argument position, None for ops that can only make zeros)
values         creates values, every element nonzero (``ones``), or draws random ones (``randn_like``)
uninitialised  allocates memory the formula writes later: no support of its own
compares       makes a bool selection mask (``self == result`` in max's backward), read by a product or a where;
               ``undecided``: where the mask selects nothing (an ordering of a NaN, an equality of two NaNs)
logic          combines or tests selection masks (``how``: ``test``, ``not``, ``and``, ``or``)
views          output elements are input elements rearranged (the same view of the support); no new zeros
keeps          each output element is its input element, cast or copied (the same support)
moves          each output element is one input element or a zero the op creates there (slice_backward, cat,
               constant_pad_nd with ``fill``, gather): the same op on the supports, False where it creates
adds           adds input elements with non-negative coefficients, or creates zeros (index_add, scatter_add, the
               pooling and upsampling backwards): != 0 where a supported element lands, from the op on 0/1 numbers
signed         as ``adds`` with coefficients of both signs (bicubic interpolation's backward)
union          adds its operands elementwise (add/sub): a structural zero where every operand is one
reduces        sums over dims (sum, mean): a structural zero where every summed element is one
product        multiplies tensor operands elementwise (mul, div's numerator): a structural zero where a factor at
               ``args`` is one, and there the output is 0 whatever the other factor holds (annihilated)
linear         linear in the sensitivity at ``args``, times a function of values (the activation backwards):
               as ``product``; ``passes`` adds the op's flat region (no gradient passes there)
gates          selects ``passes ? grad : 0`` without multiplying (threshold_backward): support of grad & passes
where          ``where(c, a, b)``: the supports selected the same way
masked_fill    ``masked_fill(g, m, 0)`` in a formula: structural zeros where m
index_fill     ``index_fill(g, dim, i, 0)`` in a formula: structural zeros on the filled slices
bilinear       contracts two tensor operands (mm, conv): zeros of one meet values of the other along the contracted
               dims (``multiplies``: the operands); each consumer has one rule per such op, or none
fma            ``a * b + c`` (prims.fma, inductor's decomposed softmax backward): a product plus a union
=============  =====================================================================================================

``passes`` is a predicate over the op's arguments written against a small mask algebra ``o`` (``o.le``, ``o.ge``,
``o.gt``, ``o.lt``, ``o.abs``, ``o.isnan``, ``o.not_``, ``o.and_``, ``o.or_``; the first operand of ``not_``,
``and_``, ``or_`` is always a fresh mask), so one written fact serves eager tensors and graph nodes alike.
``multiplies`` lists the operands an op multiplies (the trace's products with a value, the compiled pass's
recomputed forward zeros).

Readers: strong zeros' eager rules (``_strong_zeros/_rules_pointwise.py`` registers one rule per kind, and the
bilinear rules per op) and the compiled-graph pass (``_strong_zeros/_compile_rules.py``, one graph rule per kind)
build their tables from this one, so an op's kind is written once; ops whose rule needs more than its kind (the
attention backwards, CTC's, a refinement such as exp's in softmax's backward) keep their own rule in the engine
that can run it, with a docstring saying why. The trace reads ``multiplies`` (``_trace/_facts.py``).

May import: torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["KINDS", "NAN_DISCARDS", "ZERO_FACTS", "ZeroFact", "multiplying_args", "ops_of_kind", "zero_fact"]

KINDS = ("makes", "values", "uninitialised", "compares", "logic", "views", "keeps", "moves", "adds", "signed",
         "union", "reduces", "product", "linear", "gates", "where", "masked_fill", "index_fill", "bilinear", "fma")


@dataclass(frozen=True)
class ZeroFact:
    """What one op does to structural zeros (see the module docstring for the kinds)."""

    kind: str
    args: tuple[int, ...] = ()  # product/linear: the arguments the output is linear in
    passes: Callable[[Any, tuple], Any] | None = None  # linear/gates: where a gradient passes, over ``o``
    fill: int | None = None  # makes/moves: the argument holding the value the op creates
    how: str = ""  # logic: test / not / and / or
    multiplies: tuple[int, ...] = ()  # the tensor operands the op multiplies together
    undecided: Callable[[Any, tuple], Any] | None = None  # compares: where the result selects nothing, over ``o``


ZERO_FACTS: dict[Any, ZeroFact] = {}


def _facts(kind: str, *ops: Any, **fields: Any) -> None:
    assert kind in KINDS, kind
    for op in ops:
        assert op not in ZERO_FACTS, op  # each fact written once
        ZERO_FACTS[op] = ZeroFact(kind, **fields)


def zero_fact(op: Any) -> ZeroFact | None:
    """The fact of an op overload or packet (by overload, then packet, then the packet's name), or None."""
    packet = getattr(op, "overloadpacket", op)
    return ZERO_FACTS.get(op) or ZERO_FACTS.get(packet) or ZERO_FACTS.get(getattr(packet, "_qualified_op_name", None))


def ops_of_kind(*kinds: str) -> list:
    """The packets whose fact is of one of these kinds, in table order."""
    return [op for op, fact in ZERO_FACTS.items() if fact.kind in kinds]


def multiplying_args(op: Any) -> tuple[int, ...]:
    """The operands ``op`` multiplies together (empty where it multiplies none)."""
    fact = zero_fact(op)
    return () if fact is None else fact.multiplies


# -- where gradients pass, over the mask algebra ``o`` (see the module docstring) -------------------------------

def _above_threshold(o: Any, a: tuple) -> Any:
    """threshold_backward(g, x, t): passes where not x <= t (x > t, or x NaN: relu(NaN) = NaN is used)."""
    return o.not_(o.le(a[1], a[2]))


def _inside_bounds(o: Any, a: tuple) -> Any:
    """hardtanh_backward(g, x, lo, hi): passes where not (x <= lo or x >= hi)."""
    return o.not_(o.or_(o.le(a[1], a[2]), o.ge(a[1], a[3])))


def _hardsigmoid_slope(o: Any, a: tuple) -> Any:
    """hardsigmoid_backward(g, x): the slope is nonzero on (-3, 3) (and at NaN)."""
    return o.or_(o.and_(o.gt(a[1], -3), o.lt(a[1], 3)), o.isnan(a[1]))


def _hardswish_slope(o: Any, a: tuple) -> Any:
    """hardswish_backward(g, x): the slope is nonzero above -3 (and at NaN)."""
    return o.or_(o.gt(a[1], -3), o.isnan(a[1]))


def _shrink_slope(o: Any, a: tuple) -> Any:
    """softshrink/hardshrink_backward(g, x, lambd): the slope is nonzero where |x| > lambd (and at NaN)."""
    return o.or_(o.gt(o.abs(a[1]), a[2]), o.isnan(a[1]))


def _either_nan(o: Any, a: tuple) -> Any:
    """lt/le/gt/ge(a, b): decides nothing where a or b is NaN. The comparison is False there, but a NaN is in no
    region: hardsigmoid's backward ``(x > -3) & (x < 3)`` at x = NaN, where hardsigmoid(NaN) = NaN is used (the
    gates' ``passes`` read ``isnan x`` for the same reason)."""
    return o.or_(o.isnan(a[0]), o.isnan(a[1]))


def _both_nan(o: Any, a: tuple) -> Any:
    """eq/ne(a, b): decides nothing where both are NaN (amax's ``self == result`` where the NaN was the maximum);
    one NaN is simply not equal (nanmedian's NaNs are not the median)."""
    return o.and_(o.isnan(a[0]), o.isnan(a[1]))


# -- the table --------------------------------------------------------------------------------------------------

_facts("makes", aten.zeros, aten.zeros_like, aten.new_zeros, aten.zero_)
_facts("makes", aten.scalar_tensor, fill=0)
_facts("makes", aten.full, aten.full_like, aten.fill_, fill=1)
_facts("makes", aten.new_full, fill=2)
_facts("values", aten.ones, aten.ones_like, aten.new_ones)
# random values drawn afresh (a hook returning torch.randn_like(g)): they read only the shape (and, filled in place,
# overwrite every element), so no structural zero survives them; a NaN they then meet is used
_facts("values", aten.randn_like, aten.rand_like, aten.randint_like, aten.normal_, aten.uniform_, aten.random_,
       aten.exponential_, aten.cauchy_, aten.log_normal_, aten.geometric_)
_facts("uninitialised", aten.new_empty_strided, aten.new_empty, aten.empty_like)
_facts("compares", aten.eq, aten.ne, undecided=_both_nan)
_facts("compares", aten.lt, aten.le, aten.gt, aten.ge, undecided=_either_nan)
_facts("logic", aten.isnan, aten.isinf, aten.isfinite, how="test")
_facts("logic", aten.logical_not, aten.bitwise_not, how="not")
_facts("logic", aten.logical_and, aten.logical_and_, aten.bitwise_and, aten.bitwise_and_, how="and")
_facts("logic", aten.logical_or, aten.logical_or_, aten.bitwise_or, aten.bitwise_or_, how="or")
_facts("views", aten.expand, aten.permute, aten.reshape, aten.view, aten.unsqueeze, aten.squeeze, aten.t,
       aten.transpose, aten.slice, aten.select, aten.alias, aten._unsafe_view, aten.expand_copy, aten.permute_copy,
       aten.view_copy)
_facts("keeps", aten._to_copy, prims.convert_element_type, aten.contiguous)
_facts("moves", aten.slice_backward, aten.select_backward, aten.diagonal_backward, aten.cat, aten.stack,
       aten.flip, aten.roll, aten.repeat, aten.gather, aten.index_select, aten.tril, aten.triu, aten.rot90,
       aten.take, aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.index)
_facts("moves", aten.constant_pad_nd, fill=2)
_facts("adds", aten.as_strided_scatter, aten.index_put, aten.index_put_, aten._index_put_impl_,
       aten._unsafe_index_put, aten.index_add, aten.index_add_, aten.scatter, aten.scatter_, aten.scatter_add,
       aten.scatter_add_, aten._unsafe_index, aten.cumsum, aten.diag_embed, aten.unfold_backward, aten.col2im,
       aten.im2col, aten.embedding_dense_backward, aten.max_pool2d_with_indices_backward,
       aten.max_pool3d_with_indices_backward, aten.avg_pool2d_backward, aten.avg_pool3d_backward,
       aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward, aten.upsample_nearest2d_backward,
       aten.upsample_bilinear2d_backward, aten.upsample_nearest1d_backward, aten.upsample_linear1d_backward,
       aten.upsample_trilinear3d_backward, aten.upsample_nearest3d_backward,
       aten._upsample_nearest_exact1d_backward, aten._upsample_nearest_exact2d_backward,
       aten._upsample_nearest_exact3d_backward, aten._upsample_bilinear2d_aa_backward,
       aten.adaptive_max_pool2d_backward, aten.adaptive_max_pool3d_backward, aten.fractional_max_pool2d_backward,
       aten.fractional_max_pool3d_backward, aten.masked_scatter_backward, aten._unsafe_masked_index,
       aten._unsafe_masked_index_put_accumulate, aten.pixel_shuffle, aten.pixel_unshuffle, aten.channel_shuffle,
       aten.native_channel_shuffle, aten.reflection_pad1d_backward, aten.reflection_pad2d_backward,
       aten.reflection_pad3d_backward, aten.replication_pad1d_backward, aten.replication_pad2d_backward,
       aten.replication_pad3d_backward, aten.put, aten.put_, aten.masked_scatter, aten.masked_scatter_,
       aten.masked_select)
_facts("signed", aten.upsample_bicubic2d_backward, aten._upsample_bicubic2d_aa_backward,
       aten._upsample_lanczos2d_aa_backward)  # (lanczos: negative lobes, as bicubic)
_facts("union", aten.add, aten.add_, aten.sub, aten.sub_)
_facts("reduces", aten.sum, aten.mean)
_facts("product", aten.mul, aten.mul_, args=(0, 1), multiplies=(0, 1))
_facts("product", aten.div, aten.div_, args=(0,), multiplies=(0,))
# xlogy(g, y) = g * log(y) and xlog1py(g, y) = g * log1p(y): the backward of xlogy/xlog1py in their first input
_facts("linear", aten.neg, aten.clone, aten.sigmoid_backward, aten.soft_margin_loss_backward, aten.tanh_backward,
       aten.gelu_backward, aten.silu_backward, aten.elu_backward, aten.leaky_relu_backward, aten.softplus_backward,
       aten.mish_backward, aten.log_sigmoid_backward, aten.mse_loss_backward, aten.smooth_l1_loss_backward,
       aten.huber_loss_backward, aten.binary_cross_entropy_backward, aten.logit_backward,
       aten.rrelu_with_noise_backward, aten.xlogy, aten.special_xlog1py, aten._conj_physical, aten.conj_physical,
       args=(0,))
# native_dropout_backward(g, mask, scale) = g * mask * scale (CUDA's dropout, and AOTAutograd's graphs on any device):
# linear in g; its dropped units are a forward value's zeros (CPU's eager dropout is a mul by the mask), not a formula's
_facts("linear", aten.native_dropout_backward, args=(0,))
_facts("linear", aten.hardsigmoid_backward, args=(0,), passes=_hardsigmoid_slope)
_facts("linear", aten.hardswish_backward, args=(0,), passes=_hardswish_slope)
_facts("linear", aten.softshrink_backward, aten.hardshrink_backward, args=(0,), passes=_shrink_slope)
_facts("gates", aten.threshold_backward, passes=_above_threshold)
_facts("gates", aten.hardtanh_backward, passes=_inside_bounds)
_facts("where", aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther)  # not where(c): nonzero
_facts("masked_fill", aten.masked_fill, aten.masked_fill_)
_facts("index_fill", aten.index_fill, aten.index_fill_)
_facts("bilinear", aten.mm, aten.bmm, aten.mv, aten.dot, aten.matmul, aten.outer, aten.linear, aten.einsum,
       aten.tensordot, aten.convolution, aten._convolution, multiplies=(0, 1))
_facts("bilinear", aten.convolution_backward, multiplies=(0, 1, 2))  # (g, x, w): g meets x and w
_facts("bilinear", aten.addmm, aten.baddbmm, aten.addbmm, aten.addmv, multiplies=(1, 2))
_facts("fma", "prims::fma", args=(0, 1), multiplies=(0, 1))  # by name: inductor registers it, on import
_facts("fma", aten.addcmul, aten.addcmul_, args=(1, 2), multiplies=(1, 2))

# Log-space sums: the backward weighs each argument by exp(argument - result) (logsumexp's ``g * exp(x - result)``,
# logaddexp's ``g / (1 + exp(b - a))``, base 2 for logaddexp2). An argument that is exactly -inf (a log(0), a masked
# or unreachable state) has weight exactly 0 where the result is not -inf: a structural zero, as in the program
# without that argument. Forward op -> its autograd node. Strong zeros' rules read the node names (``_exp``,
# ``_logaddexp_weight_div`` in ``_strong_zeros/_rules_pointwise.py``), the trace the forward ops (the op that
# discarded a value, ``_trace/_facts.py``), so both classify such a zero alike.
LOG_SPACE_SUMS: dict[Any, str] = {aten.logsumexp: "LogsumexpBackward0", aten.logaddexp: "LogaddexpBackward0",
                                  aten.logaddexp2: "Logaddexp2Backward0"}

# NaN-discarding selections: fmax/fmin return the other operand where exactly one is NaN (fmax(NaN, 1) = 1), so that
# NaN operand is unused and its gradient a structural zero, as in the program without it. Their formulas pick the
# winner by ordering comparisons of the two operands, where a lone NaN loses: it orders below every number in fmax's
# (True: the op keeps the larger), above in fmin's. torch 2.13's formula fills it already (``other.isnan()``); 2.14's
# (``masked_fill(self < other, 0)``) passes it the whole gradient. Forward op -> (its autograd node, keeps the larger).
# Strong zeros read the node names (``_comparison`` in ``_strong_zeros/_rules_pointwise.py``).
NAN_DISCARDS: dict[Any, tuple[str, bool]] = {aten.fmax: ("FmaxBackward0", True), aten.fmin: ("FminBackward0", False)}
