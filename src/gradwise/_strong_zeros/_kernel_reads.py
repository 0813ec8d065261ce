"""Kernel facts of the scaled products (addmm, addmv, addbmm, baddbmm, addr): whether a kernel with alpha = 0 leaves
the product unread, or with beta = 0 the input, read once per layout by running the forward op on NaN operands
(``_SKIPS``), and which node formulas' muls by 0 are those terms'. Read by the mul rule (``_rules_bilinear.
_zero_alpha_mul``) and the plan (``_node_facts``).

May import: torch, _rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradwise._strong_zeros._rules import _hooked

aten = torch.ops.aten


# Nodes of ops that add a scaled product to a scaled input, beta * input + alpha * (a @ b). Their backward scales
# each operand's gradient by alpha (``maybe_multiply(g @ b^T, alpha)``), after the product: with alpha = 0 the
# formula computes 0 x (g @ b^T), NaN wherever b holds a NaN/Inf, although a BLAS kernel never read the product
# (a and b reach nothing of the output). Per node name: the forward op, its saved operands (a, b), the output's
# shape from theirs. The plan counts such a node with alpha = 0 as making zeros (``_node_facts``).
ZERO_ALPHA_PRODUCTS: dict[str, tuple[Any, tuple[str, str], Callable[[tuple, tuple], tuple]]] = {
    "AddmmBackward0": (aten.addmm.default, ("_saved_mat1", "_saved_mat2"), lambda a, b: (a[0], b[1])),
    "AddmvBackward0": (aten.addmv.default, ("_saved_mat", "_saved_vec"), lambda a, b: (a[0],)),
    "AddbmmBackward0": (aten.addbmm.default, ("_saved_batch1", "_saved_batch2"), lambda a, b: (a[1], b[2])),
    "BaddbmmBackward0": (aten.baddbmm.default, ("_saved_batch1", "_saved_batch2"), lambda a, b: (a[0], a[1], b[2])),
    "AddrBackward0": (aten.addr.default, ("_saved_vec1", "_saved_vec2"), lambda a, b: (a[0], b[0])),
}


def _kernel_skips_product(node: Any, grad: torch.Tensor) -> bool:
    """Whether the forward kernel of ``node`` (alpha = 0, one of ZERO_ALPHA_PRODUCTS) left its product unread: the
    op run again on NaN operands of the saved ones' shapes, strides and dtype gives a finite output. Kernels differ
    (BLAS skips the product; CPU's small baddbmm, addr and float16/bfloat16 kernels compute 0 x NaN), and where one
    read it the output used the NaN: the gradient's NaN is genuine. An operand not saved is the one whose gradient
    ``grad`` is (the other's gradient needs it saved), so it has ``grad``'s shape. Not known (False) where a saved
    operand unpacks through a hook: a non-reentrant checkpoint's may be unpacked only once, by the formula itself.
    The answer depends on the layouts only: it is cached (``_SKIPS``), one re-run per layout, not one per backward
    and operand."""
    op, names, out_shape = ZERO_ALPHA_PRODUCTS[type(node).__name__]
    if _hooked(node, *("_raw" + n for n in names)):
        return False
    saved = [getattr(node, n) for n in names]
    if all(s is None for s in saved):
        return False
    layouts = tuple((tuple(grad.shape), None, grad.dtype, grad.device) if s is None else _layout(s) for s in saved)
    beta = node._saved_beta
    return _cached((op, layouts, beta), lambda: bool(_rerun_skips(op, layouts, out_shape, beta)))


# the re-runs' answers per (op, layouts, beta or what else decides them), plus the thread count and oneDNN's switch
# (kernels differ by both)
_SKIPS: dict[tuple, bool | None] = {}


def _cached(key: tuple, rerun: Callable[[], bool | None]) -> bool | None:
    """``rerun()``'s answer for ``key`` (one re-run per layout, not one per backward and operand); the table starts
    over past 256 entries."""
    key = (*key, torch.get_num_threads(), torch._C._get_mkldnn_enabled())
    got = _SKIPS.get(key)
    if got is None:
        if len(_SKIPS) >= 256:
            _SKIPS.clear()
        got = _SKIPS[key] = rerun()
    return got


def _layout(t: torch.Tensor) -> tuple:
    """What a kernel's choice depends on in an operand: (shape, strides, dtype, device)."""
    return tuple(t.shape), t.stride(), t.dtype, t.device


def _rerun_skips(op, layouts: tuple, out_shape: Callable[[tuple, tuple], tuple], beta) -> bool | None:
    """The op with alpha = 0 on NaN operands of these (shape, strides or None: contiguous, dtype, device): finite?
    None where they do not fit the op (not known to skip). With beta = 0 the input is NaN too: the muls by 0 of
    both terms are taken as structural together (``_zero_alpha_mul``), so the kernel must leave both unread (MPS's
    baddbmm read a beta = 0 input: pytorch/pytorch#194442)."""
    operands = [torch.empty(shape, dtype=dtype, device=device) if stride is None else
                torch.empty_strided(shape, stride, dtype=dtype, device=device)
                for shape, stride, dtype, device in layouts]
    for t in operands:
        t.fill_(float("nan"))
    try:
        inp = operands[0].new_zeros(out_shape(operands[0].shape, operands[1].shape))
        if beta == 0:
            inp.fill_(float("nan"))
        out = op(inp, *operands, beta=beta, alpha=0)
    except (RuntimeError, IndexError):  # shapes that do not fit (a mul of beta's): not known to skip
        return None
    return bool(out.isfinite().all())


def _graph_skips_product(name: str, saved: tuple | None, grad: torch.Tensor) -> bool:
    """``_kernel_skips_product`` for a compiled backward's graph run op by op (``_graph_forms._zero_alpha_node``),
    which holds the formula's saved operands (``saved``: one or two, in no known order, maybe transposed) but
    neither the node nor beta: every order and orientation of the operands (an operand not saved has ``grad``'s
    shape) that fits the op, with beta 0 and 1, must leave the product unread, and one must fit."""
    if not saved or len(saved) > 2 or not all(isinstance(s, torch.Tensor) for s in saved):
        return False
    op, _, out_shape = ZERO_ALPHA_PRODUCTS[name]
    # (the partitioner may save an operand transposed, as the formula reads it: each as it is or as its .mT)
    lay = [{_layout(t) for t in ((s, s.mT) if s.dim() > 1 else (s,))} for s in saved]
    if len(lay) == 1:
        lay.append({(tuple(grad.shape), None, grad.dtype, grad.device)})
    fits = False
    for layouts in {(a, b) for a in lay[0] for b in lay[1]} | {(b, a) for a in lay[0] for b in lay[1]}:
        for beta in (0, 1):
            skips = _cached((op, layouts, beta), lambda: _rerun_skips(op, layouts, out_shape, beta))  # noqa: B023
            if skips is False:
                return False
            fits |= skips is True
    return fits


def _zero_beta(node: Any, grad: torch.Tensor) -> bool:
    """Whether ``node`` (one of ZERO_ALPHA_PRODUCTS) scales its input by beta = 0 and its product by alpha != 0,
    so that its formula's one mul by a literal 0 is beta's, ``maybe_multiply(grad, beta)``: the input's gradient
    (``grad``: the output's sensitivity). PyTorch documents that with beta = 0 the input is ignored (its NaN/Inf
    not propagated), so that 0 is the deleted input term's, a structural zero: the input gets 0 as in the program
    without that term, also where the sensitivity is infinite (sqrt of the output at 0: PyTorch's inf x 0 = NaN).
    Only where the kernel does leave it unread (``_kernel_skips_input``): CPU's and cuBLAS's do, MPS's baddbmm read
    it (pytorch/pytorch#194442), and its NaN there is genuine. beta and alpha are the node's saved Python scalars.
    (With alpha = 0 too, both muls are by 0: ``_zero_alpha_mul`` takes them together, by ``_kernel_skips_product``.)"""
    return node._saved_beta == 0 and node._saved_alpha != 0 and _kernel_skips_input(node, grad)


def _zero_beta_of_a_read_product(node: Any, grad: torch.Tensor) -> bool:
    """With alpha = beta = 0 where the kernel read the product (CPU's small and float16/bfloat16 addr, baddbmm,
    addmm compute 0 x NaN: ``_kernel_skips_product`` False), whether this mul by 0 is beta's (``_beta_mul``) and
    the kernel left the input unread (``_kernel_skips_input``): that 0 is the deleted input term's, structural, while
    the operands' muls keep PyTorch's 0 x NaN (the output used the product's NaN)."""
    return node._saved_beta == 0 and _beta_mul(node, grad) and _kernel_skips_input(node, grad)


# The shape of an operand the node did not save, from the other's (o) and the output's (y): (first's, second's)
_UNSAVED_SHAPE: dict[str, tuple[Callable[[tuple, tuple], tuple], Callable[[tuple, tuple], tuple]]] = {
    "AddmmBackward0": (lambda o, y: (y[0], o[0]), lambda o, y: (o[1], y[1])),
    "AddmvBackward0": (lambda o, y: (y[0], o[0]), lambda o, y: (o[1],)),
    "AddbmmBackward0": (lambda o, y: (o[0], y[0], o[1]), lambda o, y: (o[0], o[2], y[1])),
    "BaddbmmBackward0": (lambda o, y: (o[0], y[1], o[1]), lambda o, y: (o[0], o[2], y[2])),
    "AddrBackward0": (lambda o, y: (y[0],), lambda o, y: (y[1],)),
}


def _kernel_skips_input(node: Any, grad: torch.Tensor) -> bool:
    """Whether the forward kernel of ``node`` (beta = 0, alpha != 0) left its input unread: the op run again with
    the node's alpha on finite operands of the saved ones' layouts (an unsaved one contiguous, its shape from the
    other's and the output's) and a NaN input, full and broadcast, gives a finite output. Not known (False) where
    neither operand is saved (one may be, addr's: both from the output) or one unpacks through a hook. Cached per
    layout in ``_SKIPS``, as ``_kernel_skips_product``."""
    name = type(node).__name__
    op, names, _ = ZERO_ALPHA_PRODUCTS[name]
    if _hooked(node, *("_raw" + n for n in names)):
        return False
    saved = [getattr(node, n) for n in names]
    y = tuple(grad.shape)
    if all(s is None for s in saved) and name != "AddrBackward0":
        return False
    layouts = []
    for i, s in enumerate(saved):
        if s is None:
            other = saved[1 - i]
            shape = _UNSAVED_SHAPE[name][i](() if other is None else tuple(other.shape), y)
            layouts.append((shape, None, grad.dtype, grad.device))
        else:
            layouts.append(_layout(s))
    alpha = node._saved_alpha
    return bool(_cached(("input", op, tuple(layouts), y, alpha), lambda: _rerun_skips_input(op, layouts, y, alpha)))


def _beta_mul(node: Any, t: torch.Tensor) -> bool:
    """Whether a mul by 0 of ``t`` in ``node``'s formula (alpha = beta = 0: every one of its muls is by 0) is beta's,
    ``maybe_multiply(grad, beta)``, rather than an operand's ``(grad @ other) * alpha``: ``t`` has the output's
    shape (the one the operands' shapes give), which no operand's gradient has. An operand whose shape is not
    saved gets no mul at all (its gradient needs the other saved) or has its shape from the other's and ``t``'s.
    Where an operand's gradient could have the output's shape too (square addmm, baddbmm with k = m) it is not told
    apart: False, PyTorch's 0 x NaN kept."""
    name = type(node).__name__
    _, names, out_shape = ZERO_ALPHA_PRODUCTS[name]
    saved = [getattr(node, n) for n in names]
    if all(s is None for s in saved):  # (no operand gets a gradient: the only mul is beta's)
        return True
    y = tuple(t.shape)
    shapes = [tuple(s.shape) if s is not None else _UNSAVED_SHAPE[name][i](tuple(saved[1 - i].shape), y)
              for i, s in enumerate(saved)]
    graded = [shapes[i] for i in (0, 1) if saved[1 - i] is not None]  # (the operands whose gradient has a mul)
    return tuple(out_shape(*shapes)) == y and y not in graded


def _rerun_skips_input(op: Any, layouts: list, out_shape: tuple, alpha: Any) -> bool:
    """The op with beta = 0 and ``alpha`` on zero operands of these layouts and a NaN input (of the output's shape,
    and one element broadcast): finite for both? False where they do not fit the op."""
    operands = [torch.zeros(shape, dtype=dtype, device=device) if stride is None else
                torch.empty_strided(shape, stride, dtype=dtype, device=device).zero_()
                for shape, stride, dtype, device in layouts]
    full = operands[0].new_full(out_shape, float("nan"))
    try:
        return all(bool(op(inp, *operands, beta=0, alpha=alpha).isfinite().all())
                   for inp in (full, full[(slice(0, 1),) * len(out_shape)]))
    except (RuntimeError, IndexError):  # (shapes that do not fit: not known to skip)
        return False
