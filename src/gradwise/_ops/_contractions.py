"""Where structural zeros go through a contraction: the per-op support formulas of the ``bilinear`` ops and the
fused attention backwards, written once for both strong-zero engines.

A contraction sums products of two operands over shared indices (``mm``: ``out[i, j] = sum_k a[i, k] b[k, j]``;
a convolution: over a window; attention: over keys, then queries). Where one operand is a sensitivity with
structural zeros, two facts follow, and each is a formula here:

- the output's *support*: an output element is a structural zero where every term that makes it has a
  structural zero factor (``mm``: row ``i`` of ``a`` all structural);
- the *reads*: the positions of the other operand (a value) that some supported element meets. A NaN/Inf
  anywhere else meets only structural zeros, so it is annihilated (the eager engine counts what is read, the
  compiled pass zeroes what is not read).

The formulas are data-independent (no ``.item()``, no branch on values) and written over a mask algebra ``o``,
like the ``passes`` predicates of ``_zeros.py``. Besides ``o.gt`` they use:

==================================  ===================================================================
``o.any(m, dims, keepdim)``         any over dims (negative dims count from the end)
``o.both(a, b)``                    a and b, broadcast (a new mask: neither operand is written)
``o.swap_last(m)``                  the last two dims swapped
``o.unsqueeze(m, dim)``             a dim of size 1 inserted
``o.shape(t)``                      the sizes of ``t``
``o.ones(like, shape)``             ones of ``like``'s dtype and device
``o.cast(m, like)``                 a mask as 0/1 numbers of ``like``'s dtype
``o.narrow(t, dim, start, length)`` a slice of ``t``
``o.call(op, *args)``               ``op`` applied (a tuple result is read with ``o.pick(r, i)``)
==================================  ===================================================================

The eager algebra is ``_strong_zeros._rules_pointwise._EagerMasks`` (tensors), the graph one
``_strong_zeros._compile_rules._GraphMasks`` (nodes of the backward graph). Supports are supersets where a formula
says so: sound (a NaN the superset keeps stays, and the runtime checks re-run that op under the eager rules).

May import: torch only.
"""

from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten

__all__ = ["attention_keys", "attention_rows", "conv_input_reads", "conv_output_support", "mm_reads",
           "mm_support", "mv_support", "value_columns"]


# -- matrix products ---------------------------------------------------------------------------------------------

def mm_support(o: Any, slot: int, s: Any) -> Any:
    """mm/bmm (``[.., n, k] @ [.., k, m]``) with the sensitivity at ``slot``: output row ``i`` (column ``j``) is a
    structural zero where row ``i`` of ``a`` (column ``j`` of ``b``) is all structural, whatever the other
    operand holds there. Shape ``[.., n, 1]`` or ``[.., 1, m]``."""
    return o.any(s, [-1], True) if slot == 0 else o.any(s, [-2], True)


def mm_reads(o: Any, slot: int, s: Any) -> Any:
    """mm/bmm: where the value operand is read by a supported element of the sensitivity at ``slot``. The value
    is ``b`` (``[.., k, m]``) for ``slot`` 0: its row ``k`` is read where column ``k`` of ``a`` has a supported
    element (``[.., k, 1]``); symmetrically ``[.., 1, k]`` for the value ``a``. Exact per contraction index."""
    return o.swap_last(o.any(s, [-2], True)) if slot == 0 else o.swap_last(o.any(s, [-1], True))


def mv_support(o: Any, slot: int, s: Any) -> Any:
    """mv (``[n, k] @ [k]``): out[i] is a structural zero where row ``i`` of the matrix is all structural; a
    structural vector makes every output one (a 0-dim support)."""
    return o.any(s, [-1], False) if slot == 0 else o.any(s, [0], False)


# -- convolutions ------------------------------------------------------------------------------------------------

def conv_input_reads(o: Any, args: tuple, s: Any) -> Any:
    """convolution_backward(g, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
    mask) with the sensitivity ``g`` (support ``s``): the input positions (``[N, 1, *in]``) that a supported
    element of ``g``, in any output channel, reaches through the kernel. From one single-channel
    convolution_backward of where ``g`` is supported with a kernel of ones (``> 0``: it adds 0/1 numbers). Over
    every input channel: a superset of the exact reads (sound). grad_input's support is the same mask: an input
    position no supported output reads gets only structural zeros."""
    g, x, w = args[:3]
    stride, padding, dilation, transposed, output_padding = args[4:9]
    positions = o.cast(o.any(s, [1], True), g)
    ones = o.ones(g, [1, 1, *o.shape(w)[2:]])
    reads = o.call(aten.convolution_backward.default, positions, o.narrow(x, 1, 0, 1), ones, None, stride,
                   padding, dilation, transposed, output_padding, 1, [True, False, False])
    return o.gt(o.pick(reads, 0), 0)


def conv_output_support(o: Any, args: tuple, slot: int, s: Any) -> Any:
    """convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups) with a
    sensitivity at ``slot`` (inside a double backward): with the input, an output position is a structural zero
    where no supported input reaches it (a single-channel convolution of the support with ones, ``> 0``: a
    superset); with the weight (not transposed), an output channel whose whole filter is structural. None (fully
    supported) with a bias, which reaches every output, or a transposed weight."""
    stride, padding, dilation, transposed, output_padding = args[3:8]
    if args[2] is not None:
        return None
    if slot == 0:
        ones = o.ones(args[0], [1, 1, *o.shape(args[1])[2:]])
        out = o.call(aten.convolution.default, o.cast(o.any(s, [1], True), args[0]), ones, None, stride, padding,
                     dilation, transposed, output_padding, 1)
        return o.gt(out, 0)
    if slot == 1 and not transposed:
        channels = o.unsqueeze(o.any(s, list(range(1, len(o.shape(s)))), False), 0)  # [1, C_out]
        for _ in range(len(o.shape(args[0])) - 2):  # [1, C_out, 1, ...]: broadcast over the output's space
            channels = o.unsqueeze(channels, -1)
        return channels
    return None


# -- attention ---------------------------------------------------------------------------------------------------

def attention_rows(o: Any, s: Any) -> Any:
    """A fused attention backward with the sensitivity ``g`` (support ``s``, ``[B, H, Lq, Ev]``): the query rows
    with a supported element (``[B, H, Lq]``). A row that has none adds nothing to dK and dV, and its own dQ is a
    structural zero."""
    return o.any(s, [-1], False)


def attention_keys(o: Any, rows: Any, allowed: Any = None) -> Any:
    """The keys some kept query row attends to, from ``attention_rows``: ``[B, H, Lk]`` where ``allowed`` (where
    P_ij can be nonzero, ``[.., Lq, Lk]``: a mask's -inf/False entries and a causal triangle are structural
    zeros of P) is given, else ``[B, H, 1]`` (every key of a (batch, head) with a kept row). A key that no kept
    row attends to has P_ij = 0 for every kept row: its dK and dV are structural zeros."""
    if allowed is None:
        return o.any(rows, [-1], True)
    return o.any(o.both(o.unsqueeze(rows, -1), allowed), [-2], False)


def value_columns(o: Any, s: Any) -> Any:
    """The columns of v that a supported element of ``g`` reads (``[B, H, Ev]``): dP = g v^T reads column e of
    v only through g[..., e]."""
    return o.any(s, [-2], False)
