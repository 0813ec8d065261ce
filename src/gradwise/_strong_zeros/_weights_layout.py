"""Where a softmax's elements land in the weights an mm/bmm or a mul reads (``_rules_bilinear.weights_paths``): each
layout node between them (permute, transpose, slice, select, expand, views, a broadcasting elementwise op) replayed on
a bool mask shaped like the softmax's result, from the node's saved dims and its output's shape (``_input_metadata``):
metadata, never values. Until 2026-12-07 only paths that keep the elements' order were mapped (a reshape of the
whole mask), so an einsum's two permutes that compose to the identity, a copy between two transposes
(``a.transpose(1, 2).contiguous().transpose(1, 2)``), ``mT``, ``movedim``, a narrow and a 4-d matmul's expand left the
softmax's zeros unread: a padded key's value kept PyTorch's 0 x inf = NaN, silently (``tests/test_hunt_sz35.py``).

May import: torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten

Move = Callable[[Any, torch.Tensor, tuple[int, ...], int], "torch.Tensor | None"]


def as_signed(value: int) -> int:
    """A saved int64 dim or index as Python reads it (a negative one comes back as its uint64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _permute(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """permute (einsum's, movedim's): the same dims."""
    return mask.permute([as_signed(d) for d in node._saved_dims])


def _transpose(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """transpose, swapaxes, mT: the same two dims."""
    return mask.transpose(as_signed(node._saved_dim0), as_signed(node._saved_dim1))


def _t(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """t() of a matrix (or a vector: itself)."""
    return mask.t()


def _slice(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """a slice or narrow: the same positions (the weights cut away are not read)."""
    start, end = (None if v is None else as_signed(v) for v in (node._saved_start, node._saved_end))
    return aten.slice.Tensor(mask, as_signed(node._saved_dim), start, end, node._saved_step)


def _select(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """a select (one head's weights): the same index."""
    return mask.select(as_signed(node._saved_dim), as_signed(node._saved_index))


def _expand(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor | None:
    """expand (matmul's broadcast of 3-d weights over 4-d values) and an elementwise op that broadcasts the weights
    (a scaling by a larger constant): each copy of a masked weight is that weight, 0 whatever the value it meets."""
    if tuple(mask.shape) == shape:
        return mask
    if torch.broadcast_shapes(mask.shape, shape) != shape:
        return None
    return mask.expand(shape)


def _reshape(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor | None:
    """views that keep the elements' order (view, reshape, unsqueeze, squeeze, a copy: clone, contiguous, .to)."""
    return mask.reshape(shape) if mask.numel() == shape.numel() else None


def _sum_over(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """a sum over dims (einsum's over heads, ``bhqk,bkd->bqd``): a sum of a softmax's weights (none negative) is a
    masked entry's 0 where every term is one, as a sum of strong zeros is a strong zero."""
    # (sum(dim=[]) and sum(dim=None): all of them; None crashed the backward in sz35)
    dims = [as_signed(d) for d in node._saved_dim or ()] or list(range(mask.dim()))
    if any(mask.shape[d] == 0 for d in dims):  # (a sum of no terms: a 0 no softmax masked, a value; amin raised)
        return torch.zeros(shape, dtype=torch.bool, device=mask.device)
    return mask.amin(dims, keepdim=node._saved_keepdim) if dims else mask


def _sum_of_all(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """a sum of every weight: masked where every term is, as ``_sum_over``; a sum of none is a value's 0 (sz35's
    ``mask.all()`` took it for masked: its 0 x inf = NaN hidden)."""
    return mask.all() if mask.numel() else torch.zeros((), dtype=torch.bool, device=mask.device)


def _split(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """split, chunk (heads split off): the piece ``out`` along the same dim."""
    sizes = node._saved_split_sizes if hasattr(node, "_saved_split_sizes") else node._saved_split_size
    return mask.split(sizes, as_signed(node._saved_dim))[out]


def _repeat(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """repeat (weights tiled): each copy the weight it repeats."""
    return mask.repeat(node._saved_repeats)


def _unbind(node: Any, mask: torch.Tensor, shape: tuple[int, ...], out: int) -> torch.Tensor:
    """unbind (one head of each): the piece ``out``."""
    return mask.select(as_signed(node._saved_dim), out)


_MOVES: dict[str, Move] = {
    "PermuteBackward0": _permute, "TransposeBackward0": _transpose, "TBackward0": _t, "SliceBackward0": _slice,
    "SelectBackward0": _select, "ExpandBackward0": _expand, "SumBackward1": _sum_over,
    "SumBackward0": _sum_of_all, "SplitBackward0": _split,
    "SplitWithSizesBackward0": _split, "UnbindBackward0": _unbind,
    "RepeatBackward0": _repeat,
    **dict.fromkeys(("UnsqueezeBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                     "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "AliasBackward0", "CloneBackward0",
                     "ToCopyBackward0"), _reshape),
    # elementwise nodes of a weights path (dropout, a scaling, a gate, a renormalisation, a repair of masked rows):
    # each weight where it was, broadcast where the other operand is larger
    **dict.fromkeys(("NativeDropoutBackward0", "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1",
                     "NanToNumBackward0", "MaskedFillBackward0", "MaskedFillBackward1", "WhereBackward0"), _expand),
}


# views between a softmax and a mul by its weights, which keep its storage (its exact zeros where they were); where a
# copy or a factor comes between, the softmax's zeros are mapped through them (``mapped_mask``)
_SAME_STORAGE = frozenset(("UnsqueezeBackward0", "ViewBackward0", "ExpandBackward0", "PermuteBackward0",
                           "TransposeBackward0", "TBackward0", "SliceBackward0", "SelectBackward0",
                           "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0",
                           "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "AliasBackward0"))
# nodes whose every output element is a copy of an input element, bit for bit (views, and copies that keep the dtype):
# weights reached from a softmax through these alone hold its exact zeros, read from the weights themselves. Until
# 2026-12-07 they were read through the softmax's saved result, which a checkpoint's hook packs: bmm(a[None], v) of a
# checkpointed softmax kept a padded value's 0 x inf = NaN (test_review_perf_sz35). (ToCopyBackward0 is not one: a
# float64 -> float32 copy flushes a used key's tiny weight to 0.)
_COPIES = _SAME_STORAGE | frozenset(("CloneBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                                     "RepeatBackward0"))


def copies_only(path: list[Any]) -> bool:
    """Whether the weights at the start of ``path`` (``_rules_bilinear.weights_paths``) are a softmax's elements,
    copied through ``_COPIES`` alone (or none: its own output): its exact zeros are theirs (not exp(log_softmax)'s:
    an underflow)."""
    return path[-1].name() != "ExpBackward0" and all(p.name() in _COPIES for p in path[:-1])


def bit_copies(path: list[Any], weights: Any) -> bool:
    """``copies_only(path)``, and the weights at its start (the product's saved operand) unchanged in place since the
    path made them (version 0): a write under no_grad (``b = a.clone()``, then ``b[:, k] = 0`` there) keeps the path's
    nodes and puts its own zeros at used keys, which are values, as a constant masked_fill's are (until sz36's review
    they were taken for masked keys: the used key's 0 x inf = NaN hidden, silently: tests/test_review_sz36.py)."""
    return copies_only(path) and isinstance(weights, torch.Tensor) and weights._version == 0


def _output_of(node: Any, consumer: Any) -> int | None:
    """Which output of ``node`` its ``consumer`` reads (a split's piece), or None where it reads two of them."""
    outs = {nr for producer, nr in consumer.next_functions if producer is node}
    return outs.pop() if len(outs) == 1 else None


def mapped_mask(consumer: Any, path: list[Any], mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` (shaped like the result of the softmax ``path[-1]``) carried through the nodes of ``path`` before it,
    from the softmax on: shaped like ``path[0]``'s output (the one ``consumer`` reads), each element the mask's at the
    softmax element it is a copy of; None where a node is none of ``_MOVES`` or its output's shape is not the one
    replayed (never a guess)."""
    for i in range(len(path) - 2, -1, -1):
        node = path[i]
        move = _MOVES.get(node.name())
        if move is None:
            return None
        out = _output_of(node, path[i - 1] if i else consumer) if len(node._input_metadata) > 1 else 0
        if out is None:
            return None
        shape = torch.Size(node._input_metadata[out].shape)  # (the node's forward output)
        mask = move(node, mask, shape, out)
        if mask is None or mask.shape != shape:
            return None
    return mask
