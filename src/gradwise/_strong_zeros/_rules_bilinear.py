"""Strong-zero rules for bilinear ops: mm/bmm, mv, convolution (in double backwards) and convolution_backward
(which NaN/Inf of an operand a structural zero of the other meets, counted per contraction). Where the supports go
is the shared fact (``gradwise._ops._contractions``, which the compiled pass reads too); how NaN/Inf are counted
and restricted on eager values is this module's.

May import: torch, gradwise._masks, gradwise._ops, _supports, _rules, _rules_pointwise, _weights_layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from gradwise._masks import EagerMasks, mask_any
from gradwise._ops._contractions import conv_input_reads, conv_output_support, mm_reads, mm_support, mv_support
from gradwise._strong_zeros._kernel_reads import (
    ZERO_ALPHA_PRODUCTS,
    _graph_skips_product,
    _kernel_skips_product,
    _zero_beta,
    _zero_beta_of_a_read_product,
)
from gradwise._strong_zeros._rules import (
    _UNRULED,
    Rule,
    _annihilate,
    _hooked,
    _in_formula,
    _is_float,
    _Kept,
    _reads_nodes,
    _register,
)
from gradwise._strong_zeros._rules_pointwise import _exp_result_mul
from gradwise._strong_zeros._supports import _STATE
from gradwise._strong_zeros._weights_layout import _SAME_STORAGE, bit_copies, copies_only, mapped_mask

aten = torch.ops.aten


CountArgs = Callable[[tuple, int, list[int]], Callable[[list], list]]
Restrict = Callable[[tuple, int, torch.Tensor, "torch.Tensor | None"], "tuple[list, bool | None] | None"]
Meets = Callable[[Any, tuple, int, torch.Tensor, list[int]], bool]


def _nonfinite_part(func, args, slot: int, s: torch.Tensor, value_slots: list[int], dirty: list[int],
                    count_args: CountArgs):
    """The NaN/Inf that terms with a *supported* sensitivity element contribute to a bilinear op, counted by
    running the op on 0/1 indicators: terms that meet NaN (or 0 x Inf), +Inf, and -Inf. ``count_args`` may
    shrink those runs (e.g. to the contraction indices where a value is non-finite). Complex operands have no
    signed infinities: a supported term meeting any NaN/Inf counts as NaN (the result stays non-finite)."""
    sens = args[slot]
    shrink = count_args(args, slot, dirty)
    shrunk = shrink([*args])
    # the indicators run in the real dtype (complex 0/1 counts could not be compared with 0)
    real = sens.real.dtype if sens.is_complex() else sens.dtype

    def run(s_ind, value_ind):
        new = list(args)
        new[slot] = s_ind
        new = shrink(new)
        new[slot] = new[slot].to(real)
        for j in value_slots:
            new[j] = value_ind(new[j]).to(real)
        return func(*new)

    if sens.is_complex():
        return run(s, lambda v: ~torch.isfinite(v)), None, None
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


def _mm_supported_k(args: tuple, slot: int, s: torch.Tensor, finite_k: torch.Tensor | None = None
                    ) -> tuple[list, bool | None] | None:
    """mm/bmm: a contraction index k at which the sensitivity holds only structural zeros contributes
    nothing, so dropping it from both operands is exact. This is how a batch's padding rows leave a weight
    gradient without a copy when they form a range. None when every k is supported; else the operands kept and,
    from ``finite_k`` (per k, whether the value is finite there: `_mm_finite_k`), whether the kept value is."""
    reads = mm_reads(EagerMasks, slot, s)  # (.., K, 1) or (.., 1, K): the shared fact
    # (mm's (K, 1) or (1, K) is the answer as it is; bmm's is reduced over its batch)
    kept = reads.reshape(-1) if reads.dim() == 2 else \
        mask_any(reads.reshape(-1, s.shape[-1] if slot == 0 else s.shape[-2]), 0)
    k = _Kept(kept)
    if k.n == kept.shape[0]:
        return None
    clean = None if finite_k is None else bool(k.pick(finite_k, -1).all())
    return [k.pick(args[0], -1), k.pick(args[1], -2)], clean


def _mm_finite_k(args: tuple, slot: int) -> torch.Tensor:
    """mm/bmm: per contraction index k (and batch), whether the value operand is finite there, from one sum
    over its other dim (a finite sum: no NaN/Inf went in; an overflow reads as not finite, the exact path's
    case). The same one pass as a whole-tensor sum, and the restricted operand's test is then free."""
    return _sums(args[1 - slot], -1 if slot == 0 else -2).isfinite()  # value b: (.., K, N); value a: (.., M, K)


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
    (N, 1, ...), kernel of ones. Nonzero exactly where some supported element reaches through the kernel
    (grad_weight per sample: (N, 1, *kernel), whose any is the batch sum's)."""
    s1 = mask_any(s, 1, keepdim=True).to(args[0].dtype)
    ones = args[2].new_ones((1, 1, *args[2].shape[2:]))
    return one_channel_backward(func, (s1, x1, ones, None, *args[4:9], 1), want)


def one_channel_backward(func, args: tuple, want: int) -> torch.Tensor:
    """``func`` (convolution_backward) of a one-channel convolution, ``args`` its arguments (g (N, 1, *out), x
    (N, 1, *in), kernel (1, 1, *k), ..., groups 1): output ``want`` (0: grad_input, 1: grad_weight) as one call with
    the batch folded into N groups of one channel, each sample's sums as before (grad_weight comes per sample,
    (N, 1, *k)). oneDNN runs a one-channel batch ~15x slower than the same sums as groups (a 32x36x36 batch: 3 ms
    against 0.2 ms): this was most of the cost of a cropped NaN border's convolution rule."""
    g, x, w = args[:3]
    n = g.shape[0]
    if n == 0 or g.shape[1] != 1 or x.shape[1] != 1 or args[9] != 1:
        return func(*args[:10], [want == 0, want == 1, False])[want]
    folded = func(g.reshape(1, n, *g.shape[2:]), x.reshape(1, n, *x.shape[2:]),
                  w.expand(n, *w.shape[1:]).contiguous(), None, *args[4:9], n, [want == 0, want == 1, False])[want]
    return folded.view(n, 1, *folded.shape[2:]) if want == 0 else folded


def _conv_meets(func, args, slot: int, s: torch.Tensor, dirty: list[int]) -> bool:
    """convolution_backward with a non-finite input: can a supported grad_output element meet one of its
    NaN/Inf through the kernel? Asked of one channel (supported anywhere across output channels, non-finite
    anywhere across input channels), so a cropped NaN border costs a single-channel convolution. The positions
    are first read from the sums over channels (one pass; a finite sum: no NaN/Inf went in), whose overflow only
    adds positions: where those meet nothing, nothing does; else the exact test (isfinite, ~8x slower) decides."""
    if slot != 0 or dirty != [1]:
        return True
    x = args[1]
    if not x.is_complex():
        bad = ~_sums(x, 1).isfinite().unsqueeze(1)
        if not bool(_one_channel_conv(func, args, s, bad.to(x.dtype), 1).any()):
            return False
    bad = mask_any(~torch.isfinite(x), 1, keepdim=True).to(x.dtype)
    return bool(_one_channel_conv(func, args, s, bad, 1).any())


def _tree_add(a, b):
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_add(x, y) for x, y in zip(a, b, strict=True))
    return None if a is None else a + b


def _sums(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """t's sum (over ``dim``): finite iff no NaN/Inf went in, unless it overflowed, which reads as not finite (the
    caller then takes its exact, slower path, never a wrong one). In float32 at least; a complex tensor in its
    own dtype (a cast to a real one would drop the imaginary parts)."""
    if t.is_complex():
        return t.sum() if dim is None else t.sum(dim)
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.sum(dtype=dtype) if dim is None else t.sum(dim, dtype=dtype)


def _finite(t: torch.Tensor) -> bool:
    """One pass: `_sums` of all of t."""
    return bool(_sums(t).isfinite())


def _bilinear(support_fn: Callable[[Any, tuple, int, torch.Tensor], Any], count_args: CountArgs = _all_args,
              restrict: Restrict | None = None, meets: Meets | None = None,
              own_zeros: Callable[[Any, tuple], Any] | None = None,
              finite_k: Callable[[tuple, int], torch.Tensor] | None = None) -> Rule:
    """Rule factory for ops bilinear in a sensitivity and a value (mm, bmm, convolution backward). When a
    value holds NaN/Inf: first drop what only structural zeros read (``restrict``); if what remains is finite,
    that is the answer. Otherwise the values' NaN/Inf are replaced by 0 for the main computation, and unless
    ``meets`` shows no supported term reaches one, the NaN/Inf that supported terms really meet are counted
    with 0/1 indicators and added back: unsupported terms contribute exactly 0 and every genuine NaN/Inf
    survives. ``support_fn(func, args, slot, s)`` gives the outputs' supports; ``own_zeros(func, args)``
    those of an op that makes structural zeros from a fully supported sensitivity (a strided convolution);
    ``finite_k(args, slot)`` the value's finiteness per contraction index, which also decides the restricted
    operand's."""

    def bilinear(func, args, kwargs, sup):
        slots = [i for i, a in enumerate(args) if _is_float(a)]
        held = {i: s for i in slots if (s := sup.of(args[i])) is not None}  # (one storage lookup per operand)
        tracked = list(held)
        if tracked == [0, 1] and func.overloadpacket in (aten.mm, aten.bmm):
            return _both_tracked_mm(func, args, kwargs, sup)
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
        s = held[slot]
        values = [i for i in slots if i != slot]
        per_k = finite_k(args, slot) if finite_k is not None and values == [1 - slot] else None
        if per_k is not None:
            dirty = [] if bool(per_k.all()) else values
        else:
            dirty = [i for i in values if not _finite(args[i])]
        if dirty:
            # lazily conjugated (or negated) operands are resolved first: inside a dispatch mode's handler, the ops
            # below that PyTorch's Conjugate/Negative fallbacks would materialise for (index_select, nan_to_num,
            # comparisons) read the raw data (pytorch#198118). mm and bmm themselves take such operands natively.
            args = tuple(a.resolve_conj().resolve_neg() if isinstance(a, torch.Tensor) else a for a in args)
        out = None
        if dirty and restrict is not None:
            restricted = restrict(args, slot, s, per_k)
            if restricted is not None:
                kept, clean = restricted
                if clean if clean is not None else all(_finite(kept[i]) for i in dirty):
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


def _both_tracked_mm(func, args, kwargs, sup):
    """mm/bmm of two tensors that both carry supports (a double backward: a sensitivity times a first-pass value
    with structural zeros, carried as such): out[i, j] = sum_k a[i, k] b[k, j] over the terms where both are
    supported. Their NaN/Inf are replaced by 0 and, where a term with both supported meets one, the output is the
    plain product there (the NaN/Inf stays); out[i, j] is a structural zero where no term has both supported."""
    return _supported_mm(func, args, kwargs, sup, sup.of(args[0]), sup.of(args[1]))


def _supported_mm(func, args, kwargs, sup, sa, sb):
    """``_both_tracked_mm`` with the operands' supports given (``_masked_weights_mm``: one of them read from the
    operand's values)."""
    a, b = args[0], args[1]
    if sa is None and sb is None:  # nothing structural to drop: PyTorch's own
        out = func(*args, **kwargs)
        sup.record(out, None)
        return out
    fa, fb = (torch.ones_like(t) if s is None else s.expand(t.shape).to(t.dtype) for t, s in ((a, sa), (b, sb)))
    dirty = [not _finite(t) for t in (a, b)]
    if not any(dirty):
        out = func(*args, **kwargs)  # finite: PyTorch's bits
    else:
        na, nb = (torch.where(torch.isfinite(t), 0.0, f) if d else torch.zeros_like(t)
                  for t, f, d in ((a, fa, dirty[0]), (b, fb, dirty[1])))
        hit = (func(na, fb) + func(fa, nb)) > 0  # a supported term meets a NaN/Inf
        clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) if d else t for t, d in zip((a, b), dirty,
                                                                                                  strict=True)]
        out = torch.where(hit, func(a, b), func(*clean))
    sup.record(out, func(fa, fb) > 0)
    return out


def _add_nonfinite(out, nan_hits, plus, minus):
    if isinstance(out, (tuple, list)):
        n = len(out)
        parts = [x if isinstance(x, (tuple, list)) else (x,) * n for x in (nan_hits, plus, minus)]
        return type(out)(_add_nonfinite(o, a, b, c) for o, a, b, c in zip(out, *parts, strict=True))
    if out is None or nan_hits is None:  # an output that meets no value (conv's grad_bias)
        return out
    bad = nan_hits > 0
    if plus is None:
        return out.masked_fill_(bad, complex(math.nan, math.nan) if out.is_complex() else math.nan)
    extra = torch.where(plus > 0, float("inf"), 0.0) + torch.where(minus > 0, float("-inf"), 0.0)
    extra = extra.masked_fill(bad, float("nan")).to(out.dtype)
    return out.add_(extra)


def _mm_support(func, args, slot, s):
    """mm/bmm: the shared fact (``_contractions.mm_support``)."""
    return mm_support(EagerMasks, slot, s)


def _mv_support(func, args, slot, s):
    """mv: the shared fact (``_contractions.mv_support``)."""
    return mv_support(EagerMasks, slot, s)


def _reads_every_position(stride, dilation, transposed) -> bool:
    """A convolution with stride 1 and dilation 1 (not transposed) reads every input position in some window,
    so its input gradient has no structural zero of its own; a strided one can skip positions."""
    return not transposed and all(v == 1 for v in stride) and all(v == 1 for v in dilation)


def _conv_backward_support(func, args, slot, s):
    """convolution_backward(grad_output, input, weight, ...): grad_input's support from a one-channel
    convolution of where grad_output is supported (any output channel) with a kernel of ones, over every
    input channel: a superset of the exact support, which is sound (a support may only be too large).
    grad_weight and grad_bias sum over the batch and space of one output channel each (_conv_channel_supports)."""
    if slot != 0:
        return (None, None, None)
    mask = args[10]
    weight, bias = _conv_channel_supports(args, s) if mask[1] or mask[2] else (None, None)
    return (conv_input_reads(_ConvMasks, args, s) if mask[0] else None, weight if mask[1] else None,
            bias if mask[2] else None)


class _ConvMasks(EagerMasks):
    """The eager mask algebra with ``conv_input_reads``' one-channel convolution_backward run batch-folded
    (``one_channel_backward``: the same sums, ~15x faster on CPU)."""

    @staticmethod
    def call(op, *args):
        if op is aten.convolution_backward.default and list(args[10]) == [True, False, False]:
            return one_channel_backward(op, args, 0), None, None
        return op(*args)


def _conv_channel_supports(args: tuple, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The supports of convolution_backward's grad_weight and grad_bias: the filters (and bias) of an output
    channel whose grad_output is all structural zeros (a channel the loss never reads: a pruned filter, a
    cropped-away class map) add only structural zeros, whatever NaN/Inf the input holds, so they are structural
    zeros too; such a weight need not be a leaf (weight_norm, weight standardisation, LoRA), and a NaN made from
    it upstream (0/0 of a zero filter's norm) then meets them. The filters of every other channel are supported."""
    g, weight, transposed, groups = args[0], args[2], args[7], args[9]
    channel = mask_any(s.expand(g.shape), [d for d in range(g.dim()) if d != 1])  # (C_out,)
    ones = (1,) * (weight.dim() - 2)
    if not transposed:  # weight (C_out, C_in / groups, *kernel)
        return channel.view(-1, 1, *ones), channel
    # transposed: weight (C_in, C_out / groups, *kernel); input channel i belongs to group i // (C_in / groups)
    per_group = channel.view(groups, 1, -1).expand(groups, weight.shape[0] // groups, weight.shape[1])
    return per_group.reshape(weight.shape[0], weight.shape[1], *ones), channel


_MM = _bilinear(_mm_support, _mm_nonfinite_k, restrict=_mm_supported_k, finite_k=_mm_finite_k)
# the nodes whose formula multiplies a saved operand that may be a softmax's weights into the other operand's gradient
# (an mm/bmm there): each such operand's edge and saved name. The weights first (a @ v: v's gradient a^T @ g) or second
# (v @ a^T, SAGAN's and non-local blocks' bmm(v, attention.permute(0, 2, 1)): v's gradient g @ a); addmm/baddbmm(bias,
# a, v, alpha=c): (a^T @ g) * c. Until 2026-12-07 (sz35) only mm/bmm's first operand was read: the others kept a padded
# value's 0 x inf = NaN, silently
_MM_OPERANDS = ((0, "_saved_self"), (1, "_saved_mat2"))
_MASKED_WEIGHTS_NODES = {"BmmBackward0": _MM_OPERANDS, "MmBackward0": _MM_OPERANDS,
                         "BaddbmmBackward0": ((1, "_saved_batch1"), (2, "_saved_batch2")),
                         "AddmmBackward0": ((1, "_saved_mat1"), (2, "_saved_mat2"))}


# nodes between a softmax and the bmm that reads its weights which keep each weight's position and a 0 weight 0:
# dropout (CPU's eager one is a mul by its noise, a constant; its dropped weights are values, not structural: only
# the softmax's own zeros are read), a scaling, views that keep the elements' order (a[None], view, reshape, clone)
# (matmul of 4-d weights: expand then reshape; each copy an expand makes is mapped to its weight: _weights_layout)
_WEIGHT_PATH = frozenset(("NativeDropoutBackward0", "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1",
                          "UnsqueezeBackward0",
                          "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
                          "ToCopyBackward0", "ExpandBackward0",
                          # (a sum over heads, einsum's bhqk,bkd->bqd: 0 where every term is a masked entry's)
                          "SumBackward0", "SumBackward1", "RepeatBackward0"))


# elementwise nodes between a softmax and the bmm whose other operand may need a gradient (or hold a tensor), and the
# edges the weights may come through: a gate (p * g, g * p), a renormalisation (p / p.sum(-1)), the usual repairs of
# a fully masked row (p.nan_to_num(0), p.masked_fill(key_mask, 0), where(key_mask, 0, p)). Each keeps the weights'
# order; where the softmax's result is 0 (a masked key) a weight of 0 is that key's (its value is unused: the program
# with the padded key deleted has no such weight), and a weight the other operand made other than 0 there is read as
# a value (``masked_weights`` maps the result's zeros and the weights' together). Until 2026-12-07 only constant
# factors were followed: these kept PyTorch's 0 x inf = NaN at a padded value's infinite slope, silently.
_GATED_PATH = {"MulBackward0": (0, 1), "DivBackward0": (0,), "NanToNumBackward0": (0,), "MaskedFillBackward0": (0,),
               "MaskedFillBackward1": (0,), "WhereBackward0": (0, 1)}
# of those, the ones whose other edge replaces weights rather than scales them: followed only where that edge needs no
# gradient (a constant fill). A fill that needs one (a learned prior in where(keep, a, prior), a learned masked_fill
# value) puts its own value at the masked key, whose 0 is a value: the key's value is read (the fill's gradient is
# g . v there) and PyTorch's 0 x inf at its infinite slope is genuine; until 2026-12-07 it was hidden (test_review_sz34)
_REPLACED_BY_OTHER = frozenset(("MaskedFillBackward1", "WhereBackward0"))


# the softmaxes whose exact 0 is a masked entry's: softmax's, and _safe_softmax's (SDPA's math backend: a fully
# masked row is 0 there rather than NaN); until 2026-12-07 the math backend's weights were values in v's gradient
_SOFTMAXES = frozenset(("SoftmaxBackward0", "SafeSoftmaxBackward0"))  # (and exp(log_softmax(s)): _of_log_softmax)


def _of_log_softmax(node: Any) -> bool:
    """Whether the ExpBackward0 ``node`` is exp(log_softmax(s)): a softmax written through its log (its saved result
    the weights, whose exact 0 is a masked entry's exp(-inf) as softmax's is)."""
    edge = node.next_functions[0][0]
    return edge is not None and edge.name() == "LogSoftmaxBackward0"


# the node names (``name()``) at which ``_path_from`` ends a weights path, each with its test that the node is one.
# The one table both read: a graph with no node so named has no softmax's weights in any mm/bmm, and the plan's walk
# then reads no mm/bmm's weights fact (``_planning._walked``); an end added to one list only (its names were two
# lists) would be followed by the rules and skipped by the plan, silently (test_review_perf_sz35)
_WEIGHTS_END_TESTS: dict[str, Callable[[Any], bool]] = {
    **dict.fromkeys(_SOFTMAXES, lambda node: True), "ExpBackward0": _of_log_softmax}
WEIGHTS_ENDS = _WEIGHTS_END_TESTS.keys()  # (a view: it follows the table)


_FOLLOWED = _WEIGHT_PATH | _SAME_STORAGE | frozenset(_GATED_PATH)
_PATH_BUDGET = 8  # nodes a weights path may hold (a gated node tries two factors: under 2**9 nodes visited)


def weights_paths(node: Any) -> list[tuple[list[Any], str]]:
    """For each operand of the mm/bmm/addmm/baddbmm ``node`` (``_MASKED_WEIGHTS_NODES``) that is a softmax's output,
    the nodes from its edge to that SoftmaxBackward0 (the last one) and the operand's saved name. A path goes through
    the nodes of ``_WEIGHT_PATH`` whose other edges need no gradient (a mul by a constant), through views that keep
    the storage (``_SAME_STORAGE``: an einsum's permutes), and through ``_GATED_PATH``'s."""
    edges = node.next_functions
    found = []
    for edge, saved in _MASKED_WEIGHTS_NODES.get(node.name(), ()):
        path = _path_from(edges[edge][0], _PATH_BUDGET) if edge < len(edges) else None
        if path is not None:
            found.append((path, saved))
    return found


def _path_from(producer: Any, budget: int) -> list[Any] | None:
    """A weights path (``weights_paths``) from ``producer`` on, at most ``budget`` nodes."""
    path: list[Any] = []
    while producer is not None and len(path) < budget:
        path.append(producer)
        name = producer.name()
        end = _WEIGHTS_END_TESTS.get(name)
        if end is not None and end(producer):
            return path
        if name not in _FOLLOWED:  # (before the edges: most mm/addmm operands end here, a Linear's on every backward)
            return None
        edges = producer.next_functions
        if name in _GATED_PATH:  # (two tracked factors: the first that leads to a softmax)
            for i in _GATED_PATH[name]:
                if name in _REPLACED_BY_OTHER and any(e[0] is not None for j, e in enumerate(edges) if j != i):
                    continue
                tail = _path_from(edges[i][0], budget - len(path)) if i < len(edges) else None
                if tail is not None:
                    return path + tail
            return None
        if not edges or any(e[0] is not None for e in edges[1:]):
            return None
        producer = edges[0][0]
    return None


def reads_softmax_weights(node: Any) -> bool:
    """Whether the rules of an MmBackward0/BmmBackward0 or MulBackward0 ``node`` would read a softmax's weights from
    the graph (``_masked_weights_mm``, ``_softmax_factor``): node types and the pass's state only, no value
    (``_transforms._node_readers``). They act only while the outputs are finite (a used NaN's gradient is PyTorch's
    there anyway; a vmap batch where some sample's output is not finite: ``_transforms.per_sample_lost``)."""
    return _STATE.outputs_finite and follows_softmax_weights(node)


def follows_softmax_weights(node: Any) -> bool:
    """``reads_softmax_weights`` whatever the outputs: whether ``node`` multiplies a softmax's weights (its graph)."""
    if node.name() == "MulBackward0":
        return any(_path_from(producer, _PATH_BUDGET) is not None for producer, _ in node.next_functions[:2])
    return bool(weights_paths(node))


def _masked_entries(end: Any) -> torch.Tensor | None:
    """Where the softmax ``end`` of a weights path (``_path_from``'s last node) masked an entry (bool, shaped like its
    result), or None where a hook packed what that takes. A softmax's exact 0 (an underflow's looks the same: see the
    known limits); for exp(log_softmax(s)) the log's -inf, since an exp of a finite log that underflowed (a key with a
    finite -1000 or finfo.min bias) is a value, as exp's own rule takes it: the key is used, and until 2026-12-07 its
    value's 0 x inf = NaN was hidden there (test_review_sz34)."""
    mask_of = end.name() == "ExpBackward0" and end.next_functions[0][0]
    result = None if _result_hooked(end) else (mask_of or end)._saved_result
    return None if result is None else result == (-math.inf if mask_of else 0)


def _result_hooked(end: Any) -> bool:
    """Whether what ``_masked_entries`` reads of ``end`` (its saved result, exp(log_softmax)'s log's) has a hook."""
    return _hooked((end.name() == "ExpBackward0" and end.next_functions[0][0]) or end, "_raw_saved_result")


def masked_weights(node: Any, path: list[Any], weights: torch.Tensor) -> torch.Tensor | None:
    """Where the mm/bmm ``node``'s operand ``weights`` (saved), the output of the softmax ``path[-1]`` through ``path``
    (``weights_paths``), is that softmax's exact 0 (bool, shaped like ``weights``), or None where the softmax's result
    cannot be read without a hook. Weights that are copies of its elements (``copies_only``: views, clones; also
    where a checkpoint's hook packed the softmax's result) or share its storage hold its zeros where they are; others
    are mapped through the layout nodes on the way (``_weights_layout.mapped_mask``: permutes, transposes, slices,
    expands, views, copies; dropout, scalings and gates keep each weight where it was; a dropout's or a scaling's
    zeros on the way are not among them, nor a weight that a factor on the way made other than 0)."""
    softmax = path[-1]
    exact = softmax.name() != "ExpBackward0"  # (whose own zeros may be a finite log's underflow: _masked_entries)
    if bit_copies(path, weights):  # (the softmax's own output, or copies of its elements: its exact zeros)
        return weights == 0
    masked = _masked_entries(softmax)
    if masked is None:
        return None
    result = softmax._saved_result if exact else None
    if result is not None and result.untyped_storage()._cdata == weights.untyped_storage()._cdata \
            and result.dtype == weights.dtype:
        return weights == 0
    masked = mapped_mask(node, path, masked)
    if masked is None or masked.shape != weights.shape:
        return None
    return masked & (weights == 0)  # (a factor's NaN on the way: no zero)


def _softmax_weights(args: tuple, sup: Any) -> tuple[int, torch.Tensor] | None:
    """In the backward of ``bmm(a, v)`` (or mm, ``bmm(v, a)``, addmm, baddbmm: ``_MASKED_WEIGHTS_NODES``) whose ``a``
    is a softmax's output (attention weights: the node's edge a SoftmaxBackward0, or one through dropout and views:
    ``masked_weights``), the position of the formula's operand that is ``a`` (v's gradient ``a^T @ g``) and where the
    softmax's weights are 0, where they hold an exact 0 and every output being differentiated is finite; else None."""
    if not (_STATE.outputs_finite and _in_formula() and _reads_nodes()):
        return None
    node = torch._C._current_autograd_node()
    if node is None or node.name() not in _MASKED_WEIGHTS_NODES:
        return None
    for path, saved in weights_paths(node):
        hidden = _hooked(node, "_raw" + saved)  # (a hook's tensors unpack once, for the formula: unread)
        if hidden or (not bit_copies(path, weights := getattr(node, saved)) and _result_hooked(path[-1])):
            _hidden_weights(sup, None if hidden else weights)
            continue
        found = _weights_in_args(args, node, path, saved)
        if found is not None:
            return found
    return None


def _hidden_weights(sup: Any, weights: torch.Tensor | None) -> None:
    """Names weights whose masked zeros a hook hides (sz36), unless the product's own ``weights`` (readable) hold no 0
    or NaN: no key is masked (sz36 blamed a genuine NaN on masked keys that were none)."""
    if not (isinstance(weights, torch.Tensor) and (not weights.numel() or bool(weights.abs().amin() > 0))):
        sup.unfollowed.append(_HOOKED_WEIGHTS)


_HOOKED_WEIGHTS = (
    "the weights of a softmax multiplied by the values (mm/bmm, addmm/baddbmm, mul), whose masked keys' zeros a hook "
    "hides (a non-reentrant checkpoint's: its saved tensors unpack once, for the backward formula): the product's "
    "saved weights (a checkpoint around both), or the softmax's result where more than views and copies (a "
    "scaling, dropout) come between them",
    "keep the product of the weights and the values outside the checkpoint, with only views or copies between the "
    "softmax and it")


def _weights_in_args(args: tuple, node: Any, path: list[Any], saved: str) -> tuple[int, torch.Tensor] | None:
    """``_softmax_weights`` for one operand of ``node``: the saved ``saved`` (no hook), the output of ``path``."""
    weights = getattr(node, saved)
    if weights is None or not _is_float(weights):
        return None
    cdata = weights.untyped_storage()._cdata
    for i, t in enumerate(args[:2]):
        # (the operand itself or its transpose: another view of its storage, bmm(buf[:, 0], buf[:, 1]), is other
        # weights, whose zeros sz35 took for these ones', silently)
        if _is_float(t) and t.untyped_storage()._cdata == cdata and t.storage_offset() == weights.storage_offset() \
                and any(t.shape == w.shape and t.stride() == w.stride() for w in (weights, weights.mT)):
            zero = masked_weights(node, path, weights)
            if zero is None or not bool(mask_any(zero)):
                return None
            if torch.equal(zero, weights == 0):  # every zero of the weights is the softmax's: read them in t's layout
                return i, t == 0
            for view in (zero, zero.mT):  # (v's gradient reads the weights transposed)
                if view.shape == t.shape and t.stride() == (weights if view is zero else weights.mT).stride():
                    return i, view
            return None
    return None


def _softmax_factor(args: tuple, sup: Any) -> tuple[int, torch.Tensor] | None:
    """In MulBackward0's formula (``g * other``, ``g * self``) of a product with a softmax's weights (attention
    pooling: ``(softmax(s)[..., None] * h).sum(1)``), the position of the factor that is those weights and its zeros
    that are the softmax's, while every output being differentiated is finite; else None. The weights are the
    softmax's saved result or a view of it (the same storage: its exact zeros are the softmax's), or reach the
    product through the nodes ``weights_paths`` follows to an mm/bmm (a scaling, a gate, a renormalisation, the
    repairs of fully masked rows), mapped by the elements' order as ``masked_weights`` maps them (until 2026-12-07
    only views were seen, and the others kept PyTorch's 0 x inf = NaN at a padded value's infinite slope, silently)."""
    if not (_STATE.outputs_finite and _in_formula() and _reads_nodes()):
        return None
    node = torch._C._current_autograd_node()
    if node is None or node.name() != "MulBackward0":
        return None
    for edge, (producer, _) in enumerate(node.next_functions[:2]):
        path = _path_from(producer, _PATH_BUDGET)
        if path is None:
            continue
        # (copies of the softmax's elements alone: the factor's zeros are its own, also where a checkpoint's hook
        # packed the softmax's result; until 2026-12-07 such a factor was not read, its 0 x inf = NaN kept)
        copies = copies_only(path)
        hooked = _result_hooked(path[-1])
        viewed = not hooked and copies and all(p.name() in _SAME_STORAGE for p in path[:-1])
        if viewed:
            factor = path[-1]._saved_result  # (a view of the result: the same storage, its exact zeros the softmax's)
        elif not _hooked(node, ("_raw_saved_self", "_raw_saved_other")[edge]):
            factor = (node._saved_self, node._saved_other)[edge]  # (the product's own operand)
        else:
            sup.unfollowed.append(_HOOKED_WEIGHTS)
            continue
        if not isinstance(factor, torch.Tensor):
            continue
        copies = copies and (viewed or bit_copies(path, factor))
        if hooked and not copies:
            _hidden_weights(sup, factor)
            continue
        masked = None
        if not copies:  # the masked entries among the factor's zeros, mapped through the path's layout nodes
            masked = _masked_entries(path[-1])
            masked = None if masked is None else mapped_mask(node, path, masked)
            if masked is None:
                continue
        cdata = factor.untyped_storage()._cdata
        for i, t in enumerate(args[:2]):
            if isinstance(t, torch.Tensor) and _is_float(t) and t.dtype == factor.dtype \
                    and t.untyped_storage()._cdata == cdata:
                zero = t == 0
                if masked is not None:
                    if masked.shape != t.shape:
                        return None
                    zero = zero & masked
                return (i, zero) if bool(mask_any(zero)) else None
    return None


def _masked_weights_mm(func, args, kwargs, sup):
    """mm/bmm's rule (``_MM``), with a softmax's exact-0 weights as structural zeros where they multiply in the
    backward of ``bmm(softmax(s), v)`` (``_softmax_weights``): a masked key's weight (exp(-inf) = 0: a -inf mask,
    ``key_padding_mask``) is 0 whatever the value holds, as in softmax's own backward (``_softmax_backward``), so
    v's gradient at a masked key is the deleted key's 0, also where its formula is singular (sqrt at a zero padding
    row: PyTorch's 0 x inf = NaN). nn.MultiheadAttention with need_weights=True (its default) runs this way; SDPA has
    its own rule (``_rules_attention``). Elsewhere, and where the outputs are not finite (an underflow's 0 then keeps
    PyTorch's NaN, as softmax's does), ``_MM``."""
    found = _softmax_weights(args, sup) if func.overloadpacket in (aten.mm, aten.bmm) else None
    if found is None:
        return _MM(func, args, kwargs, sup)
    slot, zero = found
    supports = [sup.of(args[0]), sup.of(args[1])]
    supports[slot] = ~zero if supports[slot] is None else supports[slot] & ~zero
    return _supported_mm(func, args, kwargs, sup, *supports)


_register(aten.mm, aten.bmm)(_masked_weights_mm)
_register(aten.mv)(_bilinear(_mv_support))


def _grouped_mm_support(func, args, slot, s):
    """_grouped_mm(a, b, offs, bias, out_dtype) (mixture-of-experts layers; its backward is _grouped_mm again):
    a matrix product per group, so an output element is a structural zero where no supported element of the
    sensitivity enters its sum: the op run on the support as 0/1 against ones (non-negative terms, != 0 exactly
    there). A bias (a value added to every element) or a sensitivity in another slot: fully supported."""
    if slot not in (0, 1) or (len(args) > 3 and args[3] is not None):
        return None
    ind = list(args[:3])
    ind[slot] = s.expand(args[slot].shape).to(args[slot].dtype)
    ind[1 - slot] = torch.ones_like(args[1 - slot])
    return func(*ind) != 0


if hasattr(aten, "_grouped_mm"):  # torch >= 2.8
    _register(aten._grouped_mm)(_bilinear(_grouped_mm_support))


def _grouped_mm_fallback_backward(func, args, kwargs, sup):
    """transformers::grouped_mm_fallback_backward(input, weight, offs, grad_output) -> (grad_input, grad_weight):
    Hugging Face's mixture-of-experts matmul where torch._grouped_mm cannot run (compiled with float32 weights),
    a loop over the experts: rows [lo, hi) of grad_output times weight[i]^T, and input[lo:hi]^T times them. Each
    product runs through mm's rule (the same mm, PyTorch's bits on finite data), so a discarded token's NaN, or
    an expert's that only discarded tokens reach, drops out; rows past the last offset and the weight of an
    expert no token reaches are the op's own zeros, structural."""
    x, w, offs, g = args
    if not any(sup.tracked(t) for t in (x, w, g)):
        return func(*args, **kwargs)
    mm = aten.mm.default
    rows, experts, start = [], [], 0  # (value, support) pairs
    for i, end in enumerate(offs.tolist()):
        if end == start:
            experts.append((w.new_zeros(w.shape[1:]), False))
        else:
            experts.append(_pair(_MM(mm, (x[start:end].t(), g[start:end]), {}, sup), sup))
            rows.append(_pair(_MM(mm, (g[start:end], w[i].t()), {}, sup), sup))
        start = end
    rows.append((x.new_zeros(x.shape[0] - start, x.shape[1]), False))
    out = []
    for parts, join in ((rows, torch.cat), (experts, torch.stack)):
        t = join([p for p, _ in parts])
        support = join([torch.full(p.shape, s, device=p.device) if isinstance(s, bool) else s for p, s in parts])
        sup.record(t, support)
        out.append(t)
    return tuple(out)


def _pair(t: torch.Tensor, sup) -> tuple[torch.Tensor, Any]:
    """A part and its support (True: fully supported)."""
    s = sup.of(t)
    return t, True if s is None else s


_register("transformers::grouped_mm_fallback_backward")(_grouped_mm_fallback_backward)


def _conv_support(func, args, slot, s):
    """convolution inside a double backward (a sensitivity convolved with a value): the shared fact
    (``_contractions.conv_output_support``)."""
    return conv_output_support(EagerMasks, args, slot, s)


_register(aten.convolution, aten._convolution)(_bilinear(_conv_support))


def _conv_skipped_inputs(func, args):
    """convolution_backward with a fully supported grad_output: a convolution that skips input positions (a
    stride wider than its reach, dilation gaps) gives them a structural zero in grad_input."""
    if _reads_every_position(args[4], args[6], args[7]):
        return (None, None, None)
    return _conv_backward_support(func, args, 0, torch.ones_like(args[0][:, :1], dtype=torch.bool))


_register(aten.convolution_backward)(_bilinear(_conv_backward_support, _conv_counted_outputs, meets=_conv_meets,
                                               own_zeros=_conv_skipped_inputs))


def _zero_alpha_mul(func, args, kwargs, sup):
    """mul's rule (its only registration): as _product, refined in exp's backward (``_rules_pointwise.
    _exp_result_mul``) and here by the alpha fact. In the backward of an op of ZERO_ALPHA_PRODUCTS
    (addmm, addmv, addbmm, baddbmm, addr) with alpha = 0 whose kernel never read the product, the formula's mul by
    that literal 0 is the deleted product term: its output is a structural zero, 0 even where the product of the
    sensitivity with the other operand is NaN/Inf, as in the program with that term deleted (the operands get no
    gradient there). beta's mul, with beta = 0 too, is one as well: the input is not read either (documented);
    so it is with alpha != 0 (``_zero_beta``).
    Inside an in-place op on a view (a CopySlices node) the op's node is hidden: a literal 0 meeting NaN/Inf
    there keeps PyTorch's NaN and is named if the gradients end up non-finite."""
    scale = args[1] if len(args) > 1 else None
    if scale.__class__ in (int, float) and scale == 0 and _STATE.formula_of in ZERO_ALPHA_PRODUCTS and _in_formula():
        if _STATE.outputs_finite and _graph_skips_product(_STATE.formula_of, _STATE.formula_saved, args[0]):
            out = func(*args, **kwargs)
            structural = torch.zeros((), dtype=torch.bool, device=out.device)
            _annihilate(out, structural)
            sup.record(out, structural)
            return out
        return _exp_result_mul(func, args, kwargs, sup)
    if scale.__class__ in (int, float) and scale == 0 and _in_formula() and _reads_nodes():
        node = torch._C._current_autograd_node()
        name = type(node).__name__
        if name in ZERO_ALPHA_PRODUCTS and (_zero_beta(node, args[0]) or (node._saved_alpha == 0 and (
                _kernel_skips_product(node, args[0]) or _zero_beta_of_a_read_product(node, args[0])))):
            out = func(*args, **kwargs)
            structural = torch.zeros((), dtype=torch.bool, device=out.device)
            _annihilate(out, structural)
            sup.record(out, structural)
            return out
        # the op is in place on a view: its node (and alpha, its operands) is hidden, but not its edges: an alpha
        # product has three (self, mat1, mat2; a scalar mul_(0) has one, whose 0 x Inf is the program's own)
        if name == "CopySlices" and len(node.next_functions) == 3:
            out = _exp_result_mul(func, args, kwargs, sup)
            if _is_float(out) and not bool(out.isfinite().all()):
                sup.unfollowed.append((
                    "a product or input scaled by a literal 0 inside an in-place op on a view (CopySlices hides "
                    "the op's node: addmm_, addmv_, baddbmm_, addbmm_, addr_ with alpha=0 or beta=0 through a "
                    "slice)",
                    "call the op out of place (y[:2] = torch.addmm(y[:2], a, b, alpha=0)), whose node strong "
                    "zeros can read, or leave the term out"))
            return out
    if func.overloadpacket is aten.mul and (found := _softmax_factor(args, sup)) is not None:
        return _softmax_weights_mul(func, args, kwargs, sup, *found)
    return _exp_result_mul(func, args, kwargs, sup)


def _softmax_weights_mul(func, args, kwargs, sup, slot: int, zero: torch.Tensor):
    """mul's rule in the backward of a product with a softmax's weights (``_softmax_factor``): a weight of exactly 0
    (a masked entry's exp(-inf)) is a structural zero of the other operand's gradient, as in ``_masked_weights_mm``:
    the masked entry's value gets the deleted entry's 0, also where its formula is singular (sqrt at a zero
    padding row: PyTorch's 0 x inf = NaN)."""
    out = _exp_result_mul(func, args, kwargs, sup)
    support = sup.of(out)
    kept = ~zero.expand(out.shape) if support is None else support & ~zero
    sup.record(_annihilate(out, kept), kept)
    return out


_register(aten.mul, aten.mul_)(_zero_alpha_mul)  # mul's one rule (_rules_pointwise registers none for it)
