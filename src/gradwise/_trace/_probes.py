"""Part probes: which elements of an op's output the NaN/Inf of one part of its inputs (one set of births, a
``_Parts`` part) makes non-finite, found by running the op again with that part's NaN/Inf alone, every other
NaN/Inf of its inputs made 0. The rule for the ops no table of ``_Parts`` describes (group_norm, interpolate,
adaptive pooling, index_add, scatter_add, an RNN layer's kernel, fused attention, their backwards): without it
their output held every birth at every element, and a padding row's NaN beside a used one was named as used
(a genuine finding for what gw.strong_zeros() removes), or the used one after the padding only.

Run only where an op reads NaN/Inf of several births (never on a finite program), at most ``MAX_PROBES`` times
an op; ops that draw random numbers (they would move the program's generator) and ops of namespaces whose
schemas may not declare their writes are never run again (``probes``).

May import: torch, gradwise._masks, gradwise._trace._facts, _shadow_reads.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from gradwise._masks import inexact
from gradwise._trace._facts import UNDECLARED_WRITES, UNPROBED
from gradwise._trace._shadow_reads import rerunnable

MAX_PROBES = 16  # reruns of one op per explanation (parts x non-finite inputs): past it, every birth is named


def probes(func, args=(), kwargs=None) -> bool:
    """Whether ``func`` may run again to tell its parts apart: a trusted namespace's op (its schema declares its
    writes) that draws no random numbers (fused attention draws them for its dropout only: none at
    ``dropout_p`` 0, as in evaluation or a layer built with dropout=0.0)."""
    if not rerunnable(func) or func.overloadpacket in UNPROBED:
        return False
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return True
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            p = args[i] if i < len(args) else (kwargs or {}).get(a.name, a.default_value)
            return isinstance(p, (int, float)) and p == 0
    return False


def zeroed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its NaN/Inf made 0 (the value a probe puts where another part's NaN/Inf was)."""
    return torch.nan_to_num(t, 0.0, 0.0, 0.0)


def only(t: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``t`` with its NaN/Inf kept at ``part`` (broadcast to its shape) and made 0 elsewhere."""
    return torch.where(part.broadcast_to(t.shape) | torch.isfinite(t), t, 0.0)


def probe(func, args, kwargs, out, o: torch.Tensor, instead: dict) -> torch.Tensor | None:
    """Bool over ``o`` (one of ``func``'s results ``out``): where ``func`` run again on its arguments, each tensor
    whose id is in ``instead`` replaced by its value there, makes a NaN/Inf. An argument the op writes is a zero
    tensor of its own (the rerun never writes the program's tensors; what it held before is finite, or written
    over). None where that is not known (``o`` not among the results, a failure, another shape)."""
    at = next((i for i, r in enumerate(tree_flatten(out)[0]) if r is o), None)
    if at is None:
        return None
    written = {id(a) for a in _written(func, args, kwargs)}

    def arg(a):
        if not isinstance(a, torch.Tensor):
            return a
        if id(a) in written:
            return torch.zeros_like(a) if id(a) not in instead else instead[id(a)].clone()
        return instead.get(id(a), a)

    try:
        with torch.no_grad(), _disable_current_modes():
            res = func(*tree_map(arg, args), **tree_map(arg, kwargs or {}))
            flat = tree_flatten(res)[0]
            p = flat[at] if at < len(flat) else None
            if not isinstance(p, torch.Tensor) or p.shape != o.shape:
                return None
            return ~torch.isfinite(p)
    except Exception:  # an explanation must never break the program it explains
        return None


def instead_of(nf: list, t: torch.Tensor, part: torch.Tensor) -> dict:
    """The replacements (by id) that keep the NaN/Inf of ``t`` at ``part`` alone among the non-finite ``nf``."""
    got = {id(u): zeroed(u) for u in nf if inexact(u)}
    got[id(t)] = only(t, part)
    return got


def _written(func, args, kwargs):
    """The tensors the op writes: those its schema says it writes, and a training batch norm's running statistics
    (``UNDECLARED_WRITES``: native_batch_norm updates them under a schema that writes nothing; a probe run on the
    program's own moved BatchNorm's running_mean once more per part, a silent change of the model's state)."""
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            yield from _tensors(_arg(func, args, kwargs, i))
    names = UNDECLARED_WRITES.get(func.overloadpacket)
    if names is not None and _arg(func, args, kwargs, _index(func, "training")):
        for name in names:
            yield from _tensors(_arg(func, args, kwargs, _index(func, name)))


def _index(func, name: str) -> int:
    return next(i for i, a in enumerate(func._schema.arguments) if a.name == name)


def _arg(func, args, kwargs, i: int):
    a = func._schema.arguments[i]
    return args[i] if i < len(args) and not a.kwarg_only else (kwargs or {}).get(a.name, a.default_value)


def _tensors(got):
    return (x for x in tree_flatten(got)[0] if isinstance(x, torch.Tensor))
