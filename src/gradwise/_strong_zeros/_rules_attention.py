"""Strong-zero rules for the fused attention backwards of ``scaled_dot_product_attention``.

Every fused SDPA backward computes, per (batch, query head), with P = exp(scale * q k^T + mask - lse):

    D_i = g_i . out_i,   dP_ij = g_i . v_j,   dS = P * (dP - D),
    dV_j = sum_i P_ij g_i,   dQ_i = scale sum_j dS_ij k_j,   dK_j = scale sum_i dS_ij q_i.

A query row i whose sensitivity g_i is all structural zeros (a padding token, a discarded sequence) adds
nothing to dK and dV and its own dQ_i is a structural zero, but inside the kernel its NaN q_i, out_i or lse_i
meets the zero (0 x NaN). A key j that no kept query attends to (mask -inf or False, above the causal
diagonal) has P_ij = 0 for every kept row, so its dK_j and dV_j are structural zeros, and its NaN k_j / v_j
would meet those zeros in dQ. The rule *replaces* (never removes: the kernel runs on the same shapes and
blocks, so kept results are PyTorch's bits) the discarded rows by q = out = 0 and lse = +inf (then
P = 0 and dS = 0 exactly; g is 0 there already, as every structural element is) and the unused keys by k = v = 0,
then records the supports. One rule body serves
every backward SDPA can pick (CPU flash, CUDA flash, memory-efficient, cuDNN), described by ``_Spec``. Which rows
and keys are kept is the shared fact (``gradwise._ops._contractions``, which the compiled pass reads too).

May import: torch, gradwise._masks, gradwise._ops, _rules, _node_facts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gradwise._masks import EagerMasks, mask_all, mask_any
from gradwise._ops._contractions import attention_keys, attention_rows, value_columns
from gradwise._strong_zeros._node_facts import _MAKES_NO_ZEROS_IF, _NOT_READ, _OWN_ZEROS_INSIDE, NODE_FACTS
from gradwise._strong_zeros._rules import _annihilate, _Kept, _kept_bits, _register, _run_unruled, _tracked_slots

aten = torch.ops.aten


@dataclass(frozen=True)
class _Spec:
    out: int  # positions among the positional arguments (g, q, k, v are 0..3 everywhere)
    lse: int
    mask: int | str | None  # the additive mask / bias: a position, a keyword, or none
    causal: int | str | None  # where is_causal (or _efficient_attention's custom_mask_type) is
    causal_default: Any = False
    blhe: bool = False  # (batch, length, heads, dim) layout of the low-level kernels, else (batch, heads, length, dim)
    varlen: tuple[int, ...] = ()  # cumulative sequence lengths: packed sequences, not ruled
    top_left: bool = True  # causal alignment known to be top-left (torch's is_causal); else only used when Lq == Lk
    windowed: tuple[str, ...] = ()  # sliding-window keywords: keys outside the window are kept (conservative)
    # the position of dropout_p where the kernel's results per batch entry do not depend on the others' (no RNG
    # offsets per batch index when it is 0): whole discarded entries are then left out (`_batch_subset`)
    batch_dropout: int | None = None


SPECS: dict[Any, _Spec] = {
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _Spec(4, 5, "attn_mask", 7, batch_dropout=6),
    aten._scaled_dot_product_efficient_attention_backward.default: _Spec(5, 6, 4, 11),
    aten._scaled_dot_product_flash_attention_backward.default: _Spec(4, 5, None, 11, varlen=(6, 7),
                                                                     top_left=False),
    aten._scaled_dot_product_cudnn_attention_backward.default: _Spec(4, 5, 8, 14, varlen=(9, 10), top_left=False),
    aten._flash_attention_backward.default: _Spec(4, 5, None, 11, blhe=True, varlen=(6, 7), top_left=False,
                                                  windowed=("window_size_left", "window_size_right")),
    aten._efficient_attention_backward.default: _Spec(5, 10, 4, 14, causal_default=0, blhe=True, varlen=(6, 7),
                                                      windowed=("window_size",)),
}


def _arg(args: tuple, kwargs: dict, where: int | str | None, default: Any = None) -> Any:
    if where is None:
        return default
    if isinstance(where, str):
        return kwargs.get(where, default)
    return args[where] if where < len(args) else default


def _canonical(t: torch.Tensor, blhe: bool) -> torch.Tensor:
    return t.transpose(1, 2) if blhe else t


def _causal_offset(spec: _Spec, causal: Any, lq: int, lk: int) -> int | None:
    """Causal masking allows P_ij where j <= i + offset: that offset, or None when not causal (or when the kernel's
    alignment is not known and Lq != Lk)."""
    kind = 1 if causal is True else causal if isinstance(causal, int) and not isinstance(causal, bool) else 0
    if kind and (spec.top_left or lq == lk):
        return lk - lq if kind == 2 else 0  # _efficient_attention's custom_mask_type 2: bottom-right
    return None


def _allowed(mask: Any, offset: int | None, lq: int, lk: int, device: torch.device) -> torch.Tensor | None:
    """Where P_ij can be nonzero (bool, broadcastable to (B, H, Lq, Lk)), or None when everywhere. A mask entry
    of -inf (False) and an entry above the causal diagonal (``_causal_offset``) are structural zeros of P; a NaN
    entry is not."""
    allowed = None
    if isinstance(mask, torch.Tensor) and mask.numel():
        allowed = mask if mask.dtype == torch.bool else mask != -math.inf
    if offset is not None:
        i = torch.arange(lq, device=device).unsqueeze(1)
        tri = torch.arange(lk, device=device).unsqueeze(0) <= i + offset
        allowed = tri if allowed is None else allowed & tri
    return allowed


def _causal_used(rows: torch.Tensor, offset: int, lk: int) -> torch.Tensor:
    """(B, H, Lk) keys some kept query row attends to under causal masking alone: key j is read by the rows
    i >= j - offset, so it is used when one of those is kept (a suffix any of the rows; the (B, H, Lq, Lk)
    product of rows and the triangle is not built)."""
    lq = rows.shape[-1]
    suffix = rows.flip(-1).to(torch.uint8).cummax(-1).values.flip(-1).bool()  # any(rows[..., i:])
    first = torch.arange(lk, device=rows.device) - offset  # the first row that reads key j
    used = suffix[..., first.clamp(0, lq - 1)]
    return used & (first <= lq - 1)


def _fold_heads(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, ...) bools -> (B, Hkv, ...): a key/value head is used when one of its query heads uses it (grouped
    query attention: query head h reads kv head h // (Hq / Hkv), as repeat_interleave)."""
    b, hq = t.shape[0], t.shape[1]
    if hq == kv_heads:
        return t
    return mask_any(t.reshape(b, kv_heads, hq // kv_heads, *t.shape[2:]), 2)


def _kept(t: torch.Tensor, keep: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` where ``keep``, else ``value``, in ``t``'s own memory layout (one pass). The CUDA kernels read their
    saved tensors' strides (the memory-efficient one keeps out in (B, L, H, E) memory): out-of-place
    ``masked_fill``/``where`` return a contiguous copy, on which the fp16 memory-efficient backward computed
    finite, wrong gradients."""
    out = torch.empty_like(t)
    if value == 0 and _kept_bits(t, keep, out):
        return out
    return torch.where(keep, t, t.new_full((), value), out=out)


def _lse_rows(keep: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq) query rows laid out as the kernel's logsumexp: the memory-efficient kernel pads its rows to a
    multiple of 32 (kept as they are), cuDNN's has a trailing dimension of 1 (B, H, Lq, 1)."""
    if lse.dim() == keep.dim() + 1:
        return keep.unsqueeze(-1)
    pad = lse.shape[-1] - keep.shape[-1]
    return torch.nn.functional.pad(keep, (0, pad), value=True) if pad > 0 else keep


def _record(sup: Any, out: Any, support: torch.Tensor | None) -> None:
    if not isinstance(out, torch.Tensor):
        return
    if support is not None:
        support = support.expand(out.shape)
        _annihilate(out, support)
    sup.record(out, support)


def _attention_backward(func, args, kwargs, sup):
    """Fused SDPA backwards (see the module docstring): discarded query rows and unused keys are replaced by
    harmless values before the kernel runs; their gradients are structural zeros."""
    spec = SPECS[func]
    tracked = _tracked_slots(args, sup)
    if tracked not in ([], [0]):
        return _run_unruled(func, args, kwargs, sup, "a tracked query, key, value or output")
    if any(isinstance(a, torch.Tensor) and a.numel() for a in (_arg(args, kwargs, i) for i in spec.varlen)):
        return _run_unruled(func, args, kwargs, sup, "packed variable-length sequences" if tracked else None)
    g, q, k, v = args[:4]
    out, lse = args[spec.out], args[spec.lse]
    mask = _arg(args, kwargs, spec.mask)
    causal = _arg(args, kwargs, spec.causal, spec.causal_default)
    qc, kc = (_canonical(t, spec.blhe) for t in (q, k))
    if qc.dim() != 4 or kc.dim() != 4 or qc.shape[1] % kc.shape[1]:
        return _run_unruled(func, args, kwargs, sup, "an unexpected shape" if tracked else None)
    lq, lk, kv_heads = qc.shape[2], kc.shape[2], kc.shape[1]
    s = sup.of(g)
    sc = None if s is None else _canonical(s.expand(g.shape), spec.blhe)  # (B, Hq, Lq, Ev)
    offset = _causal_offset(spec, causal, lq, lk)
    # with no mask, every key is read by some kept row when every row is kept (causal: the last row reads them all)
    reads_all = not (isinstance(mask, torch.Tensor) and mask.numel()) and lq and (offset is None or offset >= lk - lq)
    if sc is not None and sc.numel():
        some, every = _per_entry(sc)  # (B,): whether a batch entry's g has a supported element / only those
        if mask_all(every):
            sc = None
        elif spec.batch_dropout is not None and _arg(args, kwargs, spec.batch_dropout) == 0 and \
                not mask_all(some):
            return _batch_subset(func, args, kwargs, sup, spec, some, bool(reads_all) and mask_all(some == every))
    if sc is None and reads_all:
        return _run_unruled(func, args, kwargs, sup, None)
    rows = None if sc is None else attention_rows(EagerMasks, sc)  # (B, Hq, Lq): query rows with a kept element
    allowed = _allowed(mask, offset, lq, lk, q.device)
    if rows is None and allowed is None:
        return _run_unruled(func, args, kwargs, sup, None)
    # keys some kept query row may attend to: (B, Hkv, Lk)
    if allowed is None:
        used = attention_keys(EagerMasks, rows).expand(*rows.shape[:2], lk)
    elif rows is not None and offset is not None and not (isinstance(mask, torch.Tensor) and mask.numel()):
        used = _causal_used(rows, offset, lk)  # attention_keys under a causal triangle, without the triangle
    elif rows is None:  # every row kept: the keys the mask lets some row read
        used = mask_any(allowed.expand(qc.shape[0], qc.shape[1], lq, lk), -2)
    else:
        used = attention_keys(EagerMasks, rows, allowed).expand(qc.shape[0], qc.shape[1], lk)
    used = _fold_heads(used, kv_heads)
    cols = None if sc is None else _fold_heads(value_columns(EagerMasks, sc), kv_heads)  # (B, Hkv, Ev)
    keep_v = used.unsqueeze(-1) if cols is None else used.unsqueeze(-1) & cols.unsqueeze(-2)
    if rows is None and mask_all(used):
        return _run_unruled(func, args, kwargs, sup, None)
    new = list(args)
    new_kwargs = dict(kwargs)
    back = lambda t: _canonical(t, spec.blhe)  # a transpose is its own inverse
    if sc is not None:  # (g itself is 0 wherever it is structural: every rule leaves exact zeros there)
        new[spec.out] = _kept(out, back(sc), 0)  # D_i = g_i . out_i: structural g meets no out
    if rows is not None and not mask_all(rows):
        new[1] = _kept(q, back(rows.unsqueeze(-1)), 0)
        new[spec.lse] = _kept(lse, _lse_rows(rows, lse), math.inf)
        if isinstance(mask, torch.Tensor) and mask.is_floating_point() and not bool(mask.max() < math.inf):
            # a NaN/+inf mask entry of a discarded row would make P NaN there even with lse = +inf
            bad = (mask.isnan() | (mask == math.inf)) & ~rows.unsqueeze(-1)
            clean = _kept(mask if bad.shape == mask.shape else mask.expand(bad.shape), ~bad, 0)
            if isinstance(spec.mask, str):
                new_kwargs[spec.mask] = clean
            else:
                new[spec.mask] = clean
    if not mask_all(used):
        new[2] = _kept(k, back(used.unsqueeze(-1)), 0)
    if not mask_all(keep_v):
        new[3] = _kept(v, back(keep_v), 0)
    outs = func(*new, **new_kwargs)
    dq, dk, dv = outs[:3]
    _record(sup, dq, None if rows is None else back(rows.unsqueeze(-1)))
    _record(sup, dk, back(used.unsqueeze(-1)))
    _record(sup, dv, back(keep_v))
    if len(outs) > 3 and isinstance(outs[3], torch.Tensor):  # the bias gradient, dS: (B, H, Lq, Lk)
        bias_support = None if rows is None else rows.unsqueeze(-1)
        if allowed is not None:
            bias_support = allowed if bias_support is None else bias_support & allowed
        fits = bias_support is not None and all(a in (1, b) for a, b in
                                                zip(bias_support.shape, outs[3].shape[-bias_support.dim():],
                                                    strict=True))
        _record(sup, outs[3], bias_support if fits else None)
    return outs


_register(*SPECS)(_attention_backward)


def _per_entry(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of each batch entry (dim 0) of a bool tensor, as (B,) bools: read as bytes over a (B, N) view
    where each entry is a dense block (a reduction over small inner dims is many times slower)."""
    u = m.view(torch.uint8)
    rest = sorted(((st, n) for st, n in zip(u.stride()[1:], u.shape[1:], strict=True) if n != 1), reverse=True)
    size = 1
    for st, n in reversed(rest):
        if st != size:
            dims = tuple(range(1, u.dim()))
            return u.amax(dims).bool(), u.amin(dims).bool()
        size *= n
    flat = u.as_strided((u.shape[0], size), (u.stride(0), 1), u.storage_offset())
    return flat.amax(1).bool(), flat.amin(1).bool()


def _batch_subset(func, args, kwargs, sup, spec, entries: torch.Tensor, whole: bool):
    """The attention backward when whole batch entries hold only discarded query rows (padding sequences of a
    batch, samples sliced away): the kernel runs on the kept entries alone, as views where they form a range (no
    copy of q, k, v), and the others' gradients are structural zeros (no query row of theirs is kept, so no key
    of theirs is used). Each entry is computed on its own (no dropout), so the kept ones get the bits of the
    whole batch's run (tests/test_attention.py checks it). ``whole``: the kept entries keep every row and read
    every key, so the kernel runs on them as it is; else the rule runs on them."""
    b = args[1].shape[0]
    kept = _Kept(entries)
    pick = lambda t: kept.pick(t, 0)
    outs = None
    if kept.n:
        new, new_kwargs = list(args), dict(kwargs)
        for i in (0, 1, 2, 3, spec.out, spec.lse):
            new[i] = pick(args[i])
        mask = _arg(args, kwargs, spec.mask)
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[0] == b:  # else broadcast over batch
            if isinstance(spec.mask, str):
                new_kwargs[spec.mask] = pick(mask)
            else:
                new[spec.mask] = pick(mask)
        outs = func(*new, **new_kwargs) if whole else _attention_backward(func, tuple(new), new_kwargs, sup)
    results = []
    whole_entries = entries.reshape((b,) + (1,) * (args[1].dim() - 1))  # the support where a part has none
    for j, like in enumerate(args[1:4]):
        part = None if outs is None else outs[j]
        full = _zeros_laid_out(like if part is None else part, b)
        support = whole_entries
        if part is not None:
            s = sup.of(part)
            kept.put(full, part, 0)
            if s is not None:
                support = whole_entries.expand(full.shape).clone()
                kept.put(support, s.expand(part.shape), 0)
        sup.record(full, support.expand(full.shape))
        results.append(full)
    return tuple(results)


def _zeros_laid_out(t: torch.Tensor, b: int) -> torch.Tensor:
    """Zeros shaped like ``t`` with ``b`` batch entries, in ``t``'s memory order (the kernel's own layout of its
    gradients, which the ops after it read)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    shape = (b, *t.shape[1:])
    inverse = sorted(range(t.dim()), key=lambda i: order[i])
    return t.new_zeros([shape[d] for d in order]).permute(inverse)


# ---------------------------------------------------------------------------------------------------------
# The check before backward. The plan reads the node's q, k, v, out and logsumexp (a NaN/Inf there is what a
# discarded row's zero would meet). The mask is not read as a saved tensor: it holds -inf by design (a masked
# entry, a structural zero of P); only a NaN/+inf there, which makes P NaN, sends the backward to the strong pass.
# ---------------------------------------------------------------------------------------------------------

_MASK_ATTRS = {
    "ScaledDotProductFlashAttentionForCpuBackward0": "_raw_saved_attn_mask",
    "ScaledDotProductEfficientAttentionBackward0": "_raw_saved_attn_bias",
    "ScaledDotProductCudnnAttentionBackward0": "_raw_saved_attn_bias",
    "EfficientAttentionBackward0": "_raw_saved_bias",
    "ScaledDotProductFlashAttentionBackward0": None,
    "FlashAttentionBackward0": None,
}


def _saved_mask(node: Any, name: str) -> torch.Tensor | None:
    attr = _MASK_ATTRS[name]
    raw = getattr(node, attr, None) if attr else None
    t = raw.data if raw is not None else None
    return t if isinstance(t, torch.Tensor) and t.numel() else None


def _mask_singular(name: str):
    def singular(node: Any) -> bool:
        """A NaN or +inf in the attention mask makes P NaN/Inf where a discarded row's zero meets it."""
        m = _saved_mask(node, name)
        return m is not None and m.is_floating_point() and not bool(m.max() < math.inf)

    return singular


def _makes_no_zeros(name: str):
    def test(node: Any) -> bool:
        """Without a mask and without causal masking every P_ij may be nonzero: no key is unused."""
        causal = getattr(node, "_saved_custom_mask_type", None) if name == "EfficientAttentionBackward0" else \
            getattr(node, "_saved_is_causal", False)
        if causal:
            return False
        attr = _MASK_ATTRS[name]
        raw = getattr(node, attr, None) if attr else None  # (read once: each read wraps the saved variable anew)
        if raw is None:
            return True
        if raw.unpack_hook is not None:  # a mask a checkpoint packed is unknown: it may mask keys
            return False
        t = raw.data
        return not (isinstance(t, torch.Tensor) and t.numel())  # as _saved_mask

    return test


def _causal_keys_all_read(node: Any) -> bool:
    """Causal attention without a mask over Lq == Lk: its masked weights (j > i) are structural zeros that meet q,
    k and v inside its backward (so the node's saved tensors are read), but the last query reads every key, so
    no gradient it outputs gets a structural zero of its own and the nodes below are not reached by it."""
    # (the plan's walk calls this per backward: each saved variable is read once, as each read wraps it anew; a
    # freed one raises, and the caller's _holds answers False)
    name = type(node).__name__
    raw_q, raw_k = getattr(node, "_raw_saved_query", None), getattr(node, "_raw_saved_key", None)
    # under a checkpoint they are packed (no shapes to compare): the zeros may leave the node
    if raw_q is None or raw_k is None or raw_q.unpack_hook is not None or raw_k.unpack_hook is not None:
        return False
    attr = _MASK_ATTRS[name]
    raw_mask = getattr(node, attr, None) if attr else None
    if raw_mask is not None:  # a mask, even a packed one, may mask keys: as _saved_mask
        if raw_mask.unpack_hook is not None:
            return False
        mask = raw_mask.data
        if isinstance(mask, torch.Tensor) and mask.numel():
            return False
    q, k = raw_q.data, raw_k.data
    if q is None or k is None:  # freed by an earlier backward (the engine will not run this node)
        return False
    dim = 1 if name in ("EfficientAttentionBackward0", "FlashAttentionBackward0") else 2
    return q.dim() == 4 and k.dim() == 4 and q.shape[dim] == k.shape[dim]


for _name in _MASK_ATTRS:
    NODE_FACTS[_name] = _mask_singular(_name)
    _MAKES_NO_ZEROS_IF[_name] = _makes_no_zeros(_name)
    _OWN_ZEROS_INSIDE[_name] = _causal_keys_all_read
    if _MASK_ATTRS[_name]:
        _NOT_READ[_name] = (_MASK_ATTRS[_name],)
