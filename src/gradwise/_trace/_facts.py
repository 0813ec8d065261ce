"""What the trace knows about aten ops, as tables apart from the engine: which ops discard or select, with the
local rewrite that fixes each (``_DISCARDS``, ``_SELECT_FIX``, ``_ELEMENTWISE_SELECTS``, ``_STEPS``,
``_ELEMENTWISE_DISCARDS``, ``_SELECTING_DISCARDS``), comparisons (``_COMPARISONS``), literals (``_LITERALS``), births
that are no data (``_NOT_DATA``), finite-preserving ops (``_FINITE_PRESERVING``), zero outputs (``_ZERO_OUTPUTS``),
products and bilinear ops (``_PRODUCTS``, ``_BILINEAR``) and the collective namespaces (``_COLLECTIVE_NAMESPACES``).
Where ops kink is in the shared layer (``gradwise._ops``).

These stay here, not in ``gradwise._ops``: only the trace reads them, they are keyed by forward aten op and
carry the trace's fix texts. Strong zeros state a different fact in ``_strong_zeros/_node_facts.py``, keyed by
autograd node type and read from its saved tensors before backward (which nodes can make a structural zero, whose
formula makes an Inf out of finite values, overflow included); one node type covers several forward ops and a
forward op can make a view or CopySlices node, so neither table can be derived from the other.

``_SELECT_FIX`` lives here, not in ``_advice``, because ``_DISCARDS`` holds it and ``_advice`` imports this module.

May import: torch, gradwise._ops.
"""

from __future__ import annotations

import torch

from gradwise._ops._zeros import LOG_SPACE_SUMS, ZERO_FACTS, multiplying_args, ops_of_kind, zero_fact

aten = torch.ops.aten

_LITERALS = {aten.lift_fresh, aten.lift}

# -- ops whose backward sends zero sensitivity to values the output does not use, and the local rewrite ------

_SELECT_FIX = "select first, then compute: apply the op to the kept elements only (e.g. lin(x[:4]), not lin(x)[:4])"
# Discarding ops whose zeros are spread elementwise through the tensor (see _discarded_by)
_ELEMENTWISE_SELECTS = [aten.minimum, aten.maximum, aten.fmin, aten.fmax, aten.clamp, aten.clamp_min, aten.clamp_max,
                        aten.relu, aten.threshold, aten.hardtanh]
_STEPS = [aten.floor, aten.round, aten.sign]
DECLARED = "gw.mark_unused"  # the op a report names for elements declared unused


def aten_packet(op: str):
    """The aten op packet a recorded op name names ("aten.exp" -> aten.exp), or None (a library's op:
    "mylib.fused", or no such aten op)."""
    return getattr(aten, op[5:], None) if op.startswith("aten.") else None


def _discard_key(op: str):
    """The ``_DISCARDS`` key of a recorded op name ("aten.slice", or ``DECLARED``), or None."""
    return op if op in _DISCARDS else aten_packet(op)


_DISCARDS: dict = {
    **dict.fromkeys([aten.slice, aten.select, aten.index, aten.index_select, aten.gather, aten.narrow,
                     aten.split, aten.split_with_sizes, aten.unbind, aten.masked_select, aten.take,
                     aten.as_strided, aten.diagonal], _SELECT_FIX),
    **dict.fromkeys([aten.where], "double where: make the unused branch's input safe too, e.g. "
                    "torch.where(c, f(torch.where(c, x, safe)), other) so f never sees the bad values"),
    **dict.fromkeys([aten.masked_fill, aten.masked_fill_, aten.masked_scatter],
                    "mask before the op that makes NaN/Inf (e.g. before the division or the matmul), not after"),
    **dict.fromkeys([aten.nll_loss_forward, aten.nll_loss2d_forward],
                    "drop the ignored targets' rows before the layers that read NaN/Inf (h[keep])"),
    **dict.fromkeys([aten.copy_, aten.fill_, aten.index_put_, aten.zero_, aten.index_copy, aten.index_copy_,
                     aten.index_fill, aten.index_fill_, aten.scatter, aten.scatter_, aten.put, aten.put_],
                    "build the tensor with torch.where instead of overwriting elements computed from bad values"),
    **dict.fromkeys([aten._softmax, aten._log_softmax],
                    "mask fully masked rows before the softmax (or drop them)"),
    **dict.fromkeys([*_ELEMENTWISE_SELECTS, aten.max, aten.min, aten.amax, aten.amin, aten.sort, aten.topk,
                     aten.median, aten.nanmedian, aten.kthvalue, aten.mode,
                     aten.max_pool2d_with_indices, aten.max_pool3d_with_indices],
                    "make the unselected argument finite (e.g. torch.minimum(one, 1 / x.clamp_min(eps)))"),
    **dict.fromkeys([*_STEPS, aten.nansum], "make the value finite before the op that zeroes its sensitivity"),
    # nan_to_num's backward zeroes the sensitivity exactly where its input is NaN/Inf (grad * isfinite(x)): the
    # value is replaced, so unused; the backward of the op that made it still computes 0 x NaN
    **dict.fromkeys([aten.nan_to_num, aten.nan_to_num_],
                    "keep the input of the op that makes NaN/Inf inside its domain (e.g. w.clamp_min(0).sqrt()); "
                    "nan_to_num after it cleans the value, not its backward"),
    # the formulas of _strong_zeros._triangles.TRIANGLE_READERS read a triangle of the matrix the forward does not
    **dict.fromkeys([aten.cholesky_solve, aten.cholesky_inverse, aten.linalg_pinv],
                    "make the triangle the op does not read finite before it (L.tril() for a lower factor, "
                    "L.triu() for an upper one; for pinv(hermitian=True), A.tril() + A.tril(-1).mH)"),
    # a -inf argument's weight in a log-space sum is a structural zero (the shared fact, as strong zeros read it)
    **dict.fromkeys(LOG_SPACE_SUMS, "make the -inf argument a constant, not a value whose backward makes NaN/Inf "
                    "there: torch.where(p > 0, torch.where(p > 0, p, 1).log(), -inf) for log(p) at p = 0, or drop "
                    "those entries before the log-space sum"),
    # gw.mark_unused's backward node (no aten op: keyed by the name a report gives it)
    DECLARED: "none needed, the elements are declared unused (gw.mark_unused)",
}

_ELEMENTWISE_DISCARDS = {*_ELEMENTWISE_SELECTS, *_STEPS, *LOG_SPACE_SUMS}  # (zeros at -inf arguments)
# the discards that select (slice, index, where, masks, ignored targets, overwrites): their zeros line up with rows
_SELECTING_DISCARDS = frozenset(_DISCARDS) - _ELEMENTWISE_DISCARDS

# Ops whose saved output, where exactly 0 (exp of a -inf logit), is a structural zero of their backward: a NaN/Inf
# sensitivity from upstream meets it there (entr's infinite derivative at p = exp(-inf) = 0), with the local
# rewrite (softmax, also such an op, is in _DISCARDS). Not discards of a sensitivity: _discarded_by does not stop
# at them.
_ZERO_OUTPUTS: dict = {
    **dict.fromkeys([aten.exp], "keep the masked entries out of the function whose derivative is "
                    "infinite at 0 (e.g. entr/log of p only where p > 0: torch.where(p > 0, f(p), 0) with a safe "
                    "input, or torch.special.xlogy(p, p))"),
}

_COMPARISONS = {aten.gt: "second", aten.lt: "second", aten.ge: "first", aten.le: "first"}


# Ops whose output is finite whenever their inputs are: their check is skipped unless an input is already
# known to be non-finite (a NaN/Inf in data they are the first to touch is then found by the next op).
_FINITE_PRESERVING = {
    aten.relu, aten.relu_, aten.threshold, aten.threshold_backward, aten.hardtanh, aten.clamp, aten.clamp_min,
    aten.clamp_max, aten.abs, aten.neg, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
    aten.max_pool2d_with_indices_backward, aten.max_pool3d_with_indices_backward, aten.max, aten.min, aten.amax,
    aten.amin, aten.cat, aten.stack, aten.clone, aten._to_copy, aten.contiguous, aten.index, aten.gather,
    aten.index_select, aten.select_backward, aten.slice_backward, aten.sort, aten.topk, aten.gelu, aten.tanh,
    aten.sigmoid, aten.silu, aten.hardsigmoid, aten.hardswish, aten.leaky_relu, aten.maximum, aten.minimum,
    aten.zeros_like, aten.ones_like, aten.zeros, aten.ones, aten.empty_like, aten.native_dropout, aten.sign,
    aten.floor, aten.round, aten.ceil, aten.trunc, aten.where, aten.sin, aten.cos, aten.erf,
}
_COLLECTIVE_NAMESPACES = {"c10d", "_c10d_functional"}
# uninitialised memory: never checked (whatever the memory held is no value of the program; DDP's buckets, a
# backward's new_empty_strided, are written before they are read)
_UNINITIALISED = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided"}
_NOT_DATA = {*_UNINITIALISED, "gradient"}
WRITTEN = "a NaN/Inf constant written into the tensor"  # a birth's description: data, padding, a mask value
# ... all -inf: a mask value (an attention mask's), which explains no NaN another birth's infinity makes of it
WRITTEN_MASK = f"{WRITTEN} (-inf: a mask value)"
# ops whose Inf from finite inputs is an overflow (not a constant written on purpose, as a -inf mask is)
# (pow too: a large power overflows; its own explainer, in _advice, also names its domain)
_OVERFLOWS = {aten.exp, aten.exp2, aten.expm1, aten.sinh, aten.cosh, aten.mul, aten.mm, aten.addmm, aten.bmm, aten.sum,
              aten.add, aten.sub, aten.matmul, aten.square, aten.pow, aten._to_copy}  # (a cast to a narrower dtype)
_OVERFLOW_NAMES = {f"aten.{op.__name__}" for op in _OVERFLOWS}  # as births name their op
# storage rebinding: the tensor now shows memory filled elsewhere (a DataLoader worker's batch arriving through
# shared memory, a loaded checkpoint): a NaN there arrived with the data, as an input's does, and is not born here
_ARRIVALS = {aten.set_.source_Storage, aten.set_.source_Storage_storage_offset}
# products and contractions: the shared facts' (gradwise._ops._zeros), by the names the trace records
_PRODUCTS = {f"aten.{op.__name__}" for op in ZERO_FACTS if multiplying_args(op) and zero_fact(op).kind in
             ("product", "bilinear")}
_BILINEAR = set(ops_of_kind("bilinear"))
# what an "input" birth says of a .grad that held NaN/Inf before a backward accumulated into it (_Roots.stale_gradient)
STALE = "a gradient not zeroed since an earlier backward"
# how AccumulateGrad adds a new gradient to a leaf's .grad (add_; add under create_graph): args[0] is the .grad
_ACCUMULATES = {aten.add_.Tensor, aten.add.Tensor}
# how an incident says that an arithmetic op or a narrowing cast in a backward overflowed (its fix: the overflow's,
# with GradScaler's too large loss scale first: _advice._BACKWARD_OVERFLOW_FIX)
BACKWARD_OVERFLOW = "overflowed in"

# forward ops (as a node's record names them) whose backward divides by the count of input elements equal to the
# result: 0 where the result is NaN (NaN equals nothing), so g / 0 is NaN/Inf made of finite values, the NaN its
# formula read (``_Node.read``) the cause. (max(), max(dim) and vector_norm(inf) count NaN as equal: not these.)
_TIES_COUNTED = {"aten.amax", "aten.amin"}

# in-place ops that write a value into the elements a mask or an index selects (``s.masked_fill_(m, -inf)``,
# ``s[m] = -inf``): a NaN/Inf constant written there is born there, the other elements keep what they held
_SELECTED_WRITES = {aten.masked_fill_, aten.index_put_, aten._index_put_impl_, aten.index_fill_}
# their out-of-place forms: the output holds the constant at the selected elements, whatever the input held there
_SELECTED_COPIES = {aten.masked_fill, aten.index_put, aten.index_fill}

# softmaxes that make NaN of a slice all -inf (a fully masked row: 0/0)
_NAN_OF_FULL_ROWS = {aten._softmax, aten._log_softmax}

# ops whose output element reads the input's elements along some dims at its other indices (a row): the named
# argument ("dim", or layer norm's "normalized_shape": the last dims) or the last n dims (pooling windows)
_ROWWISE: dict = {aten.sort: "dim", aten.topk: "dim", aten.kthvalue: "dim", aten.median: "dim",
                  aten.nanmedian: "dim", aten.mode: "dim", aten._softmax: "dim", aten._log_softmax: "dim",
                  aten._safe_softmax: "dim", aten.native_layer_norm: "normalized_shape",
                  aten.max_pool2d_with_indices: 2, aten.max_pool3d_with_indices: 3, aten.avg_pool2d: 2,
                  aten.avg_pool3d: 3, aten.nll_loss_forward: 1}

# backward ops that read a workspace their forward filled with its intermediate values (oneDNN's LSTM layer: the
# gates), where a padding row's NaN stays though a rerun makes the saved input's NaN 0: where a sensitivity's NaN/Inf
# reaches is read under the strong-zero rule, which recomputes the layer from its inputs
# (``_shadow_reads.carried``). Read plainly, a used row's NaN reached the padding rows too, and their NaN, met by
# zero sensitivities, was carried as the used one's: the padding a genuine finding further on
WORKSPACE_READERS = {aten.mkldnn_rnn_layer_backward}

# ops the trace never runs again per part (``_probes``): oneDNN's LSTM layer, whose forward fills a workspace its
# backward reads with every part's NaN/Inf. Probed, the layer named the birth the workspace kept and dropped the
# others: a used NaN beside padding was in no finding (review_tr33, SILENT); unprobed, every birth is named
UNPROBED = {aten.mkldnn_rnn_layer, aten.mkldnn_rnn_layer_backward}

# ops that write arguments their schema does not declare written, by argument names, where their ``training``
# argument is true: a batch norm's running statistics (updated in place, momentum-weighted). An op rerun for an
# explanation (``_probes``) gets fresh tensors there, or it moves the program's statistics once more each run
UNDECLARED_WRITES = {op: ("running_mean", "running_var") for op in (
    aten.native_batch_norm, aten._batch_norm_impl_index, aten.batch_norm, aten.cudnn_batch_norm,
    aten.miopen_batch_norm)}
