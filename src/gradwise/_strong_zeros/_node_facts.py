"""What the check before backward knows of autograd nodes, keyed by node name: ``NODE_FACTS`` (singular
points), ``MAKES_NO_ZEROS``, ``COMPARES_SAVED_ONLY``, ``FUSED_BACKWARDS``, ``_MAKES_NO_ZEROS_IF``, ``_NOT_READ``,
``_OWN_ZEROS_INSIDE``, ``_ZERO_OUTPUT_TESTS``, and the per-node-type summary ``_node_type`` / ``_makes_zeros``;
``UNUSED_OUTPUTS`` and ``_SELECTED`` / ``covers``, which the plan resolves against the graph.

These are facts about backward formulas, keyed by autograd node type and read from saved tensors: whether the
formula can make a structural zero, or an Inf out of finite values (at a singular point, outside the domain, or by
overflow). They are not the forward-op facts of ``gradwise._ops`` (where an op kinks, read from the call's
arguments) nor the trace's ``_trace/_facts.py`` (which forward ops discard values, with fix texts): a singular
point of asin is |x| = 1 there, and |x| >= 1 here, where the formula gives NaN too.

May import: torch, gradwise._masks, _rules, _kernel_reads, _rules_bilinear, _triangles, _weights_layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from gradwise._masks import mask_all
from gradwise._strong_zeros._kernel_reads import ZERO_ALPHA_PRODUCTS
from gradwise._strong_zeros._rules import _hooked, lookup
from gradwise._strong_zeros._rules_bilinear import (
    _MASKED_WEIGHTS_NODES,
    WEIGHTS_ENDS,
    _reads_every_position,
    copies_only,
    weights_paths,
)
from gradwise._strong_zeros._triangles import TRIANGLE_READERS
from gradwise._strong_zeros._weights_layout import as_signed as _as_signed

aten = torch.ops.aten


def _raw_saved(node: Any) -> list[Any]:
    """The ``SavedTensor`` objects a node holds (its ``_raw_saved_*`` attributes), as a list. The watch's walk
    (``_autograd_graph._graph_parts``) reads them the same way inline: one Python call less per node, per step."""
    out: list[Any] = []
    for name in (_NODE_TYPES.get(type(node)) or _node_type(node))[0]:
        try:
            saved = getattr(node, name, None)
        except RuntimeError:  # freed by an earlier backward
            continue
        if saved.__class__ is tuple or saved.__class__ is list:
            out.extend(raw for raw in saved if raw is not None)
        elif saved is not None:
            out.append(saved)
    return out


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
    if isinstance(p, float) and not p.is_integer() and _any(x < 0):  # (int(p) raises for inf, NaN)
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
    "CloneBackward0 ToCopyBackward0 AliasBackward0 AddmmBackward0 MmBackward0 BmmBackward0 "
    "BaddbmmBackward0 AddmvBackward0 AddbmmBackward0 MvBackward0 DotBackward0 GeluBackward0 ReluBackward0 "
    "ThresholdBackward0 "
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
    "ScaledDotProductFlashAttentionBackward0 FusedRmsNormBackward0 "
    # unsafe_split (RNNs' gates) is split; the double-backward nodes of RNNs and attention under gradgradcheck
    # (sigmoid/tanh_backward, select_backward, _softmax_backward_data) are polynomials of their saved values
    "UnsafeSplitBackward0 UnsafeSplitWithSizesBackward0 SigmoidBackwardBackward0 TanhBackwardBackward0 "
    "SelectBackwardBackward0 SoftmaxBackwardDataBackward0 "
    # complex numbers: views between a complex tensor and its (real, imag) pairs, conj, complex(re, im), polar
    "ViewAsRealBackward0 ViewAsComplexBackward0 ConjBackward0 ComplexBackward0 PolarBackward0"
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
    "Log1PBackward0": lambda node: _any(_saved(node, "_saved_self") == -1),
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
    "ToCopyBackward0 AliasBackward0 MvBackward0 "
    "GeluBackward0 SigmoidBackward0 TanhBackward0 SiluBackward0 SoftplusBackward0 ExpBackward0 "
    "MseLossBackward0 SqrtBackward0 LogBackward0 NativeLayerNormBackward0 NativeGroupNormBackward0 "
    "NativeBatchNormBackward0 RsqrtBackward0 FusedRmsNormBackward0 "
    # rearrangements: each input's sensitivity is a piece, a sum or a permutation of the output's
    "CatBackward0 StackBackward0 RepeatBackward0 FlipBackward0 RollBackward0 "
    # complex numbers: a complex element is a structural zero where both its parts are one (no finer support)
    "ViewAsRealBackward0 ViewAsComplexBackward0 ConjBackward0 ComplexBackward0"
).split())
# Nodes whose backward only compares its saved tensor (relu: result <= 0 ? 0 : grad): a NaN/Inf there cannot
# turn into a NaN/Inf of the backward, so the check before backward need not read it.
COMPARES_SAVED_ONLY = frozenset(("ReluBackward0", "ThresholdBackward0", "HardtanhBackward0"))

# Nodes whose backward multiplies the incoming sensitivity by a 0/1 mask of their own (amax/amin's
# scale_grad_by_count, max()/min()'s evenly_distribute_backward: grad / count * (self == result)): an infinite
# sensitivity from above meets those structural zeros inside the node, inf x 0 = NaN where the strong-zero rule
# gives 0 at the unselected elements. The check before backward reads what makes the sensitivity that reaches them
# (``_planning._sensitivity_finite``).
# An op of ZERO_ALPHA_PRODUCTS with alpha = 0 (beta = 0) scales its operands' (input's) gradients by that 0 (its rule:
# _zero_alpha_mul).
SCALES_BY_ITS_ZEROS = frozenset(("AmaxBackward0", "AminBackward0", "MaxBackward1", "MinBackward1",
                                 *ZERO_ALPHA_PRODUCTS))
# What a backward nested in a 'check' pass hands down (_planning._results_reach): makers whose structural zeros lie
# where each element's value falls in a flat region or loses a comparison (relu's, clamp's, a max's or pool's other
# entries, sort/topk's unpicked ones, CUDA dropout's dropped ones). Where they reach its results, the backward runs
# plain (a checkpointed block that starts with a relu would otherwise run op by op on every step, and so would the
# blocks below it, seeded with its zeros). A select's, slice's, pad's, index's, where's or masked_fill's zeros (padding
# dropped or masked, whole rows as a rule: kept through a Linear) reach them as made.
FLAT_ZEROS = frozenset((
    "ReluBackward0 ThresholdBackward0 HardtanhBackward0 ClampBackward0 ClampBackward1 ClampMinBackward0 "
    "ClampMinBackward1 ClampMaxBackward0 ClampMaxBackward1 NativeDropoutBackward0 AbsBackward0 MaximumBackward0 "
    "MinimumBackward0 FmaxBackward0 FminBackward0 LeakyReluBackward0 EluBackward0 HardshrinkBackward0 "
    "SoftshrinkBackward0 HardsigmoidBackward0 HardswishBackward0 MaxPool2DWithIndicesBackward0 "
    "MaxPool3DWithIndicesBackward0 AmaxBackward0 AminBackward0 MaxBackward0 MaxBackward1 MinBackward0 MinBackward1 "
    "SortBackward0 TopkBackward0"
).split())
# Nodes that run another node's formula without showing its saved tensors: CopySlices (an in-place op on a view,
# y[:2].sqrt_()) wraps the op's own backward, whose saved values (sqrt's NaN result) and singular points the check
# cannot read. Where a structural zero reaches one, the backward runs under the mode (the wrapped formula's ops
# reach their rules there).
HIDES_ITS_FORMULA = frozenset(("CopySlices",))
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


def _hits_every_position(positions: object, size: object) -> bool:
    """Whether integer ``positions`` (negative ones count from the end) read every one of ``size`` positions.
    Values are read, so a tensor without them (fake, functional, meta: a traced backward) says no."""
    if type(positions) is not torch.Tensor or positions.is_meta or not isinstance(size, int) \
            or positions.numel() < size or size == 0:
        return False
    hit = torch.zeros(size, dtype=torch.bool, device=positions.device)
    hit[positions.reshape(-1) % size] = True
    return mask_all(hit)


def _index_reads_all(node: Any) -> bool:
    """x[idx] with one index (integer positions or a bool mask) that reads every element of x: its backward
    writes every position, so it makes no structural zero."""
    sizes = node._saved_self_sym_sizes
    present = [(d, i) for d, i in enumerate(node._saved_indices) if i is not None]
    if len(present) != 1:
        return False
    d, idx = present[0]
    if type(idx) is torch.Tensor and idx.dtype in (torch.bool, torch.uint8):
        return tuple(idx.shape) == tuple(sizes[d : d + idx.dim()]) and not idx.is_meta and mask_all(idx)
    return d < len(sizes) and _hits_every_position(idx, sizes[d])


def _size_along(node: Any) -> object:
    """The size of the input of an op with a saved ``dim`` along that dim."""
    sizes = node._saved_self_sym_sizes
    return sizes[_as_signed(node._saved_dim) % len(sizes)] if len(sizes) else 1  # a 0-dim input: one position


def _alpha_nonzero(node: Any) -> bool:
    """beta * input + alpha * (a @ b) with alpha != 0 and beta != 0: its backward makes no structural zero (with
    beta = 0 the input's gradient is the deleted input term's: ``_kernel_reads._zero_beta``)."""
    return node._saved_alpha != 0 and node._saved_beta != 0


def _selects_all(selected: Callable[[Any], tuple[int, int, range]]) -> Callable[[Any], bool]:
    """A select/slice that reads every position along its dim (x[0:n], x.select(d, 0) of a size-1 dim)."""
    return lambda node: covers([selected(node)])


def _no_masked_weights(node: Any) -> bool:
    """mm/bmm (addmm, baddbmm) make no structural zero unless an operand is a softmax's output holding an exact 0
    (masked attention weights: v's gradient at a masked key is the deleted key's 0,
    ``_rules_bilinear._masked_weights_mm``); one a hook packed (a checkpoint's) is not read: it makes zeros, as far as
    the plan knows (weights that are copies of its elements alone are read instead: ``masked_weights`` reads them)."""
    for path, saved in weights_paths(node):  # (through dropout and views: a[None], reshape)
        softmax = path[-1]
        if len(path) > 1 and not _hooked(softmax, "_raw_saved_result"):
            weights = softmax._saved_result  # (the softmax's own result: a dropout's zeros are values)
        elif len(path) > 1 and not copies_only(path):
            return False
        elif _hooked(node, "_raw" + saved):
            return False
        else:
            weights = getattr(node, saved)
        # (one vectorised min, not a comparison's bool tensor: ~60x cheaper on MHA's weights, read on every backward
        # of need_weights=True; a NaN min (a fully masked query's row) compares False: counted as making zeros)
        if weights is not None and weights.numel() and not bool(weights.amin() > 0):
            return False
    return True


def _own_and_weights(own: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """The makes-no-zeros test of a node whose own test is ``own``, that may also multiply masked weights."""
    return lambda node: own(node) and _no_masked_weights(node)


# the nodes whose makes-no-zeros test reads _no_masked_weights, each with the rest of its test (None: nothing else):
# in a graph with no node that may end a weights path the plan's walk reads that rest alone (WEIGHTS_READER). Until
# the review of perf_sz35 only mm/bmm's were skipped: every Linear's addmm walked its operands' producers on every
# backward (~3 us each, 17 us of a 2-layer Transformer encoder's 60 us walk)
# (the nodes are the rules' own table, _rules_bilinear._MASKED_WEIGHTS_NODES: addmm/baddbmm of a softmax's weights
# make the values' gradient's structural zeros as mm/bmm's, besides their alpha = 0 test)
_WEIGHTS_READERS: dict[str, Callable[[Any], bool] | None] = {
    name: {"AddmmBackward0": _alpha_nonzero, "BaddbmmBackward0": _alpha_nonzero}.get(name)
    for name in _MASKED_WEIGHTS_NODES}

_MAKES_NO_ZEROS_IF: dict[str, Callable[[Any], bool]] = {
    **{name: _no_masked_weights if own is None else _own_and_weights(own) for name, own in _WEIGHTS_READERS.items()},
    "PowBackward0": lambda node: _saved(node, "_saved_exponent") != 0,  # x ** 0 backward is zeros_like(x)
    # addmm & co. with alpha = 0 (beta = 0): the operands' (input's) gradients are the deleted term's (_zero_alpha_mul)
    **dict.fromkeys(("AddmvBackward0", "AddbmmBackward0"), _alpha_nonzero),
    # a selection that reads every position (an index holding each row, a full slice) drops nothing: its
    # backward writes every position of its input, as strong zeros' own rules find (the support is all True)
    # (indices a checkpoint recomputes are not read: it makes zeros, as far as the plan knows)
    "IndexBackward0": lambda node: not _hooked(node, "_raw_saved_indices") and _index_reads_all(node),
    "IndexSelectBackward0": lambda node: not _hooked(node, "_raw_saved_index") and
    _hits_every_position(node._saved_index, _size_along(node)),
    "SliceBackward0": _selects_all(lambda node: _selected_by_slice(node)),
    "SelectBackward0": _selects_all(lambda node: _selected_by_select(node)),
    # padding's backward slices the padding off; a negative pad crops, and its backward pads with zeros
    "ConstantPadNdBackward0": lambda node: all(p < 1 << 63 for p in node._saved_pad),
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
# its outputs get no structural zero of its own. The nodes below are not reached through it, and unless a zero
# arrives from above its saved tensors are not read either: its rule then runs the op as PyTorch does (the
# attention rule with every query row kept and every key used), so strong zeros would change nothing there.
_OWN_ZEROS_INSIDE: dict[str, Callable[[Any], bool]] = {}

# Nodes whose only structural zeros fill the sensitivities of forward outputs nothing used (split, unbind: cat or
# stack of the output grads, an undefined one as zeros). When every output has a consumer in the graph, each
# arrives defined (an undefined one comes from a zero-making node above, which reaches this node anyway), so the
# node makes none. _planning._graph decides it per node, from the edges it walked.
UNUSED_OUTPUTS = "unused outputs"
_ZEROS_FOR_UNUSED_OUTPUTS = frozenset((
    "SplitBackward0 SplitWithSizesBackward0 UnbindBackward0 UnsafeSplitBackward0 UnsafeSplitWithSizesBackward0"
).split())


def _outputs_by_metadata(node: Any) -> int:
    """The number of outputs of the node's forward op (one InputMetadata object made per output: ~2 us)."""
    return len(node._input_metadata)


def _outputs_by_split_sizes(node: Any) -> int:
    """split_with_sizes makes one output per size (a tuple of ints: ~0.1 us)."""
    return len(node._saved_split_sizes)


# How the plan counts a split's outputs, per node type (the walk reads it per backward): the cheapest exact read
_OUTPUT_COUNTS: dict[str, Callable[[Any], int]] = {
    "SplitWithSizesBackward0": _outputs_by_split_sizes,
    "UnsafeSplitWithSizesBackward0": _outputs_by_split_sizes,
}


_HALF, _WRAP = 1 << 63, 1 << 64  # (the two below read one node each per select/slice per backward: no calls)


def _selected_by_select(node: Any) -> tuple[int, int, range]:
    """select(dim, index): the one position it reads along ``dim`` (its backward is zero elsewhere)."""
    sizes = node._saved_self_sym_sizes
    dim = node._saved_dim
    dim = (dim - _WRAP if dim >= _HALF else dim) % len(sizes)
    index = node._saved_index
    size = sizes[dim]
    index = (index - _WRAP if index >= _HALF else index) % size
    return dim, size, range(index, index + 1)


def _selected_by_slice(node: Any) -> tuple[int, int, range]:
    """slice(dim, start, end, step): the positions it reads along ``dim`` (its backward is zero elsewhere)."""
    sizes = node._saved_self_sym_sizes
    dim = node._saved_dim
    dim = (dim - _WRAP if dim >= _HALF else dim) % len(sizes)
    start, end = node._saved_start, node._saved_end
    if start is not None and start >= _HALF:
        start -= _WRAP
    if end is not None and end >= _HALF:
        end -= _WRAP
    size = sizes[dim]
    return dim, size, range(*slice(start, end, node._saved_step).indices(size))


# Nodes whose structural zeros are every position of their input they did not select: (dim, size, positions
# read). Sibling selects of one tensor that between them read every position (q, k, v = proj[0], proj[1],
# proj[2] in nn.MultiheadAttention) send it no structural zero, as long as none receives one from above.
_SELECTED: dict[str, Callable[[Any], tuple[int, int, range]]] = {
    "SelectBackward0": _selected_by_select,
    "SliceBackward0": _selected_by_slice,
}


def covers(selected: list[tuple[int, int, range]]) -> bool:
    """Whether selections along one dim read every position of it (their backwards sum to a full support)."""
    dim, size, first = selected[0]
    if len(selected) == 1:  # (the plan asks this of every select/slice) distinct positions below size: all of them?
        return len(first) == size
    if any(d != dim or n != size for d, n, _ in selected):
        return False
    if all(r.step == 1 for _, _, r in selected):
        reach = 0
        for r in sorted((r for _, _, r in selected), key=lambda r: r.start):
            if r.start > reach:
                return False
            reach = max(reach, r.stop)
        return reach >= size
    if size > 1 << 16:  # strided slices of a long dim: not worth the bytes, assume zeros arrive
        return False
    seen = bytearray(size)
    for _, _, r in selected:
        seen[r.start:r.stop:r.step] = b"\x01" * len(r)
    return all(seen)


def _holds(test: Any, node: Any, freed: bool) -> bool:
    """``test(node)``; ``freed`` (the answer that assumes the worst: it makes structural zeros, which leave it) where
    the test reads a saved tensor an earlier backward freed (a shared trunk under ``backward(inputs=)`` or
    ``autograd.grad``: the engine runs no such node, and raises itself where it would need one)."""
    try:
        return bool(test(node))
    except RuntimeError:
        return freed


def _fact_reader(name: str, makes: Any, inside: Any, select: Any) -> Callable[[Any], Any] | None:
    """What the plan's walk reads from a node of a type whose structural zeros depend on its saved values, which
    the graph's shape holds (``_planning._walked``; ``_planning._derived`` reads it back): a select's or slice's pick
    (it makes zeros unless that reads every position), a split's number of outputs (UNUSED_OUTPUTS), the answer of
    its makes-zeros test, and whether the zeros it makes stay inside it (_OWN_ZEROS_INSIDE). None where the type
    alone decides. The walk makes one call per such node, per backward: each reader is one function (a test is
    called directly, ``_holds`` written out), and a pick is read as it is (a tuple, as every fact)."""
    if select is not None:
        return select if inside is None else lambda node: (select(node), _holds(inside, node, False))
    if makes is UNUSED_OUTPUTS:
        outputs = _OUTPUT_COUNTS.get(name, _outputs_by_metadata)
        if inside is None:
            return lambda node: (outputs(node), False)
        return lambda node: (outputs(node), _holds(inside, node, False))
    if makes.__class__ is not bool:
        return _test_reader(_MAKES_NO_ZEROS_IF[name], inside)
    if makes and inside is not None:
        return lambda node: (True, _holds(inside, node, False))
    return None


def _test_reader(test: Callable[[Any], bool], inside: Any) -> Callable[[Any], tuple[bool, bool]]:
    """``_fact_reader`` of a node whose makes-no-zeros test is ``test``: whether it makes zeros, and whether they
    stay inside it."""

    def read(node: Any) -> tuple[bool, bool]:
        try:
            made = not test(node)
        except RuntimeError:  # a saved tensor an earlier backward freed: the worst (as _holds)
            made = True
        return (made, made and inside is not None and _holds(inside, node, False))

    return read


def _unweighted_reader(name: str, inside: Any) -> Callable[[Any], tuple[bool, bool]] | None:
    """A WEIGHTS_READER's fact where no softmax's weights can feed it: its test without _no_masked_weights (which
    holds there without a read); None for other types."""
    if name not in _WEIGHTS_READERS:
        return None
    own = _WEIGHTS_READERS[name]
    return _test_reader(own, inside) if own is not None else lambda node: _NO_WEIGHTS_FACT


_NO_WEIGHTS_FACT = (False, False)  # an mm/bmm's fact where no softmax's weights feed it: it makes no zeros
_NODE_TYPES: dict[type, tuple] = {}
_PYTHON_NODE = torch.autograd.function.BackwardCFunction

# A node type's part in the weights facts of mm/bmm (``_node_type``'s entry 11, else None): its makes-zeros test
# reads _no_masked_weights (_WEIGHTS_READERS; entry 12 reads the rest of it), which finds no softmax's weights (True,
# no saved tensor read) unless a node of WEIGHTS_ENDS is among its producers; or its nodes may be such an end (their
# ``name()`` is in WEIGHTS_ENDS, or is not their class's name, qualified or not: a C++ node shown through a Python
# type it shares, whose name the type does not tell). The plan's walk reads the first kind's weights only in a graph
# that holds the second (``_planning._walked``).
WEIGHTS_READER, WEIGHTS_END = "weights reader", "weights end"


def per_type(table: dict, cls: type, attr: str) -> Any:
    """What ``keep_per_type`` kept for node type ``cls`` (None where nothing was)."""
    got = table.get(cls)
    return cls.__dict__.get(attr) if got is None and issubclass(cls, _PYTHON_NODE) else got


def keep_per_type(table: dict, cls: type, attr: str, value: Any) -> Any:
    """Keep ``value`` for node type ``cls``: in ``table`` for PyTorch's node types, which live as long as the
    process, and on the class itself (attribute ``attr``) for a custom autograd.Function's, which dies with its
    Function: a Function class defined per call (in a forward) was kept alive by the table, one a step, with what
    its methods closed over."""
    if issubclass(cls, _PYTHON_NODE):
        setattr(cls, attr, value)
    else:
        table[cls] = value
    return value


def node_info(node: Any) -> tuple:
    """``_node_type(node)``, looked up in the table first (the walks inline this)."""
    return _NODE_TYPES.get(type(node)) or _node_type(node)


def _node_type(node: Any) -> tuple:
    """Per autograd node type, looked up once: its ``_raw_saved_*`` attributes, those the check before backward
    reads, whether NODE_FACTS knows it, its singular-point test, whether it makes structural zeros (a bool, or a
    test of the node where that depends on what it saved), its zero-output test (_ZERO_OUTPUT_TESTS), its
    selection (_SELECTED), whether the plan has nothing to do there, whether the strong pass watches it (a custom
    Function's, a compiled backward, a TRIANGLE_READERS node: ``_planning._walked`` lists them for it), what
    the plan's walk reads from it (``_fact_reader``), its part in mm/bmm's weights facts (WEIGHTS_READER,
    WEIGHTS_END or None), and a WEIGHTS_READER's fact reader where no weights can feed it (``_unweighted_reader``)."""
    info = per_type(_NODE_TYPES, type(node), "_gradwise_node_type")
    if info is None:
        name = type(node).__name__
        names = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
        # a compiled backward's own NaN/Inf meets its zeros inside it, under the pass (gradwise._strong_zeros._compile)
        read = () if name in COMPARES_SAVED_ONLY or _opaque(name) or name == "CompiledFunctionBackward" else \
            tuple(a for a in names if a not in _NOT_READ.get(name, ()))
        test = _MAKES_NO_ZEROS_IF.get(name)
        makes = False if name in MAKES_NO_ZEROS or _opaque(name) else (lambda n: not test(n)) if test else \
            UNUSED_OUTPUTS if name in _ZEROS_FOR_UNUSED_OUTPUTS else True
        known, singular, zero_output = name in NODE_FACTS, NODE_FACTS.get(name), _ZERO_OUTPUT_TESTS.get(name)
        nothing = known and makes is False and singular is None and zero_output is None
        # a custom autograd.Function's node or a compiled backward: what the strong pass watches or swaps
        watched = name == "CompiledFunctionBackward" or getattr(type(node), "_forward_cls", None) is not None or \
            name in TRIANGLE_READERS
        inside, select = _OWN_ZEROS_INSIDE.get(name), _SELECTED.get(name)
        called = node.name()
        weights = WEIGHTS_READER if name in _WEIGHTS_READERS else \
            WEIGHTS_END if called in WEIGHTS_ENDS or not (called == name or called.endswith("::" + name)) else None
        info = keep_per_type(_NODE_TYPES, type(node), "_gradwise_node_type", (
            names, read, known, singular, makes, zero_output, inside, select,
            nothing and not watched and weights is None, watched, _fact_reader(name, makes, inside, select), weights,
            _unweighted_reader(name, inside)))
    return info


def _makes_zeros(node: Any) -> bool:
    """Whether the node's backward can make a structural zero (a split, unbind: if some output goes unused)."""
    makes = _node_type(node)[4]
    return makes if makes.__class__ is bool else makes is UNUSED_OUTPUTS or makes(node)


def may_make_structural_zeros(node: Any) -> bool:
    """Whether a structural zero can start at this node: its backward makes one, or multiplies by its own
    output, whose exact zeros are structural (softmax, exp). The trace reads it: a zero sensitivity below no
    such node is one the program computed."""
    return _makes_zeros(node) or _node_type(node)[5] is not None


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
