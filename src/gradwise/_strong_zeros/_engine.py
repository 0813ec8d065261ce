"""Strong zeros: a structurally-zero sensitivity annihilates whatever it meets, NaN and Inf included.

How it works (docs/strong-zeros-design.md)
------------------------------------------
Before every backward under strong zeros, ``_plan`` walks the graph. Contamination needs a structural zero
(born where a backward pads, selects or has a flat region: slice, where, relu, ...) to meet a NaN/Inf from a
saved tensor or a singular point (x / 0). When none can meet, plain PyTorch runs untouched (bitwise). When one
can, the backward runs once under ``_StrongZeroMode``: a TorchDispatchMode that keeps, for every tensor the
backward writes, its *support* (the elements that may be nonzero; the others are structural zeros). The rules
in ``RULES`` say how supports arise and travel (views share their storage's mask, ``add`` unites, ``mul``
intersects), and they annihilate NaN/Inf wherever an element outside the support multiplies it. Graphs with
nodes gradwise knows nothing about (custom Functions, rarer ops) run once under the mode as well: the
strong-zero result differs from PyTorch's only where PyTorch computed 0 x NaN, 0 x Inf or 0 / 0, which is NaN,
and that NaN either reaches a gradient or is dropped by a later selection, where both agree. Backwards the mode
cannot read or follow (torch.func transforms, batched gradients, complex/sparse/mkldnn/nested tensors) run as
plain PyTorch with a warning (_contract.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _contract
from gradwise._checks import as_tensors, check_differentiable, check_scalar_or_seeded
from gradwise._compile import compiled_run
from gradwise._masks import mask_all, mask_any
from gradwise._traced import traced

aten = torch.ops.aten

__all__ = ["RULES", "backward", "grad", "strong_zeros", "unruled_ops"]


# ---------------------------------------------------------------------------------------------------------
# Supports: one bool mask per storage, so that every view of a tensor sees (and in-place ops update) the same
# mask. A storage without a mask is fully supported.
# ---------------------------------------------------------------------------------------------------------


class _Supports:
    def __init__(self) -> None:
        self._masks: dict[int, tuple[StorageWeakRef, int, torch.Tensor]] = {}
        # bool masks a backward formula computed (max's `self == result`, nansum's `~isnan(self)`) -> where the
        # mask is meaningful (None: everywhere). A comparison with NaN is False without selecting anything.
        self.selections = WeakTensorKeyDictionary()

    def _entry(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.layout != torch.strided:  # sparse/nested tensors keep no mask: fully supported
            return None
        storage = t.untyped_storage()
        entry = self._masks.get(storage._cdata)
        if entry is None:
            return None
        ref, itemsize, mask = entry
        if ref.expired() or itemsize != t.element_size():
            del self._masks[storage._cdata]
            return None
        return mask

    def of(self, t: object) -> torch.Tensor | None:
        """The support of ``t`` (bool, shaped like t), or None when every element may be nonzero."""
        if not isinstance(t, torch.Tensor):
            return None
        mask = self._entry(t)
        if mask is None:
            return None
        return mask.as_strided(t.shape, t.stride(), t.storage_offset())

    def tracked(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and self._entry(t) is not None

    def record(self, t: torch.Tensor, support: torch.Tensor | None) -> None:
        """Set the support of ``t``'s elements (None: all may be nonzero)."""
        if t.layout != torch.strided:
            return
        mask = self._entry(t)
        if support is None:
            if mask is not None:
                mask.as_strided(t.shape, t.stride(), t.storage_offset()).fill_(True)
            return
        if mask is None:
            if mask_all(support):
                return
            storage = t.untyped_storage()
            mask = torch.ones(storage.nbytes() // t.element_size(), dtype=torch.bool, device=t.device)
            self._masks[storage._cdata] = (StorageWeakRef(storage), t.element_size(), mask)
        mask.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(support.expand(t.shape))


# ---------------------------------------------------------------------------------------------------------
# The rule table. A rule runs the op itself and records the supports of its outputs:
#     rule(func, args, kwargs, supports) -> output
# ---------------------------------------------------------------------------------------------------------

Rule = Callable[[Any, tuple, dict, _Supports], Any]
RULES: dict[Any, Rule] = {}


def _register(*ops: Any) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        for op in ops:
            RULES[op] = rule
        return rule

    return register


def lookup(func: Any) -> Rule | None:
    """The strong-zero rule for an op (overload first, then its packet, then its name 'ns::op' for the rules of
    libraries that may load later: gw.register_rule); None when it has none."""
    packet = func.overloadpacket
    return RULES.get(func) or RULES.get(packet) or RULES.get(packet._qualified_op_name)


def _is_float(t: object) -> bool:
    """A real floating-point dense tensor: what supports follow (a sparse result of a backward is not)."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided


def _in_formula() -> bool:
    """True while a backward formula runs (not a checkpoint's forward recomputation inside backward)."""
    return not torch.is_grad_enabled() or _STATE.create_graph


def _annihilate(out: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    if support is not None:
        out.masked_fill_(~support.expand(out.shape), 0)
    return out


def _creates_zeros(func, args, kwargs, sup):
    """zeros / zeros_like / new_zeros / scalar_tensor(0) / full(0) / fill_(0) / zero_: a zero made by a
    backward formula stands for "no gradient flows here", so all of it is a structural zero. Zeros made by
    a checkpoint's forward recomputation are values, and stay ordinary."""
    out = func(*args, **kwargs)
    fill = {aten.scalar_tensor: 0, aten.full: 1, aten.full_like: 1, aten.new_full: 2, aten.fill_: 1}
    pos = fill.get(func.overloadpacket)
    is_zero = pos is None or (not isinstance(args[pos], torch.Tensor) and args[pos] == 0)
    if _in_formula() and is_zero and _is_float(out):
        sup.record(out, torch.zeros((), dtype=torch.bool, device=out.device))
    else:
        sup.record(out, None)
    return out


_register(aten.zeros, aten.zeros_like, aten.new_zeros, aten.scalar_tensor, aten.full, aten.full_like,
          aten.new_full, aten.fill_, aten.zero_)(_creates_zeros)


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
    """eq/ne/lt/... in a backward formula make a selection mask. Where both operands are NaN the comparison is
    False without selecting anything (amax's `self == result` where the NaN was the maximum), so the mask
    means nothing there; one NaN operand is simply not equal (nanmedian's NaNs are not the median). A tensor
    compared with itself (`x == x`, a NaN test) is meaningful everywhere."""
    out = func(*args, **kwargs)
    if _in_formula() and out.dtype == torch.bool:
        a, b = args[0], args[1]
        if _same(a, b) or not any(_is_float(t) for t in (a, b)):
            sup.selections[out] = None
        else:
            nan = [t.isnan() if _is_float(t) else torch.tensor(isinstance(t, float) and math.isnan(t),
                                                                device=out.device) for t in (a, b)]
            both = nan[0] & nan[1]
            sup.selections[out] = (~both).expand(out.shape) if bool(both.any()) else None
    return out


_register(aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge)(_comparison)


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
    return rule


_register(aten.isnan, aten.isinf, aten.isfinite)(_mask_logic("test"))
_register(aten.logical_not, aten.bitwise_not)(_mask_logic("not"))
_register(aten.logical_and, aten.logical_and_, aten.bitwise_and, aten.bitwise_and_)(_mask_logic("and"))
_register(aten.logical_or, aten.logical_or_, aten.bitwise_or, aten.bitwise_or_)(_mask_logic("or"))


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
        for i in mult_args:
            a = args[i] if i < len(args) else None
            # a bool mask the backward formula computed selects (max's `self == result`, nansum's
            # `~isnan(self)`): where it is False (and meaningful) no gradient flows, by construction. A bool
            # tensor the forward multiplied by is a value like any other.
            s = _selected(a, sup) if isinstance(a, torch.Tensor) and a.dtype == torch.bool else sup.of(a)
            if s is not None:
                support = s if support is None else support & s
        if flat is not None:
            f = flat(args)
            support = f if support is None else support & f
        if support is not None:
            support = support.expand(out.shape)
            _annihilate(out, support)
        sup.record(out, support)
        return out

    product.__doc__ = _product.__doc__
    return product


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
    node = torch._C._current_autograd_node()
    return node is not None and node.name() in names


@_register(aten.mul, aten.mul_)
def _exp_result_mul(func, args, kwargs, sup):
    """mul, as _product. In exp's backward (g * result), a result of exactly 0 is exp(-inf), a masked entry: a
    structural zero when every output being differentiated is finite (see _softmax_backward)."""
    out = _mul(func, args, kwargs, sup)
    result = args[1] if len(args) > 1 else None  # derivatives.yaml: exp's backward is grad * result
    if _STATE.outputs_finite and _is_float(result) and _in_formula() and _in_node("ExpBackward0"):
        zero = result == 0
        if bool(mask_any(zero)):
            support = (~zero if sup.of(out) is None else sup.of(out) & ~zero).expand(out.shape)
            sup.record(_annihilate(out, support), support)
    return out


_register(aten._to_copy)(_cast)
# xlogy(g, y) = g * log(y) and xlog1py(g, y) = g * log1p(y): the backward of xlogy/xlog1py in their first input
_register(aten.div, aten.div_, aten.neg, aten.clone, aten.sigmoid_backward, aten.soft_margin_loss_backward,
          aten.tanh_backward, aten.gelu_backward, aten.silu_backward, aten.elu_backward, aten.leaky_relu_backward,
          aten.softplus_backward, aten.mish_backward, aten.log_sigmoid_backward, aten.mse_loss_backward,
          aten.smooth_l1_loss_backward, aten.huber_loss_backward, aten.binary_cross_entropy_backward,
          aten.logit_backward, aten.rrelu_with_noise_backward, aten.xlogy, aten.special_xlog1py)(_linear)
# a NaN input is in no flat region: PyTorch passes the gradient there (relu(NaN) = NaN is used)
_register(aten.threshold_backward)(_product((0,), flat=lambda a: (a[1] > a[2]) | a[1].isnan()))
_register(aten.hardtanh_backward)(_product((0,), flat=lambda a: (a[1] > a[2]) & (a[1] < a[3]) | a[1].isnan()))
_register(aten.hardsigmoid_backward)(_product((0,), flat=lambda a: (a[1] > -3) & (a[1] < 3) | a[1].isnan()))
_register(aten.hardswish_backward)(_product((0,), flat=lambda a: (a[1] > -3) | a[1].isnan()))
_register(aten.softshrink_backward, aten.hardshrink_backward)(_product((0,), flat=lambda a: (a[1].abs() > a[2])
                                                                      | a[1].isnan()))


def _glu_backward(func, args, kwargs, sup):
    """glu_backward(g, x, dim): both halves of x's gradient are g times a function of x, so each half is a
    structural zero where g is."""
    out = func(*args, **kwargs)
    s = sup.of(args[0])
    support = None if s is None else torch.cat([s, s], args[2])
    sup.record(_annihilate(out, support), support)
    return out


_register(aten.glu_backward)(_glu_backward)


def _uninitialised(func, args, kwargs, sup):
    """new_empty(_strided): memory a backward formula allocates and then writes (a circular pad's backward):
    its support is whatever the writes give it."""
    out = func(*args, **kwargs)
    sup.record(out, None)
    return out


_register(aten.new_empty_strided, aten.new_empty, aten.empty_like)(_uninitialised)


# Backward formulas whose exp recomputes softmax weights (exp(x - result)): there a weight of exactly 0 from a
# -inf entry is the masked entry itself. Elsewhere exp is a factor of a derivative (erf's exp(-x**2) at x = inf
# is an arithmetic 0).
_EXP_AS_WEIGHTS = {"LogsumexpBackward0"}


@_register(aten.exp)
def _exp(func, args, kwargs, sup):
    """exp in logsumexp's backward (`g * exp(x - result)`): an output that is exactly 0 because its input is
    -inf (a masked or log(0) entry) is a structural zero; an underflow of a finite input is not."""
    out = func(*args, **kwargs)
    x = args[0]
    support = sup.of(x)
    if _in_formula() and _is_float(x) and _in_node(*_EXP_AS_WEIGHTS) and bool(mask_any(x == -math.inf)):
        support = (x != -math.inf) if support is None else support & (x != -math.inf)
    sup.record(out, support)
    return out


@_register(aten.index_fill, aten.index_fill_)
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
    sup.record(out, support)
    return out


_register(aten.add, aten.add_, aten.sub, aten.sub_)(_sum)


def _full_support(t: object, sup: _Supports, device: torch.device | None = None) -> torch.Tensor:
    """``t``'s support, all True where it has none recorded; a Python number (where.ScalarSelf/ScalarOther,
    met in decompositions) is a value: fully supported."""
    s = sup.of(t)
    return torch.ones((), dtype=torch.bool, device=device or t.device) if s is None else s


def _where(func, args, kwargs, sup):
    """where(cond, a, b): selects, so the output's support is selected the same way. This is how the
    unselected branch of a forward ``where`` becomes a structural zero in backward."""
    out = func(*args, **kwargs)
    cond, a, b = args
    if sup.tracked(a) or sup.tracked(b):
        sup.record(out, torch.where(cond, _full_support(a, sup, out.device),
                                    _full_support(b, sup, out.device)).expand(out.shape))
    else:
        sup.record(out, None)
    return out


_register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther)(_where)


def _masked_fill(func, args, kwargs, sup):
    """masked_fill(g, mask, 0) in a backward formula zeroes what the forward discarded: structural zeros."""
    self, mask, value = args[0], args[1], args[2]
    before = _full_support(self, sup)
    out = func(*args, **kwargs)
    filled = not isinstance(value, torch.Tensor) and value == 0 and _in_formula()
    if filled or sup.tracked(self):
        nonzero = torch.tensor(not filled, device=out.device)
        sup.record(out, torch.where(mask, nonzero, before).expand(out.shape))
    return out


_register(aten.masked_fill, aten.masked_fill_)(_masked_fill)


def _placement(func, args, kwargs, sup):
    """Ops that move, gather, pad, pool or sum sensitivities with non-negative coefficients (slice/select
    backward, index_put, scatter, gather, cat, sum, avg/max-pool backward, embedding backward, ...). Running
    the op on the supports as 0/1 numbers gives > 0 exactly where a supported element lands. Elements the op
    creates (a slice's padding, the unselected elements of a max-pool window) are structural zeros. Nothing is
    multiplied by a value, so nothing needs annihilating."""
    out = func(*args, **kwargs)

    def as_number(t):
        if not _is_float(t):
            return t
        s = sup.of(t)
        return torch.ones_like(t) if s is None else s.to(t.dtype)

    counts = func(*tree_map(as_number, args), **tree_map(as_number, kwargs))
    for o, c in zip(*(x if isinstance(x, (tuple, list)) else (x,) for x in (out, counts)), strict=True):
        if _is_float(o):
            sup.record(o, c > 0)
    return out


_register(aten.slice_backward, aten.select_backward, aten.diagonal_backward, aten.as_strided_scatter,
          aten.slice_scatter, aten.select_scatter, aten.index_put, aten.index_put_, aten._index_put_impl_,
          aten._unsafe_index_put, aten.index_add, aten.index_add_, aten.scatter, aten.scatter_,
          aten.scatter_add, aten.scatter_add_, aten.gather, aten.index_select, aten.index,
          aten._unsafe_index, aten.cat, aten.stack, aten.sum, aten.mean, aten.cumsum, aten.constant_pad_nd,
          aten.repeat, aten.flip, aten.roll, aten.diag_embed, aten.tril, aten.triu, aten.unfold_backward,
          aten.col2im, aten.im2col, aten.embedding_dense_backward, aten.max_pool2d_with_indices_backward,
          aten.max_pool3d_with_indices_backward, aten.avg_pool2d_backward, aten.avg_pool3d_backward,
          aten._adaptive_avg_pool2d_backward, aten._adaptive_avg_pool3d_backward,
          aten.upsample_nearest2d_backward, aten.upsample_bilinear2d_backward,
          aten.upsample_nearest1d_backward, aten.upsample_linear1d_backward, aten.upsample_trilinear3d_backward,
          aten.upsample_nearest3d_backward, aten._upsample_nearest_exact1d_backward,
          aten._upsample_nearest_exact2d_backward, aten._upsample_nearest_exact3d_backward,
          aten._upsample_bilinear2d_aa_backward, aten.adaptive_max_pool2d_backward,
          aten.adaptive_max_pool3d_backward, aten.fractional_max_pool2d_backward, aten.pixel_shuffle,
          aten.pixel_unshuffle, aten.channel_shuffle, aten.native_channel_shuffle, aten.reflection_pad1d_backward,
          aten.reflection_pad2d_backward, aten.reflection_pad3d_backward, aten.replication_pad1d_backward,
          aten.replication_pad2d_backward, aten.replication_pad3d_backward, aten.expand_copy,
          aten.permute_copy, aten.view_copy, aten._unsafe_view, aten.contiguous, aten.put, aten.put_,
          aten.masked_scatter, aten.masked_scatter_, aten.masked_select)(_placement)


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


_register(aten.upsample_bicubic2d_backward, aten._upsample_bicubic2d_aa_backward)(_placement_signed)


def _placement_scaled(func, args, kwargs, sup):
    """As _placement, for an op whose coefficients are values (embedding_bag's backward, scaled by the
    per-sample weights): an output that no supported element reaches is exactly 0, so a NaN/Inf coefficient
    met there is annihilated."""
    out = _placement(func, args, kwargs, sup)
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if _is_float(o) and o.layout == torch.strided:
            _annihilate(o, sup.of(o))
    return out


_register(aten._embedding_bag_backward, aten._embedding_bag_dense_backward)(_placement_scaled)


def _copy(func, args, kwargs, sup):
    """copy_(dst, src): dst's elements take src's support (the engine's and CopySlices' way to write a
    gradient into a buffer)."""
    out = func(*args, **kwargs)
    sup.record(out, sup.of(args[1]) if sup.tracked(args[1]) else None)
    return out


_register(aten.copy_)(_copy)


CountArgs = Callable[[tuple, int, list[int]], Callable[[list], list]]
Restrict = Callable[[tuple, int, torch.Tensor], "list | None"]
Meets = Callable[[Any, tuple, int, torch.Tensor, list[int]], bool]


def _nonfinite_part(func, args, slot: int, s: torch.Tensor, value_slots: list[int], dirty: list[int],
                    count_args: CountArgs):
    """The NaN/Inf that terms with a *supported* sensitivity element contribute to a bilinear op, counted by
    running the op on 0/1 indicators: terms that meet NaN (or 0 x Inf), +Inf, and -Inf. ``count_args`` may
    shrink those runs (e.g. to the contraction indices where a value is non-finite)."""
    sens = args[slot]
    shrink = count_args(args, slot, dirty)

    shrunk = shrink([*args])

    def run(s_ind, value_ind):
        new = list(args)
        new[slot] = s_ind
        new = shrink(new)
        new[slot] = new[slot].to(sens.dtype)
        for j in value_slots:
            new[j] = value_ind(new[j]).to(args[j].dtype)
        return func(*new)

    nan_hits = run(s, torch.isnan)
    if not any(bool(torch.isinf(shrunk[j]).any()) for j in value_slots):
        return nan_hits, None, None
    nan_hits = _tree_add(nan_hits, run(s & (sens == 0), torch.isinf))
    plus = _tree_add(run(sens > 0, torch.isposinf), run(sens < 0, torch.isneginf))
    minus = _tree_add(run(sens > 0, torch.isneginf), run(sens < 0, torch.isposinf))
    return nan_hits, plus, minus


def _all_args(args: tuple, slot: int, dirty: list[int]) -> Callable[[list], list]:
    return lambda new: new


def _mm_nonfinite_k(args: tuple, slot: int, dirty: list[int]) -> Callable[[list], list]:
    """mm/bmm: only contraction indices k where the value has a NaN/Inf can meet one, so the counting runs
    on those alone (the padding rows of a batch, not the whole batch)."""
    value = args[1 - slot]
    bad = ~torch.isfinite(value)
    bad = mask_any(bad, -1) if slot == 0 else mask_any(bad, -2)  # value b: (.., K, N); value a: (.., M, K)
    k = mask_any(bad.reshape(-1, bad.shape[-1]), 0).nonzero().squeeze(1)
    return lambda new: [new[0].index_select(-1, k), new[1].index_select(-2, k)]


def _mm_supported_k(args: tuple, slot: int, s: torch.Tensor) -> list | None:
    """mm/bmm: a contraction index k at which the sensitivity holds only structural zeros contributes
    nothing, so dropping it from both operands is exact. This is how a batch's padding rows leave a weight
    gradient without a copy when they form a range. None when every k is supported."""
    kept = mask_any(s, -2) if slot == 0 else mask_any(s, -1)  # sensitivity a: (.., M, K); sensitivity b: (.., K, N)
    kept = mask_any(kept.reshape(-1, kept.shape[-1]), 0)
    k = kept.nonzero().squeeze(1)
    n = k.numel()
    if n == kept.shape[0]:
        return None
    if n == 0 or int(k[-1]) - int(k[0]) + 1 == n:
        start = int(k[0]) if n else 0
        return [args[0].narrow(-1, start, n), args[1].narrow(-2, start, n)]
    return [args[0].index_select(-1, k), args[1].index_select(-2, k)]


def _conv_counted_outputs(args: tuple, slot: int, dirty: list[int]) -> Callable[[list], list]:
    """convolution_backward: grad_bias = sum(g) meets no value, so it is not counted; nor is the gradient of
    the operand that is dirty itself (grad_input does not read the input, grad_weight not the weight)."""

    dirty_input, dirty_weight = 1 in dirty, 2 in dirty

    def shrink(new):
        new[10] = [new[10][0] and dirty_weight, new[10][1] and dirty_input, False]
        return new

    return shrink


def _one_channel_conv(func, args, s: torch.Tensor, x1: torch.Tensor, want: int) -> torch.Tensor:
    """convolution_backward's output ``want`` (0: grad_input, 1: grad_weight) for the convolution collapsed to
    one channel: grad_output = where the sensitivity is supported in any output channel, input = ``x1``
    (N, 1, ...), kernel of ones. Nonzero exactly where some supported element reaches through the kernel."""
    stride, padding, dilation, transposed, output_padding = args[4:9]
    s1 = mask_any(s, 1, keepdim=True).to(args[0].dtype)
    ones = args[2].new_ones((1, 1, *args[2].shape[2:]))
    mask = [want == 0, want == 1, False]
    return func(s1, x1, ones, None, stride, padding, dilation, transposed, output_padding, 1, mask)[want]


def _conv_meets(func, args, slot: int, s: torch.Tensor, dirty: list[int]) -> bool:
    """convolution_backward with a non-finite input: can a supported grad_output element meet one of its
    NaN/Inf through the kernel? Asked of one channel (supported anywhere across output channels, non-finite
    anywhere across input channels), so a cropped NaN border costs a single-channel convolution."""
    if slot != 0 or dirty != [1]:
        return True
    x = args[1]
    bad = mask_any(~torch.isfinite(x), 1, keepdim=True).to(x.dtype)
    return bool(_one_channel_conv(func, args, s, bad, 1).any())


def _tree_add(a, b):
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_add(x, y) for x, y in zip(a, b, strict=True))
    return None if a is None else a + b


def _finite(t: torch.Tensor) -> bool:
    """One pass. A finite sum means no NaN/Inf went in. A sum that overflowed reads as not finite: the caller
    then takes its exact (slower) path, never a wrong one."""
    return bool(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).isfinite())


def _bilinear(support_fn: Callable[[Any, tuple, int, torch.Tensor], Any], count_args: CountArgs = _all_args,
              restrict: Restrict | None = None, meets: Meets | None = None,
              own_zeros: Callable[[Any, tuple], Any] | None = None) -> Rule:
    """Rule factory for ops bilinear in a sensitivity and a value (mm, bmm, convolution backward). When a
    value holds NaN/Inf: first drop what only structural zeros read (``restrict``); if what remains is finite,
    that is the answer. Otherwise the values' NaN/Inf are replaced by 0 for the main computation, and unless
    ``meets`` shows no supported term reaches one, the NaN/Inf that supported terms really meet are counted
    with 0/1 indicators and added back: unsupported terms contribute exactly 0 and every genuine NaN/Inf
    survives. ``support_fn(func, args, slot, s)`` gives the outputs' supports; ``own_zeros(func, args)``
    those of an op that makes structural zeros from a fully supported sensitivity (a strided convolution)."""

    def bilinear(func, args, kwargs, sup):
        slots = [i for i, a in enumerate(args) if _is_float(a)]
        tracked = [i for i in slots if sup.tracked(args[i])]
        if len(tracked) != 1:
            out = func(*args, **kwargs)
            if tracked:
                _UNRULED.add(f"{func} (two tracked operands)")
                tree_map(lambda o: sup.record(o, None) if isinstance(o, torch.Tensor) else o, out)
            elif own_zeros is not None:
                for o, so in zip(out, own_zeros(func, args), strict=True):
                    if isinstance(o, torch.Tensor) and so is not None:
                        sup.record(o, so.expand(o.shape))
            return out
        slot = tracked[0]
        s = sup.of(args[slot])
        values = [i for i in slots if i != slot]
        dirty = [i for i in values if not _finite(args[i])]
        out = None
        if dirty and restrict is not None:
            kept = restrict(args, slot, s)
            if kept is not None and all(_finite(kept[i]) for i in dirty):
                out = func(*kept, **kwargs)
        if out is None and not dirty:
            out = func(*args, **kwargs)
        elif out is None:
            clean = list(args)
            for i in dirty:
                clean[i] = torch.nan_to_num(args[i], nan=0.0, posinf=0.0, neginf=0.0)
            out = func(*clean, **kwargs)
            if meets is None or meets(func, args, slot, s, dirty):
                nan_hits, plus, minus = _nonfinite_part(func, args, slot, s, values, dirty, count_args)
                out = _add_nonfinite(out, nan_hits, plus, minus)
        supports = support_fn(func, args, slot, s)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sups = supports if isinstance(supports, (tuple, list)) else (supports,)
        for o, so in zip(outs, sups, strict=True):
            if isinstance(o, torch.Tensor):
                sup.record(o, None if so is None else so.expand(o.shape))
        return out

    bilinear.__doc__ = _bilinear.__doc__
    return bilinear


def _add_nonfinite(out, nan_hits, plus, minus):
    if isinstance(out, (tuple, list)):
        n = len(out)
        parts = [x if isinstance(x, (tuple, list)) else (x,) * n for x in (nan_hits, plus, minus)]
        return type(out)(_add_nonfinite(o, a, b, c) for o, a, b, c in zip(out, *parts, strict=True))
    if out is None or nan_hits is None:  # an output that meets no value (conv's grad_bias)
        return out
    bad = nan_hits > 0
    if plus is None:
        return out.masked_fill_(bad, float("nan"))
    extra = torch.where(plus > 0, float("inf"), 0.0) + torch.where(minus > 0, float("-inf"), 0.0)
    extra = extra.masked_fill(bad, float("nan")).to(out.dtype)
    return out.add_(extra)


def _mm_support(func, args, slot, s):
    """mm/bmm: out[..., i, j] is a structural zero when row i of a (or column j of b) is."""
    return mask_any(s, -1, keepdim=True) if slot == 0 else mask_any(s, -2, keepdim=True)


def _mv_support(func, args, slot, s):
    return mask_any(s, -1) if slot == 0 else mask_any(s).reshape(())


def _reads_every_position(stride, dilation, transposed) -> bool:
    """A convolution with stride 1 and dilation 1 (not transposed) reads every input position in some window,
    so its input gradient has no structural zero of its own; a strided one can skip positions."""
    return not transposed and all(v == 1 for v in stride) and all(v == 1 for v in dilation)


def _conv_backward_support(func, args, slot, s):
    """convolution_backward(grad_output, input, weight, ...): grad_input's support from a one-channel
    convolution of where grad_output is supported (any output channel) with a kernel of ones, over every
    input channel: a superset of the exact support, which is sound (a support may only be too large).
    grad_weight and grad_bias sum over the batch and space: taken as fully supported."""
    if slot != 0 or not args[10][0]:
        return (None, None, None)
    return (_one_channel_conv(func, args, s, args[1][:, :1], 0) > 0, None, None)


_register(aten.mm, aten.bmm)(_bilinear(_mm_support, _mm_nonfinite_k, restrict=_mm_supported_k))
_register(aten.mv)(_bilinear(_mv_support))


def _conv_skipped_inputs(func, args):
    """convolution_backward with a fully supported grad_output: a convolution that skips input positions (a
    stride wider than its reach, dilation gaps) gives them a structural zero in grad_input."""
    if _reads_every_position(args[4], args[6], args[7]):
        return (None, None, None)
    return _conv_backward_support(func, args, 0, torch.ones_like(args[0][:, :1], dtype=torch.bool))


_register(aten.convolution_backward)(_bilinear(_conv_backward_support, _conv_counted_outputs, meets=_conv_meets,
                                               own_zeros=_conv_skipped_inputs))


def _softmax_backward(func, args, kwargs, sup):
    """_softmax_backward_data(g, y, dim): out = y * (g - sum(g * y)). A softmax output that is exactly 0 (its
    input was -inf: a masked position) is a structural zero, and so is every output of a row whose g is all
    structural zeros. NaN rows of y (a fully masked softmax row) meet only structural zeros there.
    A y of exactly 0 can also be an underflow of a finite input (softmax([0, -200]) in float32). Where an
    infinite g meets it and the output being differentiated is finite (entropy: entr(0) = 0, sqrt(0) = 0), y * g
    tends to 0 either way and the row is exact with the zero structural. Where the output is not finite (log of
    that 0 reaches it) the row keeps PyTorch's values (NaN) rather than a finite guess."""
    g, y, dim = args[0], args[1], args[2]
    out = func(*args, **kwargs)
    s = sup.of(g)
    zero = y == 0
    if _STATE.outputs_finite:  # y*g -> 0 as y -> 0 for the finite outputs' functions (entr, sqrt, xlogy)
        genuine = torch.zeros((), dtype=torch.bool, device=y.device)
    else:
        hit = zero & ~torch.isfinite(g)
        genuine = mask_any(hit if s is None else hit & s, dim, keepdim=True)
    support = ~zero | genuine
    if s is not None:
        support = support & mask_any(s, dim, keepdim=True)
    used = support if s is None else support & s  # the elements whose g * y enter the row's sum
    bad_rows = mask_any(~torch.isfinite(out) & support, dim, keepdim=True) & ~genuine
    if bool(mask_any(bad_rows)):
        redo = y * (g - torch.where(used, g * y, 0).sum(dim, keepdim=True))
        out = torch.where(bad_rows, redo.to(out.dtype), out)
    support = support.expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._softmax_backward_data)(_softmax_backward)


def _log_softmax_backward(func, args, kwargs, sup):
    """_log_softmax_backward_data(g, y, dim): out = g - exp(y) * sum(g). A row of g that is all structural
    zeros (an ignored target, a discarded row) gives a structurally zero row whatever y holds."""
    g, dim = args[0], args[2]
    out = func(*args, **kwargs)
    s = sup.of(g)
    support = None if s is None else mask_any(s, dim, keepdim=True).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._log_softmax_backward_data)(_log_softmax_backward)


def _nll_loss_backward(func, args, kwargs, sup):
    """nll_loss_backward(g, self, target, weight, reduction, ignore_index, total_weight): only the target
    class of each non-ignored sample receives gradient; everything else is a structural zero."""
    out = func(*args, **kwargs)
    g, self, target, ignore_index = args[0], args[1], args[2], args[5]
    class_dim = 1 if self.dim() > 1 else 0
    keep = target != ignore_index
    support = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    support.scatter_(class_dim, torch.where(keep, target, 0).unsqueeze(class_dim),
                     keep.unsqueeze(class_dim))
    s = sup.of(g)
    if s is not None:  # per sample (reduction='none') or one scalar for the reduced loss
        support &= s.unsqueeze(class_dim) if s.dim() > 0 else s
    sup.record(_annihilate(out, support), support)
    return out


_register(aten.nll_loss_backward, aten.nll_loss2d_backward)(_nll_loss_backward)


def _tracked_slots(args: tuple, sup: _Supports) -> list[int]:
    return [i for i, a in enumerate(args) if _is_float(a) and sup.tracked(a)]


def _run_unruled(func, args, kwargs, sup, why: str | None) -> Any:
    """Run the op as PyTorch does with its outputs fully supported; ``why`` (when the op met a structural
    zero it has no rule for) lists it in gw.unruled_ops()."""
    out = func(*args, **kwargs)
    if why:
        _UNRULED.add(f"{func} ({why})")
    tree_map(lambda o: sup.record(o, None) if isinstance(o, torch.Tensor) else o, out)
    return out


def _trilinear(func, args, kwargs, sup):
    """_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim): the sum over ``sumdim`` of the product of the
    three operands, each unsqueezed at its expand dims (nn.Bilinear, and its backward with the sensitivity as
    one operand). An output element is a structural zero when every term is, i.e. when the sensitivity's
    slice is all structural zeros. A contraction index at which the sensitivity holds only structural zeros (a
    batch's padding rows) contributes nothing, so it is dropped from every operand that has it and the NaN/Inf
    there never enter. A NaN/Inf still meeting a structural zero inside a kept index is left as PyTorch
    computes it (listed by gw.unruled_ops()), never replaced: the counting that mm uses needs one value."""
    operands, expands, sumdim = list(args[:3]), args[3:6], args[6]
    tracked = _tracked_slots(args, sup)
    if len(tracked) != 1:
        return _run_unruled(func, args, kwargs, sup, "several tracked operands" if tracked else None)
    slot = tracked[0]
    s = sup.of(operands[slot])
    ndim = operands[slot].dim() + len(expands[slot])
    dims = [[d for d in range(ndim) if d not in expands[i]] for i in range(3)]  # each operand's dims, expanded
    s_sum = tuple(dims[slot].index(d) for d in sumdim if d in dims[slot])
    for d in sumdim:
        if d not in dims[slot]:
            continue
        axis = dims[slot].index(d)
        kept = mask_any(s, tuple(a for a in range(s.dim()) if a != axis)) if s.dim() > 1 else s
        if mask_all(kept):
            continue
        index = kept.nonzero().squeeze(1)
        s = s.index_select(axis, index)
        for i in range(3):
            if d in dims[i]:
                operands[i] = operands[i].index_select(dims[i].index(d), index)
    out = func(*operands, *args[3:], **kwargs)
    support = mask_any(s, s_sum) if s_sum else s  # the sensitivity's remaining dims, in expanded order
    out_dims = [d for d in range(ndim) if d not in sumdim]
    kept_dims = [d for d in dims[slot] if d not in sumdim]
    support = support.reshape([support.shape[kept_dims.index(d)] if d in kept_dims else 1 for d in out_dims])
    support = support.expand(out.shape)
    values = [i for i in range(3) if i != slot]
    if not mask_all(s) and not all(_finite(operands[i]) for i in values):
        # do terms with a structural zero meet a NaN/Inf in a supported output? counted with 0/1 indicators
        meets = 0
        for i in values:
            ind = [operands[j].new_ones(()).expand(operands[j].shape) for j in range(3)]
            ind[slot] = (~s).to(out.dtype)
            ind[i] = (~torch.isfinite(operands[i])).to(out.dtype)
            meets = meets + func(*ind, *args[3:], **kwargs)
        if bool(mask_any((meets > 0) & support)):
            _UNRULED.add(f"{func} (NaN/Inf meeting a structural zero inside a kept contraction index)")
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._trilinear)(_trilinear)


# op -> (position of the right-hand side among the positional arguments, whether the solve is always from the left)
_SOLVES = {
    aten.linalg_solve_triangular.default: (1, False),
    aten.triangular_solve.default: (0, True),
    aten.cholesky_solve.default: (0, True),
    aten.linalg_lu_solve.default: (2, False),
}


def _solve(func, args, kwargs, sup):
    """Triangular, Cholesky and LU solves, A X = B (or X A = B with left=False): column k of X depends on
    column k of B alone (row k when solving from the right), so a column of B that is all structural zeros
    gives a structurally zero column of X, exactly 0 whatever A holds. Their backwards solve with the
    sensitivity as B; the products after them then drop those columns (a discarded column of a solution no
    longer turns A's gradient into NaN). A tracked matrix A runs as PyTorch computes it (unruled)."""
    rhs, always_left = _SOLVES[func]
    tracked = _tracked_slots(args, sup)
    if tracked != [rhs] or args[rhs].dim() < 2:
        return _run_unruled(func, args, kwargs, sup, "the matrix is tracked" if tracked else None)
    out = func(*args, **kwargs)
    first = out[0] if isinstance(out, (tuple, list)) else out
    s = sup.of(args[rhs])
    left = always_left or kwargs.get("left", True)
    support = mask_any(s, -2 if left else -1, keepdim=True).expand(first.shape)
    sup.record(_annihilate(first, support), support)
    for other in (out[1:] if isinstance(out, (tuple, list)) else ()):
        if isinstance(other, torch.Tensor):
            sup.record(other, None)
    return out


_register(*_SOLVES)(_solve)


def _cdist_backward(func, args, kwargs, sup):
    """_cdist_backward(g, x1, x2, p, cdist): x1's gradient, row i = sum over j of g[i, j] times the distance's
    derivative. A column j where g holds only structural zeros (a discarded point of x2) contributes nothing
    and is dropped from g, x2 and cdist, so its NaN/Inf never enter; a row i where g does is a structural
    zero."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked point set" if tracked else None)
    g, x1, x2, p, dist = args
    s = sup.of(g)
    kept = mask_any(s.reshape(-1, s.shape[-1]), 0)
    if not mask_all(kept):
        j = kept.nonzero().squeeze(1)
        g, x2, dist = g.index_select(-1, j), x2.index_select(-2, j), dist.index_select(-1, j)
    out = func(g, x1, x2, p, dist, **kwargs)
    support = mask_any(s, -1, keepdim=True).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._cdist_backward)(_cdist_backward)


def _pdist_backward(func, args, kwargs, sup):
    """_pdist_backward(g, x, p, pdist): g and pdist run over the pairs i < j in row-major order. A row of x
    whose pairs all have structural zeros in g (a discarded point) is dropped with those pairs, so its NaN/Inf
    never meet the other rows; its own gradient is a structural zero."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked point set" if tracked else None)
    g, x, p, dist = args
    s = sup.of(g)
    n = x.shape[0]
    pairs = torch.triu_indices(n, n, 1, device=x.device)
    kept = torch.zeros(n, dtype=torch.bool, device=x.device)
    kept[pairs[0][s]] = True
    kept[pairs[1][s]] = True
    if mask_all(kept):
        out = func(*args, **kwargs)
    else:
        out = x.new_zeros(x.shape)
        rows = kept.nonzero().squeeze(1)
        if rows.numel() > 1:  # (one kept row has no pair: nothing to compute)
            among = kept[pairs[0]] & kept[pairs[1]]
            out[rows] = func(g[among], x[rows], p, dist[among], **kwargs)
    support = kept.unsqueeze(1).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._pdist_backward)(_pdist_backward)


def _embedding_bag_per_sample_weights_backward(func, args, kwargs, sup):
    """(g, weight, indices, offsets, offset2bag, mode, padding_idx): the gradient of each per-sample weight is
    the dot product, over the embedding columns, of its bag's g row with its weight row. A column where g holds
    only structural zeros (an embedding dimension the output discards) is dropped from g and weight, so the
    NaN/Inf there never enter. The outputs are recorded as supported (offset2bag, which would say which bag
    each index feeds, is empty on the fast path)."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked weight" if tracked else None)
    g, weight = args[0], args[1]
    kept = mask_any(sup.of(g), 0)
    if not mask_all(kept):
        j = kept.nonzero().squeeze(1)
        args = (g.index_select(1, j), weight.index_select(1, j), *args[2:])
    out = func(*args, **kwargs)
    sup.record(out, None)
    return out


_register(aten._embedding_bag_per_sample_weights_backward)(_embedding_bag_per_sample_weights_backward)


def _grid_sampler_backward(func, args, kwargs, sup):
    """grid_sampler_2d/3d_backward(g, input, grid, mode, padding_mode, align_corners, output_mask): each output
    position reads the input through its own grid point. A position whose g is a structural zero in every channel
    (a cropped output) is discarded: its grid point is replaced by 0 before the kernel runs (a NaN grid point
    would make NaN weights) and its grid gradient is a structural zero, whatever input pixels it would have
    read. The input's gradient stays fully supported: its weights depend on the grid (a value), so a pixel a
    kept position reads with weight 0 has an arithmetic zero, not a structural one."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked input or grid" if tracked else None)
    g, inp, grid = args[0], args[1], args[2]
    s = sup.of(g).expand(g.shape)
    kept = mask_any(s, 1)  # (N, *output spatial)
    grid = torch.where(kept.unsqueeze(-1), grid, 0)
    outs = func(g, inp, grid, *args[3:], **kwargs)
    grad_input, grad_grid = outs
    if grad_input is not None:  # its weights come from the grid, a value: a weight of 0 is arithmetic
        sup.record(grad_input, None)
    if grad_grid is not None:
        support = kept.unsqueeze(-1).expand(grad_grid.shape)
        sup.record(_annihilate(grad_grid, support), support)
    return outs


_register(aten.grid_sampler_2d_backward, aten.grid_sampler_3d_backward)(_grid_sampler_backward)


def _ctc_loss_backward(func, args, kwargs, sup):
    """_ctc_loss_backward(g, log_probs, targets, input_lengths, target_lengths, nll, log_alpha, blank,
    zero_infinity): each sample's alignment is computed on its own, so a sample whose per-sample g is a
    structural zero (an infeasible sample whose infinite loss was dropped) is removed from every operand before
    the kernel runs; its log_probs column gets structural zeros and its -inf alignments never enter. Frames past
    a sample's input length are never read: structural zeros too (NaN padding frames)."""
    tracked = _tracked_slots(args, sup)
    g, log_probs, targets, in_len, tg_len, nll, log_alpha = args[:7]
    if tracked not in ([], [0]) or log_probs.dim() != 3:
        return _run_unruled(func, args, kwargs, sup, "a tracked operand" if tracked not in ([], [0]) else None)
    kept = sup.of(g).expand(g.shape) if tracked else torch.ones(g.shape, dtype=torch.bool, device=g.device)
    if mask_all(kept):
        out = func(*args, **kwargs)
    else:
        index = kept.nonzero().squeeze(1)
        pick = lambda v: v.index_select(0, index) if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]
        if targets.dim() == 1:  # concatenated targets: keep the kept samples' segments
            lengths = torch.as_tensor(tg_len, device=targets.device)
            starts = torch.cumsum(lengths, 0) - lengths
            targets = torch.cat([targets[int(starts[i]):int(starts[i]) + int(lengths[i])] for i in index.tolist()])
        else:
            targets = targets.index_select(0, index)
        part = func(g.index_select(0, index), log_probs.index_select(1, index), targets, pick(in_len),
                    pick(tg_len), nll.index_select(0, index), log_alpha.index_select(0, index), *args[7:], **kwargs)
        out = log_probs.new_zeros(log_probs.shape)
        out.index_copy_(1, index, part)
    frames = torch.arange(log_probs.shape[0], device=out.device).unsqueeze(1)
    read = frames < torch.as_tensor(in_len, device=out.device).unsqueeze(0)  # (T, N)
    support = (kept.view(1, -1) & read).unsqueeze(-1).expand(out.shape)
    sup.record(_annihilate(out, support), None if mask_all(support) else support)
    return out


_register(aten._ctc_loss_backward)(_ctc_loss_backward)


# ---------------------------------------------------------------------------------------------------------
# The mode that applies the rules, and the two-phase backward.
# ---------------------------------------------------------------------------------------------------------

_UNRULED: set[str] = set()


def unruled_ops() -> set[str]:
    """Backward ops that met a structural zero but had no strong-zero rule, since the process started.

    Such an op runs as plain PyTorch (its output is treated as fully supported), so a NaN or Inf it multiplies
    by a zero may still reach a gradient; never a wrong finite number. ``unruled_ops().clear()`` resets it.

    >>> import torch, gradwise as gw
    >>> isinstance(gw.unruled_ops(), set)
    True
    """
    return _UNRULED


# Fused backwards without a rule of their own that, when a structural zero reaches them, run as PyTorch's own
# decomposition (torch._decomp) under the mode, so that each primitive op of it goes through its rule: a
# normalisation's rows (or channels) that only structural zeros read no longer turn its weight gradient into
# NaN. Only then: with no structural zero in their inputs they run fused, as in plain PyTorch, and with one the
# fused result is kept wherever it is finite (see _StrongZeroMode._decomposed).
DECOMPOSED = frozenset((aten.native_layer_norm_backward, aten.native_group_norm_backward,
                        aten.native_batch_norm_backward, aten.linalg_cross, aten._prelu_kernel_backward))


def _decomposition(func: Any) -> Callable[..., Any] | None:
    if func.overloadpacket not in DECOMPOSED:
        return None
    from torch._decomp import decomposition_table  # imported on first use: torch._decomp loads slowly

    return decomposition_table.get(func)


class _StrongZeroMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.supports = _Supports()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _contract.unfollowed(args):  # sparse/nested/mkldnn sensitivities: PyTorch's op, nothing recorded
            return func(*args, **kwargs)
        if func.is_view:
            out = func(*args, **kwargs)  # a view reads its storage's mask: nothing to record...
            src = args[0] if args else None
            if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and self.supports.tracked(src) \
                    and out.untyped_storage()._cdata != src.untyped_storage()._cdata:
                # ...unless it copied (to(dtype), reshape, contiguous met inside a decomposition)
                s = self.supports.of(src)
                self.supports.record(out, s.reshape(out.shape) if s.numel() == out.numel() else None)
            return out
        rule = lookup(func)
        if rule is not None:
            return rule(func, args, kwargs, self.supports)
        flat, _ = tree_flatten((args, kwargs))
        tracked = any(self.supports.tracked(a) for a in flat)
        if tracked and (decomposed := _decomposition(func)) is not None:
            return self._decomposed(func, decomposed, args, kwargs)
        out = func(*args, **kwargs)
        if tracked:
            _UNRULED.add(str(func))
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor):
                    self.supports.record(o, None)
        return out


    def _decomposed(self, func, decomposed, args, kwargs):
        """Run ``func`` as its decomposition under this mode (each primitive op through its rule), and also
        fused: where the fused result is finite no structural zero met a NaN/Inf there, and it is taken as it
        is (PyTorch's bits); elsewhere the decomposition's."""
        with self:  # the decomposition's ops come back through this mode
            strong = decomposed(*args, **kwargs)
        fused = func(*args, **kwargs)
        single = isinstance(fused, torch.Tensor)
        out = []
        for f, d in zip((fused,) if single else fused, (strong,) if single else strong, strict=True):
            if isinstance(f, torch.Tensor) and isinstance(d, torch.Tensor) and _is_float(f):
                merged = torch.where(torch.isfinite(f), f, d)
                self.supports.record(merged, self.supports.of(d))
                out.append(merged)
            else:
                out.append(f)
        if single:
            return out[0]
        return tuple(out) if isinstance(fused, tuple) else out


class _State(threading.local):
    depth = 0
    create_graph = False
    in_mode = False
    planned: str | None = None  # a path gw.grad/gw.backward already chose, for the engine hook to take once
    # whether every output being differentiated is finite (see _softmax_backward and _exp_result_mul)
    outputs_finite = True


_STATE = _State()
_INSTALL_LOCK = threading.Lock()
_installed = 0
_original_engine_run: Callable[..., Any] | None = None
_process_wide = False  # `gradwise run --strong-zeros`: every thread's backward, see strong_zeros_process_wide


def _walk(roots: Sequence[Any]) -> Iterator[Any]:
    seen: set[Any] = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)


def _root_nodes(t_outputs: Sequence[Any]) -> list[Any]:
    nodes = []
    for t in t_outputs:
        if isinstance(t, torch.Tensor):
            nodes.append(t.grad_fn if t.grad_fn is not None else _grad_accumulator(t))
        else:  # GradientEdge
            nodes.append(t.node)
    return nodes


def _grad_accumulator(t: torch.Tensor) -> Any:
    return torch.autograd.graph.get_gradient_edge(t).node if t.requires_grad else None


def _freed(_: object) -> torch.Tensor:
    raise RuntimeError(
        "Trying to backward through the graph a second time (or directly access saved tensors after they "
        "have already been freed). Saved intermediate values of the graph are freed when you call "
        ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the graph "
        "a second time or if you need to access saved tensors after calling backward."
    )


def _release_graph(roots: Sequence[Any]) -> None:
    """Free the saved tensors of a graph that was retained only for a check (gw.watch, compiled backwards), as
    the engine frees them after a backward without retain_graph (``SavedTensor.register_hooks`` drops the data)."""
    for node in _walk(roots):
        for raw in _raw_saved(node):
            with contextlib.suppress(RuntimeError):  # already hooked (checkpoint) or already freed
                raw.register_hooks(lambda _: None, _freed)


def _leaves(t_outputs, inputs) -> list[torch.Tensor]:
    if inputs:
        return [t for t in inputs if isinstance(t, torch.Tensor)]
    leaves = []
    for node in _walk(_root_nodes(t_outputs)):
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves.append(var)
    return leaves


def _raw_saved(node: Any) -> Iterator[Any]:
    """The ``SavedTensor`` objects a node holds (its ``_raw_saved_*`` attributes)."""
    for name in _node_type(node)[0]:
        try:
            saved = getattr(node, name, None)
        except RuntimeError:  # freed by an earlier backward
            continue
        for raw in saved if isinstance(saved, (tuple, list)) else (saved,):
            if raw is not None:
                yield raw


# ---------------------------------------------------------------------------------------------------------
# Choosing the path before backward. Contamination needs a structural zero to meet a NaN/Inf, and in a
# backward formula a NaN/Inf comes either from a saved tensor or from a singular point of the formula
# (x / 0 in div's backward, 1 / (2 sqrt(0)) in sqrt's). So when every saved tensor is finite and no node sits
# at a singular point, plain PyTorch is already right and runs untouched. Nodes of a type not listed in
# NODE_FACTS (custom Functions, rarer ops) could compute anything: for those, the backward runs once under the
# strong-zero mode (a plain pass first would have to force retain_graph to allow a re-run).
# ---------------------------------------------------------------------------------------------------------


def _any(value: object) -> bool:
    return bool(value.any()) if isinstance(value, torch.Tensor) else bool(value)


def _saved(node: Any, name: str) -> object:
    value = getattr(node, name)
    # a saved Python number comes back as a 0-dim "wrapped number" tensor: compare it as a number
    return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value


def _zero_in(name: str) -> Callable[[Any], bool]:
    return lambda node: _any(_saved(node, name) == 0)


def _overflows(t: torch.Tensor, scale: float, power: float, at_max: bool) -> bool:
    """Whether ``scale * |x| ** power`` is infinite in ``t``'s dtype for the largest (``at_max``) or smallest
    |x| in ``t``: a factor a backward formula computes from a finite saved tensor (``1/x**2`` of reciprocal's,
    ``x**(p-1)`` of pow's) that overflows to Inf there, where a structural zero would meet it as 0 x Inf."""
    if not t.numel() or not t.is_floating_point():
        return False
    lo, hi = (v.item() for v in torch.aminmax(t.detach()))
    if at_max:
        m = max(abs(lo), abs(hi))
    else:
        m = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
    if m != m:  # NaN: the finiteness check reads this tensor anyway
        return False
    try:
        value = abs(scale) * m**power
    except (OverflowError, ZeroDivisionError):
        return True
    return not value < torch.finfo(t.dtype).max


def _pow_singular(node: Any) -> bool:
    """pow(x, p)'s backward computes p * x ** (p - 1): NaN for x < 0 when p is not an integer, infinite at x = 0
    when p < 1, and it can overflow where x ** p did not (x**-2 at 1e-20, x**1.5 near the dtype's max)."""
    p = _saved(node, "_saved_exponent")
    if p in (0, 1) or not isinstance(p, (int, float)):
        return False
    x = node._saved_self
    if x.is_complex():
        return False
    if p != int(p) and _any(x < 0):
        return True
    return _overflows(x, p, p - 1, at_max=p > 1)


def _outside_unit(name: str) -> Callable[[Any], bool]:
    """asin/acos: the backward's 1/sqrt(1 - x**2) is infinite at |x| = 1 and NaN beyond."""
    return lambda node: _any(abs(_saved(node, name)) >= 1)


def _unit_in(name: str) -> Callable[[Any], bool]:
    return lambda node: _any(abs(_saved(node, name)) == 1)


def _result_power_overflows(power: float, scale: float) -> Callable[[Any], bool]:
    """reciprocal (-g * y**2) and rsqrt (-g/2 * y**3): the power of a finite result can overflow."""
    return lambda node: _overflows(node._saved_result, scale, power, at_max=True)


def _div_singular(node: Any) -> bool:
    """a / b: the gradient of a is g / b (0/0 at b = 0); that of b, when b requires grad, is
    -g * ((a / b) / b), which overflows for a tiny b although a / b is finite."""
    other, self = node._saved_other, node._saved_self
    if other.is_complex() or (self is not None and self.is_complex()):
        return _any(other == 0)  # complex tensors: strong zeros do not follow them (see check_differentiable)
    low = other.detach().abs().min().item() if other.numel() else math.inf
    if low == 0:
        return True
    if self is None or not self.numel() or not (other.is_floating_point() or self.is_floating_point()):
        return False
    dtype = other.dtype if other.is_floating_point() else self.dtype
    # |a / b / b| <= max|a| / min|b|**2: a bound from two reductions (no output-sized temporary); a tiny b with a
    # small a can make it exceed the range without the formula overflowing: then the strong pass runs, which is
    # exact anyway
    a = self.detach()
    top = (a if a.is_floating_point() else a.to(dtype)).abs().max().item()
    try:
        return not top / low / low < torch.finfo(dtype).max
    except (OverflowError, ZeroDivisionError):
        return True


def _batch_norm_singular(node: Any) -> bool:
    """batch norm in eval mode divides by sqrt(running_var + eps): infinite for a channel whose sum is 0
    (eps=0 and a constant channel in the running statistics)."""
    var = node._saved_running_var
    return not node._saved_training and var is not None and _any(var + node._saved_eps <= 0)


def _nll_singular(node: Any) -> bool:
    """nll_loss with reduction='mean' divides by the total weight of the non-ignored targets: 0 when every
    target is ignored or has class weight 0 (0/0, a NaN loss that can itself be discarded)."""
    return node._saved_reduction == 1 and _saved(node, "_saved_total_weight") == 0


_SAFE_NODES = (
    "AccumulateGrad AddBackward0 AddBackward1 SubBackward0 SubBackward1 MulBackward0 MulBackward1 "
    "NegBackward0 SumBackward0 SumBackward1 MeanBackward0 MeanBackward1 TBackward0 ViewBackward0 "
    "UnsafeViewBackward0 "
    "ReshapeAliasBackward0 ExpandBackward0 PermuteBackward0 TransposeBackward0 TransposeBackward1 "
    "SqueezeBackward0 SqueezeBackward1 SqueezeBackward2 UnsqueezeBackward0 SliceBackward0 SelectBackward0 "
    "IndexBackward0 CatBackward0 StackBackward0 SplitBackward0 SplitWithSizesBackward0 UnbindBackward0 "
    "CloneBackward0 ToCopyBackward0 AliasBackward0 DetachBackward0 AddmmBackward0 MmBackward0 BmmBackward0 "
    "BaddbmmBackward0 MvBackward0 DotBackward0 GeluBackward0 ReluBackward0 ThresholdBackward0 "
    "SigmoidBackward0 TanhBackward0 SiluBackward0 EluBackward0 LeakyReluBackward0 HardtanhBackward0 "
    "SoftplusBackward0 ExpBackward0 SoftmaxBackward0 LogSoftmaxBackward0 SafeSoftmaxBackward0 "
    "NllLossBackward0 NllLoss2DBackward0 MseLossBackward0 WhereBackward0 MaskedFillBackward0 "
    "MaskedFillBackward1 NativeDropoutBackward0 NativeLayerNormBackward0 NativeBatchNormBackward0 "
    "ConvolutionBackward0 MaxPool2DWithIndicesBackward0 AvgPool2DBackward0 AdaptiveAvgPool2DBackward0 "
    "EmbeddingBackward0 ClampBackward1 ClampMinBackward0 ClampMaxBackward0 AbsBackward0 MaximumBackward0 "
    "MinimumBackward0 MaxBackward0 MaxBackward1 MinBackward0 MinBackward1 AmaxBackward0 AminBackward0 "
    "SortBackward0 TopkBackward0 GatherBackward0 ScatterBackward0 IndexSelectBackward0 CopySlices "
    "ConstantPadNdBackward0 RepeatBackward0 FlipBackward0 RollBackward0 "
    "ScaledDotProductFlashAttentionForCpuBackward0 ScaledDotProductEfficientAttentionBackward0 "
    "ScaledDotProductFlashAttentionBackward0"
).split()

# Keyed by autograd node (the aten op whose derivative formula the node runs). None: the formula maps finite
# saved tensors and sensitivities to finite values. A function: the node is at a singular point, where its
# formula makes an infinity out of finite values, so a structural zero arriving there would give 0 x Inf.
NODE_FACTS: dict[str, Callable[[Any], bool] | None] = {
    **dict.fromkeys(_SAFE_NODES),
    # prod's backward divides by an input only where none is 0 (zeros take the product of the others): from
    # finite saved values it makes no NaN, only overflow (not treated, as for other nodes). Known, so a finite
    # prod runs plain (bitwise); its strong pass is not bitwise (tests/test_opdb.py KNOWN_FORCED_DIFFS)
    "ProdBackward0": None,
    "ProdBackward1": None,
    "DivBackward0": _div_singular,
    "DivBackward1": _zero_in("_saved_other"),
    "SqrtBackward0": _zero_in("_saved_result"),
    "LogBackward0": _zero_in("_saved_self"),
    "Log2Backward0": _zero_in("_saved_self"),
    "Log10Backward0": _zero_in("_saved_self"),
    "Log1pBackward0": lambda node: _any(_saved(node, "_saved_self") == -1),
    "PowBackward0": _pow_singular,
    "AsinBackward0": _outside_unit("_saved_self"),
    "AcosBackward0": _outside_unit("_saved_self"),
    "AtanhBackward0": _unit_in("_saved_self"),
    # 1/x at 0 saves result = inf, caught by the finiteness check; a finite result can still overflow
    "ReciprocalBackward0": _result_power_overflows(2, 1),
    "RsqrtBackward0": _result_power_overflows(3, 0.5),
    "NativeBatchNormBackward0": _batch_norm_singular,
    "NllLossBackward0": _nll_singular,
    "NllLoss2DBackward0": _nll_singular,
    # DDP's _DDPSink (find_unused_parameters, static_graph): an identity backward that saves nothing
    "_DDPSinkBackward": None,
}


# Nodes whose backward makes no structural zero out of sensitivities that hold none: no padding, selecting,
# flat region or zeros of their own (tests/test_strong_zeros.py checks each one under the strong-zero mode).
# A NaN/Inf in a saved tensor can only be annihilated by a structural zero that reaches it, so the check
# before backward reads only what is saved at or below (towards the leaves) a node not listed here; a graph
# made of these nodes alone (Linear + GELU/tanh/sigmoid + mse) reads nothing.
MAKES_NO_ZEROS = frozenset((
    "AccumulateGrad AddBackward0 AddBackward1 SubBackward0 SubBackward1 MulBackward0 MulBackward1 NegBackward0 "
    "DivBackward0 DivBackward1 SumBackward0 SumBackward1 MeanBackward0 MeanBackward1 TBackward0 ViewBackward0 "
    "UnsafeViewBackward0 ExpandBackward0 PermuteBackward0 TransposeBackward0 "
    "SqueezeBackward0 SqueezeBackward1 SqueezeBackward2 UnsqueezeBackward0 CloneBackward0 "
    "ToCopyBackward0 AliasBackward0 AddmmBackward0 MmBackward0 BmmBackward0 BaddbmmBackward0 MvBackward0 "
    "GeluBackward0 SigmoidBackward0 TanhBackward0 SiluBackward0 SoftplusBackward0 ExpBackward0 "
    "MseLossBackward0 SqrtBackward0 LogBackward0 NativeLayerNormBackward0 NativeGroupNormBackward0 "
    "NativeBatchNormBackward0 RsqrtBackward0"
).split())
# Nodes whose backward only compares its saved tensor (relu: result <= 0 ? 0 : grad): a NaN/Inf there cannot
# turn into a NaN/Inf of the backward, so the check before backward need not read it.
COMPARES_SAVED_ONLY = frozenset(("ReluBackward0", "ThresholdBackward0", "HardtanhBackward0"))
# Nodes whose backward is one fused aten op. While that op has no rule, the strong-zero pass runs it as it is
# and marks its outputs fully supported: it makes no structural zero, and a NaN/Inf saved there comes out the
# same with or without the pass, so the check reads nothing there either.
# (Normalisations are not among them: they run as their decomposition when a structural zero reaches them, so
# what they save is read like any other node's.)
FUSED_BACKWARDS: dict[str, Any] = {
    "ScaledDotProductFlashAttentionForCpuBackward0": aten._scaled_dot_product_flash_attention_for_cpu_backward,
}


def _opaque(name: str) -> bool:
    op = FUSED_BACKWARDS.get(name)
    return op is not None and lookup(op.default) is None


_MAKES_NO_ZEROS_IF: dict[str, Callable[[Any], bool]] = {
    "PowBackward0": lambda node: _saved(node, "_saved_exponent") != 0,  # x ** 0 backward is zeros_like(x)
    "ConvolutionBackward0": lambda node: _reads_every_position(node._saved_stride, node._saved_dilation,
                                                               node._saved_transposed),
}


# Saved tensors the check need not read. A normalisation's saved mean (result1) is NaN/Inf in every row (group)
# whose input holds a NaN/Inf, so the small statistics are read instead of the input they summarise (batch
# norm in eval mode saves no statistics of its input: its input is read); layer norm's backward never reads
# its bias.
_NOT_READ = {
    "NativeLayerNormBackward0": ("_raw_saved_input", "_raw_saved_bias"),
    "NativeGroupNormBackward0": ("_raw_saved_input",),
}

# Nodes that make structural zeros which, in some graphs, stay inside their own backward (causal attention's
# masked weights meet q, k and v there, but every key still reaches its gradient): a test of the node, True when
# its outputs get no structural zero of its own. Its saved tensors are read; the nodes below are not reached.
_OWN_ZEROS_INSIDE: dict[str, Callable[[Any], bool]] = {}

_NODE_TYPES: dict[type, tuple] = {}


def _node_type(node: Any) -> tuple:
    """Per autograd node type, looked up once: its ``_raw_saved_*`` attributes, those the check before backward
    reads, whether NODE_FACTS knows it, its singular-point test, whether it makes structural zeros (a bool, or a
    test of the node where that depends on what it saved), and its zero-output test (_ZERO_OUTPUT_TESTS)."""
    info = _NODE_TYPES.get(type(node))
    if info is None:
        name = type(node).__name__
        names = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
        # a compiled backward's own NaN/Inf meets its zeros inside it, under the pass (gradwise._compile)
        read = () if name in COMPARES_SAVED_ONLY or _opaque(name) or name == "CompiledFunctionBackward" else \
            tuple(a for a in names if a not in _NOT_READ.get(name, ()))
        test = _MAKES_NO_ZEROS_IF.get(name)
        makes = False if name in MAKES_NO_ZEROS or _opaque(name) else (lambda n: not test(n)) if test else True
        info = _NODE_TYPES[type(node)] = (names, read, name in NODE_FACTS, NODE_FACTS.get(name), makes,
                                          _ZERO_OUTPUT_TESTS.get(name), _OWN_ZEROS_INSIDE.get(name))
    return info


def _makes_zeros(node: Any) -> bool:
    """Whether the node's backward can make a structural zero."""
    makes = _node_type(node)[4]
    return makes if makes.__class__ is bool else makes(node)


# Nodes whose backward multiplies the sensitivity by their own output, where an output of exactly 0 (from a
# -inf input) is a structural zero (semantics.md): an infinite sensitivity from a singular point above meets it.
_ZERO_OUTPUT_TESTS: dict[str, Callable[[Any], bool]] = {
    "SoftmaxBackward0": _zero_in("_saved_result"),
    "ExpBackward0": _zero_in("_saved_result"),
    "LogSoftmaxBackward0": lambda node: _any(_saved(node, "_saved_result") == -math.inf),
}


def _readable(node: Any) -> bool:
    """Whether the node's saved tensors can be read: no hook to run (a checkpoint's recomputation) and no
    storage freed until a hook refills it (FSDP's resharded parameters)."""
    for raw in _raw_saved(node):
        if raw.unpack_hook is not None:
            return False
        t = raw.data
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() and \
                t.data_ptr() == t.storage_offset() * t.element_size():
            return False
    return True


_SMALL = 1 << 12  # elements: below this a tensor's copy costs less than a reduction of its own
_FEW = 4  # up to this many small tensors are reduced one by one: their copy into one would cost more


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """A sum is finite iff no NaN/Inf went in (or, rarely, it overflowed: then False). On CPU each sum is read
    at once (stacking them costs more than it saves); elsewhere one host sync for all. Many small tensors
    (biases, norm statistics) go through one reduction per dtype/device."""
    if not tensors:
        return True
    grad_mode = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # as torch.no_grad(), without its Python context manager (runs per backward)
    try:
        small = [t for t in tensors if t.numel() <= _SMALL and t.layout == torch.strided]
        if len(small) > _FEW:
            groups: dict[tuple, list[torch.Tensor]] = {}
            for t in small:
                groups.setdefault((t.dtype, t.device), []).append(t.reshape(-1))
            small_ids = {id(t) for t in small}
            tensors = [t for t in tensors if id(t) not in small_ids]
            tensors.extend(ts[0] if len(ts) == 1 else torch.cat(ts) for ts in groups.values())
        sums = []
        for t in tensors:
            total = t.sum(dtype=torch.float32) if t.dtype != torch.float32 else t.sum()
            if total.is_cpu:
                if not math.isfinite(total.item()):
                    return False
            else:
                sums.append(total)
        return not sums or bool(torch.stack(sums).isfinite().all())
    finally:
        torch._C._set_grad_enabled(grad_mode)


def _graph(roots: Sequence[Any]) -> tuple[dict[Any, tuple], dict[Any, int]]:
    """Every node of the graph once: node -> (its type's facts, whether it makes structural zeros, its edges);
    and how many edges lead to each node."""
    graph: dict[Any, tuple] = {}
    consumers: dict[Any, int] = {}
    types = _NODE_TYPES
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in graph:
            continue
        info = types.get(type(node)) or _node_type(node)
        makes = info[4]
        if makes.__class__ is not bool:
            makes = makes(node)
        edges = node.next_functions
        # (whether it makes zeros, whether they reach its outputs)
        graph[node] = (info, makes, edges, makes and (info[6] is None or not info[6](node)))
        for n, _ in edges:
            if n is not None:
                consumers[n] = consumers.get(n, 0) + 1
                stack.append(n)
    return graph, consumers


def _zero_reach(roots: Sequence[Any], graph: dict[Any, tuple], consumers: dict[Any, int]) -> dict[Any, bool]:
    """Which nodes a structural zero can reach: a node's own zeros (it makes them), or zeros arriving from above.
    The engine adds the contributions of all consumers of a node's output, and a sum is a structural zero only
    where every term is one, so zeros arrive at an output only when *every* consumer of it sends them (a
    transformer's residual connection sends none: below it nothing is reached). Consumers come first
    (topological order); a root's sensitivity is its seed, a value. ``consumers`` is used up."""
    if not any(makes for _, makes, _, _ in graph.values()):
        return dict.fromkeys(graph, False)
    sent: dict[Any, bool] = {}  # node (its output 0) or (node, slot) -> every consumer of it so far sends zeros
    other_slots: dict[Any, set[int]] = {}  # nodes with consumers on outputs other than 0 (split, unbind, ...)
    reach: dict[Any, bool] = {}
    is_root = set(roots)
    stack = [r for r in is_root if r not in consumers]
    while stack:
        node = stack.pop()
        _, makes, edges, sends = graph[node]
        reached = node not in is_root and (sent.get(node, False) or
                                           any(sent[(node, k)] for k in other_slots.get(node, ())))
        reach[node] = reached or makes
        reached = reached or sends
        for n, slot in edges:
            if n is None:
                continue
            if slot:
                key: Any = (n, slot)
                other_slots.setdefault(n, set()).add(slot)
            else:
                key = n
            if not reached:
                sent[key] = False
            elif key not in sent:
                sent[key] = True
            left = consumers[n] - 1
            consumers[n] = left
            if not left:
                stack.append(n)
    return reach  # (a node left out, on a cycle, counts as reached: _plan's default)


def _plan(t_outputs: Sequence[Any], seeds: Sequence[Any]) -> str:
    """'plain' (PyTorch is already right), 'strong' (a NaN/Inf or a singular point is in the graph where a
    structural zero can reach it), or 'check' (the graph has nodes gradwise knows nothing about: one pass under
    the mode, as 'strong'). Raises _contract.Unreadable on a saved tensor it cannot read (the backward runs plain).

    This runs before every backward under strong zeros, so it is written for speed: one walk over the graph and a
    topological pass over what it found (_zero_reach), reading only what a structural zero could reach (see
    MAKES_NO_ZEROS; a node reached through some consumers but not all receives none), each saved tensor once (a layer's
    output saved by two nodes, q/k/v views of one projection: identified by what they read), and one
    reduction per saved tensor (small ones together). Singular tests of nodes no zero reaches from above run
    only when a softmax/exp node below holds exact zeros in its output (_ZERO_OUTPUT_TESTS)."""
    if traced((*t_outputs, *seeds)):  # a traced backward (torch.compile, make_fx): a graph, no data to read;
        return "plain"  # compiled graphs get strong zeros from gradwise._compile instead
    known_all = True
    saved: list[torch.Tensor] = []
    deferred: list = []  # singular-point tests of nodes no structural zero reaches from above
    zero_outputs: list = []  # nodes whose backward multiplies by their own output (softmax, exp)
    seen_tensors: set[tuple] = set()
    roots = [r for r in _root_nodes(t_outputs) if r is not None]
    graph, consumers = _graph(roots)
    reach = _zero_reach(roots, graph, consumers)
    for node, ((_, read, known, singular, _, zero_output, _), _, _, _) in graph.items():
        reached = reach.get(node, True)
        known_all &= known
        if zero_output is not None:
            zero_outputs.append((node, zero_output))
        if not reached:
            if singular is not None:
                deferred.append((node, singular))
            continue
        readable = True
        for name in read:
            try:
                value = getattr(node, name, None)
            except RuntimeError:  # freed by an earlier backward: nothing to read (the engine raises if it needs it)
                continue
            for raw in value if isinstance(value, (tuple, list)) else (value,):
                if raw is None:
                    continue
                if raw.unpack_hook is not None:  # a checkpoint's hook would recompute the forward
                    readable = False
                    continue
                t = raw.data
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
                    continue
                if t.layout != torch.strided or t.is_meta or t.is_nested or t.__class__ is not torch.Tensor:
                    _contract.check_saved(t)  # raises Unreadable for a kind it cannot read (the backward runs plain)
                if t.layout != torch.strided:
                    key: tuple = (id(t),)
                else:
                    ptr = t.data_ptr()
                    if ptr == t.storage_offset() * t.element_size():  # storage freed until a hook refills it
                        # (FSDP's resharded parameters): a freed storage's pointer is 0, plus the view's offset
                        readable = False
                        continue
                    key = (ptr, t.dtype, t.shape, t.stride())
                if key not in seen_tensors:
                    seen_tensors.add(key)
                    saved.append(t)
        known_all &= readable
        if singular is not None and readable and singular(node):
            return "strong"
    # a softmax/exp output of exactly 0 is a structural zero of its own: an infinite derivative (sqrt of a masked
    # softmax, its entropy) meets it inside that node's backward. The singular tests (on small tensors, usually)
    # go first; the outputs are read only when one of them holds.
    if deferred and zero_outputs and any(_readable(n) and test(n) for n, test in deferred) and \
            any(_readable(n) and test(n) for n, test in zero_outputs):
        return "strong"
    if saved:  # a seed's NaN/Inf matters only where a structural zero can meet it
        saved.extend(t for t in seeds if isinstance(t, torch.Tensor) and t.is_floating_point())
    if not _all_finite(saved):
        return "strong"
    return "plain" if known_all else "check"


def _engine_run(t_outputs, grad_tensors, retain_graph, create_graph, inputs=(), allow_unreachable=True,
                accumulate_grad=True):
    """Replacement for ``torch.autograd._engine_run_backward`` while strong zeros are on (thread-local). Every
    path calls the engine exactly once with the caller's retain_graph/create_graph, so what the engine frees,
    what a backward sees (``_get_current_graph_task_keep_graph``) and what hooks run are PyTorch's."""
    assert _original_engine_run is not None

    def run(retain):
        return _original_engine_run(t_outputs, grad_tensors, retain, create_graph, inputs,
                                    allow_unreachable=allow_unreachable, accumulate_grad=accumulate_grad)

    if _STATE.depth == 0 and not _process_wide:
        return run(retain_graph)  # strong zeros off in this thread
    if _STATE.in_mode:  # a backward started inside the strong-zero pass (a checkpoint's recomputation calling
        # autograd.grad, a custom backward): its own backward, planned as if it ran outside, as in the forward
        return _nested(_engine_run, t_outputs, grad_tensors, retain_graph, create_graph, inputs, allow_unreachable,
                       accumulate_grad)
    plan, _STATE.planned = _STATE.planned, None  # chosen already by gw.grad/gw.backward, or not
    if plan is None:
        why = _contract.plain_reason(t_outputs, inputs or (), grad_tensors or ())
        if why is None:
            try:
                with _disable_current_modes() if torch._C._len_torch_dispatch_stack() else contextlib.nullcontext():
                    plan = _plan(t_outputs, grad_tensors)  # modes around backward (a trace) don't see our checks
            except _contract.Unreadable as e:
                why = e.reason
        if why is not None:
            _contract.warn_plain(why)
            plan = "plain"
    if plan == "plain":
        return run(retain_graph)
    # 'strong', or 'check' (nodes gradwise knows nothing about): one pass under the mode. A plain pass first
    # with a re-run on NaN would force retain_graph, run hooks and custom backwards twice, and hold what the
    # engine frees (custom Functions' saved tensors) until the graph dies.
    run = compiled_run(run, t_outputs, inputs, accumulate_grad)  # torch.compile'd nodes: gradwise._compile
    if plan == "check" and getattr(run, "one_pass", True) is False:
        # compiled nodes whose strong variant (the inductor pass) runs outside the mode: compiled speed and
        # PyTorch's bits on finite data; the mode only if a NaN still crosses a graph boundary
        return _compiled_check_run(run, t_outputs, inputs, retain_graph, create_graph, accumulate_grad)
    return _run_strong(run, retain_graph, create_graph, t_outputs)


def _compiled_check_run(run, t_outputs, inputs, retain_graph, create_graph, accumulate_grad):
    """Run a graph with compiled nodes through their strong variants with the graph kept; only if a gradient
    holds NaN/Inf, run it again under the mode (compiled nodes op by op). The graph is then released as the
    engine would have released it."""
    stash: list[tuple[torch.Tensor, torch.Tensor]] = []
    leaves = _leaves(t_outputs, inputs) if accumulate_grad else []
    for leaf in leaves:
        if leaf.grad is not None:
            stash.append((leaf, leaf.grad))
            leaf.grad = None
    try:
        result = run(True)
        if _all_finite([leaf.grad for leaf in leaves if leaf.grad is not None] if accumulate_grad
                       else [r for r in result if r is not None]):
            if not retain_graph:
                _release_graph(_root_nodes(t_outputs))
        else:
            for leaf in leaves:
                leaf.grad = None
            result = _run_strong(run, retain_graph, create_graph, t_outputs)
    finally:
        for leaf, old in stash:
            if leaf.grad is None:
                leaf.grad = old
            elif create_graph:
                leaf.grad = old + leaf.grad
            else:
                leaf.grad = old.add_(leaf.grad)
    return result


def grad_in_pass(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor],
                 supports: _Supports) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, seeds, allow_unused=True)`` as part of the strong-zero pass that is
    running (a rule that differentiates a decomposition of its op): under a mode that shares ``supports``, so the
    seeds' structural zeros stay structural. A plain ``torch.autograd.grad`` there would be a nested backward,
    planned afresh outside the pass (``_nested``), with seeds it knows nothing about."""
    mode = _StrongZeroMode()
    mode.supports = supports
    engine_run = _original_engine_run or torch.autograd.graph._engine_run_backward  # a trace's re-run: not installed
    outer = _STATE.in_mode
    _STATE.in_mode = True
    try:
        with mode:
            return engine_run(tuple(outputs), tuple(seeds), False, False, tuple(inputs),
                              allow_unreachable=True, accumulate_grad=False)
    finally:
        _STATE.in_mode = outer


def _nested(engine_run: Callable[..., Any], *args: Any) -> Any:
    """Run a backward started inside the strong-zero pass outside of that pass's mode."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

    outer = _STATE.in_mode, _STATE.create_graph, _STATE.outputs_finite
    _STATE.in_mode = False
    try:
        if isinstance(_get_current_dispatch_mode(), _StrongZeroMode):
            with _pop_mode_temporarily():
                return engine_run(*args)
        return engine_run(*args)
    finally:
        _STATE.in_mode, _STATE.create_graph, _STATE.outputs_finite = outer


def _run_strong(run: Callable[[bool | None], Any], retain_graph: bool | None, create_graph: bool,
                outputs: Sequence[Any] = ()) -> Any:
    outer = _STATE.create_graph, _STATE.outputs_finite
    _STATE.create_graph, _STATE.in_mode = create_graph, True
    _STATE.outputs_finite = all(bool(t.isfinite().all()) for t in outputs
                                if isinstance(t, torch.Tensor) and t.is_floating_point())
    try:
        with _under_traces(_StrongZeroMode()):
            return run(retain_graph)
    finally:
        (_STATE.create_graph, _STATE.outputs_finite), _STATE.in_mode = outer, False


@contextlib.contextmanager
def _under_traces(mode: TorchDispatchMode) -> Iterator[None]:
    """Enter ``mode`` below the gw.trace() recorders on top of the mode stack, so that a trace sees the backward
    ops PyTorch issues and their strong-zero results, not the strong-zero rules' own ops (which it would read
    as NaN made from finite values). Other modes (fake tensors, proxies) stay below ``mode`` as before."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode, _push_mode

    from gradwise._trace import _Tracer  # lazily: _trace imports this module

    above = []
    while isinstance(_get_current_dispatch_mode(), _Tracer):
        above.append(_pop_mode())
    try:
        with mode:
            for tracer in reversed(above):
                _push_mode(tracer)
            try:
                yield
            finally:
                for _ in above:
                    _pop_mode()
    finally:
        for tracer in reversed(above):
            _push_mode(tracer)


def _run_planned(run: Callable[[bool | None], Any], outputs: Sequence[Any], seeds: Any,
                 retain_graph: bool | None, inputs: Sequence[Any] = ()) -> Any:
    """gw.grad/gw.backward: choose the path before calling into torch.autograd (``run``). The everyday one,
    plain, then runs without the engine hook; any other goes through the hook with the path already chosen (so
    the graph is walked once). Inside ``strong_zeros()`` or under a dispatch mode the hook chooses."""
    plan = None
    if not (_STATE.depth or _process_wide) and not torch._C._len_torch_dispatch_stack():
        seeds = (seeds,) if isinstance(seeds, torch.Tensor) else seeds or ()
        why = _contract.plain_reason(outputs, inputs, seeds)
        if why is None:
            try:
                plan = _plan(outputs, seeds)
            except _contract.Unreadable as e:
                why = e.reason
        if why is not None:
            _contract.warn_plain(why)
            plan = "plain"
        if plan == "plain":
            return run(retain_graph)
    _STATE.planned = plan
    try:
        with strong_zeros():
            return run(retain_graph)
    finally:
        _STATE.planned = None  # not consumed when torch.autograd raised before reaching the engine


@contextlib.contextmanager
def strong_zeros() -> Iterator[None]:
    """Within this block every ``.backward()``, ``torch.autograd.backward`` and ``torch.autograd.grad`` of
    this thread uses strong zeros: values the output never uses cannot turn a gradient into NaN.

    Nesting is allowed. On finite data the gradients are bitwise PyTorch's.

    >>> import torch, gradwise as gw
    >>> lin = torch.nn.Linear(3, 1)
    >>> x = torch.cat([torch.ones(2, 3), torch.full((2, 3), float("nan"))])
    >>> with gw.strong_zeros():
    ...     lin(x)[:2].sum().backward()
    >>> bool(lin.weight.grad.isfinite().all())
    True
    """
    global _installed, _original_engine_run
    with _INSTALL_LOCK:
        if _installed == 0:
            _original_engine_run = torch.autograd._engine_run_backward
            torch.autograd._engine_run_backward = _engine_run
        _installed += 1
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
        with _INSTALL_LOCK:
            _installed -= 1
            if _installed == 0:
                torch.autograd._engine_run_backward = _original_engine_run


@contextlib.contextmanager
def strong_zeros_process_wide() -> Iterator[None]:
    """Strong zeros for every backward of every thread while the block runs (threads started inside it
    included); ``strong_zeros()`` covers only the calling thread. Used by ``gradwise run --strong-zeros``."""
    global _process_wide
    outer = _process_wide
    with strong_zeros():
        _process_wide = True
        try:
            yield
        finally:
            _process_wide = outer


def grad(
    outputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge],
    inputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge] | dict[str, torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    only_inputs: bool = True,
    allow_unused: bool | None = None,
    is_grads_batched: bool = False,
    materialize_grads: bool = False,
) -> tuple[torch.Tensor | None, ...] | dict[str, torch.Tensor | None]:
    """Drop-in for ``torch.autograd.grad`` with strong zeros: the gradient equals that of the same program
    with the values the output never uses deleted. A NaN/Inf the output really depends on stays.

    Takes every argument of ``torch.autograd.grad``, in its order and with its meaning (GradientEdge outputs and
    inputs, any iterable or a dict of inputs). With ``is_grads_batched=True`` the backward runs under vmap, where
    strong zeros cannot read values: it runs as plain PyTorch with a ``PlainBackwardWarning`` (as under
    torch.func transforms and for complex/sparse/mkldnn/nested tensors).

    >>> import torch, gradwise as gw
    >>> x = torch.tensor([-1.0, 4.0], requires_grad=True)
    >>> y = torch.where(x > 0, x.sqrt(), 0.0).sum()
    >>> torch.autograd.grad(y, x, retain_graph=True)[0]
    tensor([   nan, 0.2500])
    >>> gw.grad(y, x)[0]
    tensor([0.0000, 0.2500])
    """
    outs = as_tensors(_contract.as_outputs(outputs), "outputs", "gw.grad")
    ins = as_tensors(_contract.as_inputs(inputs, "gw.grad"), "inputs", "gw.grad")
    check_differentiable(outs, "outputs", "gw.grad")
    check_differentiable(ins, "inputs", "gw.grad")
    if not is_grads_batched:  # batched seeds carry a leading batch dimension: torch.autograd checks them
        check_scalar_or_seeded(outs, grad_outputs, "gw.grad")

    def run(retain):
        return torch.autograd.grad(outs, inputs if type(inputs) is dict else ins, grad_outputs, retain, create_graph,
                                   only_inputs, allow_unused, is_grads_batched, materialize_grads)

    if is_grads_batched:
        _contract.warn_plain("batched")
        return run(retain_graph)
    return _run_planned(run, outs, grad_outputs, retain_graph, ins)


def backward(
    tensors: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge],
    grad_tensors: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    grad_variables: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    inputs: torch.Tensor | Iterable[torch.Tensor] | GradientEdge | Iterable[GradientEdge] | dict[str, torch.Tensor]
    | None = None,
) -> None:
    """Drop-in for ``torch.autograd.backward`` with strong zeros: accumulates into ``.grad``. Takes every
    argument of ``torch.autograd.backward``, in its order and with its meaning.

    >>> import torch, gradwise as gw
    >>> x = torch.tensor([0.0, 100.0], requires_grad=True)
    >>> gw.backward(torch.where(x < 50, x.exp(), 0.0).sum())
    >>> x.grad
    tensor([1., 0.])
    """
    outs = as_tensors(_contract.as_outputs(tensors), "tensors", "gw.backward")
    check_differentiable(outs, "tensors", "gw.backward")
    seeds = grad_tensors if grad_tensors is not None else grad_variables
    check_scalar_or_seeded(outs, seeds, "gw.backward")
    ins: tuple = ()
    if inputs is not None:
        ins = as_tensors(_contract.as_inputs(inputs, "gw.backward"), "inputs", "gw.backward")
        check_differentiable(ins, "inputs", "gw.backward")

    def run(retain):
        torch.autograd.backward(outs, grad_tensors, retain, create_graph, grad_variables,
                                None if inputs is None else inputs if type(inputs) is dict else ins)

    _run_planned(run, outs, seeds, retain_graph, ins)
