"""Strong zeros under ``torch.func`` transforms and batched gradients: which backwards the strong pass follows
there (``plain_reason``), and what it may read of them (``all_finite``).

A TorchDispatchMode active during such a backward sees each op after functorch has unwrapped it: plain tensors
(under vmap, the physical ones with the batch dims), the same tensor objects every time a wrapper is unwrapped. So
the strong pass runs there as in eager code, each op through its rule, on those tensors; what it cannot do is
plan (``_plan`` reads saved tensors, which are wrappers: ``aten::item`` has no batching rule) or hook nodes (their
hooks get wrappers). It runs without a plan, always under the mode (the 'check' path's one pass), where:

- every transform on the stack is ``vmap`` or ``grad``/``vjp`` (no ``jvp``/``jacfwd``, no ``functionalize``, no
  forward-mode dual level): a jvp level would differentiate the backward's formulas, whose annihilation runs below
  it (a tangent through ``0 * NaN``);
- at most one ``grad`` level is live, on top of the stack, and the outputs are its own wrappers: an outer grad level
  (``grad(grad(f))``, ``hessian``, ``grad`` of a ``jacrev``) would record the backward's formulas, not what the
  pass made of them. Without a live grad level the outputs are those of a ``vjp`` function called after its
  transform returned (``jacrev`` calls it under ``vmap``) or plain tensors with batched seeds
  (``is_grads_batched=True``, whose legacy vmap unwraps the same way);
- not while ``torch.compile`` traces (``compiling()``: the compiled graph's own treatment).

PyTorch's standard basis (a Jacobian's unit rows: jacrev, ``jacobian(vectorize=True)``), recognized by identity,
selects outputs, and its zeros are structural (``selecting_seeds``); every other seed is a value. Anything else
keeps running as plain PyTorch with a ``PlainBackwardWarning``. An eager backward under a forward-AD dual level
runs strong; where its results' tangents hold NaN/Inf, the forward formulas it cannot follow are named
(``tangents_finite``).

A backward recorded by PyTorch's own autograd below the transforms (a parameter that requires grad, captured by the
transformed function) is the eager ``create_graph`` case: ``_carry`` carries its structural zeros, as there.

May import: torch, _contract, _traced, _autograd_graph, _triangles; lazily (the node-reading rules' facts), _node_facts,
_kernel_reads, _rules_bilinear, _rules_opdb, _rules_pointwise.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._C._functorch import (
    TransformType,
    get_interpreter_stack,
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    is_legacy_batchedtensor,
    maybe_get_level,
)
from torch._functorch import eager_transforms
from torch._functorch.eager_transforms import _autograd_grad
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise._strong_zeros import _contract
from gradwise._strong_zeros._autograd_graph import _root_nodes, _walk
from gradwise._strong_zeros._traced import compiling
from gradwise._strong_zeros._triangles import TRIANGLE_READERS

_FOLLOWED = (TransformType.Vmap, TransformType.Grad)
_FUNCTORCH_BACKWARD = _autograd_grad.__code__
_SKIPPED = (os.path.dirname(os.path.dirname(__file__)) + os.sep,  # gradwise's own frames
            os.path.dirname(torch.autograd.__file__) + os.sep)  # torch.autograd.grad's, the engine's


def plain_reason(outputs: Iterable[Any], inputs: Iterable[Any], seeds: Iterable[Any]) -> str | None:
    """None where the strong pass can run on this backward under the functorch transforms active now (see the module
    docstring), else why not (a key of ``_contract._WHY``: what the tensors under the wrappers are, sparse, nested,
    a subclass, as outside transforms; else 'transform'). Reads no values: the interpreter stack, the wrappers'
    levels and the tensors' kinds."""
    outputs, inputs, seeds = tuple(outputs), tuple(inputs), tuple(seeds)
    for t in (*outputs, *inputs, *seeds):
        if isinstance(t, torch.Tensor) and (why := _contract.kind(_plain(t), batched=False)) is not None:
            return why
    return None if _followed(outputs, seeds) else "transform"


def _followed(outputs: tuple, seeds: tuple) -> bool:
    if compiling() or torch.autograd.forward_ad._current_level >= 0:
        return False
    stack = get_interpreter_stack() or []
    if any(i.key() not in _FOLLOWED for i in stack):
        return False
    grads = [i.level() for i in stack if i.key() == TransformType.Grad]
    live = {i.level() for i in stack}
    if len(grads) > 1 or (grads and stack[-1].key() != TransformType.Grad):
        return False
    legacy = False
    for group, own in ((outputs, True), (seeds, False)):
        for t in group:
            if not isinstance(t, torch.Tensor):
                continue
            legacy = legacy or is_legacy_batchedtensor(t)
            level = maybe_get_level(t) if is_functorch_wrapped_tensor(t) else -1
            if own and grads and level != grads[0]:  # the live grad level's own backward only
                return False
            if not grads and level in live and own:  # an output of a live vmap level: not a vjp's own graph
                return False
    return not (legacy and stack)  # the legacy vmap of is_grads_batched inside a transform: not followed


def records_formulas() -> bool:
    """Whether a ``create_graph=True`` backward here is recorded by a live ``grad`` level (``torch.autograd.grad(y,
    x, create_graph=True)`` inside ``torch.func.grad``: a gradient penalty per sample): that level's graph holds
    the backward's formulas on its wrappers, and the transform's own backward then differentiates them, NaN and
    all, where the pass annihilated below them (the eager ``create_graph`` case carries the zeros, ``_carry``;
    nothing can carry them on wrappers). Such a backward is not followed, as ``grad(grad)``."""
    if not any(i.key() == TransformType.Grad for i in get_interpreter_stack() or []):
        return False
    # functorch's own backward (grad, vjp) asks for create_graph=True too: what it records on the level is dropped
    # when the level exits. Which asked: the first frame outside gradwise and torch.autograd
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return frame is None or frame.f_code is not _FUNCTORCH_BACKWARD


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under ``t``'s functorch wrappers (a legacy batched tensor stays: its metadata is the physical's)."""
    while is_functorch_wrapped_tensor(t):
        t = get_unwrapped(t)
    return t


def all_finite(tensors: Iterable[Any]) -> bool:
    """Whether every floating-point tensor of ``tensors`` is finite, read on the plain tensors under their functorch
    wrappers (under vmap: every sample at once) and under a legacy batched tensor's batch dims (is_grads_batched's
    gradients: every seed's at once), with the transforms set aside, so no wrapper is read and no transform sees
    the read."""
    plain = [t for t in map(_plain, (t for t in tensors if isinstance(t, torch.Tensor)))
             if t.is_floating_point() or t.is_complex()]
    with temporarily_clear_interpreter_stack(), torch.no_grad():  # (no graph of create_graph results' reads)
        return all(bool((_legacy_physical(t) if is_legacy_batchedtensor(t) else t).isfinite().all()) for t in plain)


# PyTorch's standard bases, the seeds it builds to compute a Jacobian a row at a time (jacrev's and jacfwd's
# _chunked_standard_basis_for_, torch.autograd.functional's _construct_standard_basis_for): the plain tensors under
# the wrappers of what the constructors returned, by the root of their views (chunk_size=1 squeezes each row out,
# a legacy batch dim's removal views it), kept while they live. Recognized by identity, never by value: a seed of
# the caller's, an eye or a 0/1 mask, is a cotangent (a value), as gw.grad(y, x, mask) keeps it in eager code.
_BASES = WeakTensorKeyDictionary()
_BASIS_CONSTRUCTORS = ((eager_transforms, "_chunked_standard_basis_for_"),
                       (torch.autograd.functional, "_construct_standard_basis_for"))


def _root(t: torch.Tensor) -> torch.Tensor:
    t = _plain(t)
    return t if t._base is None else t._base


def _remember(basis: Iterable[Any]) -> None:
    if torch.compiler.is_compiling():  # (dynamo inlines the constructor: the graph's tensors, and no side effect)
        return
    for t in basis:
        if isinstance(t, torch.Tensor) and not is_legacy_batchedtensor(t):
            _BASES[_root(t)] = None


def _recorded_basis(construct: Callable[..., Any]) -> Callable[..., Any]:
    """``construct`` (one of PyTorch's standard-basis constructors), its results remembered in ``_BASES``."""
    if inspect.isgeneratorfunction(construct):
        @functools.wraps(construct)
        def chunks(*args: Any, **kwargs: Any) -> Any:
            for basis in construct(*args, **kwargs):
                _remember(basis)
                yield basis
        return chunks

    @functools.wraps(construct)
    def whole(*args: Any, **kwargs: Any) -> Any:
        basis = construct(*args, **kwargs)
        if isinstance(basis, (tuple, list)):  # (never iterate what another wrapper made a generator)
            _remember(basis)
        return basis
    return whole


def record_bases() -> None:
    """Wrap PyTorch's standard-basis constructors (once, from the first strong-zeros block on; the caller holds the
    install lock). functorch's ``_construct_standard_basis_for`` and every jacrev/jacfwd chunk go through
    ``_chunked_standard_basis_for_``, looked up as a module global at each call."""
    for module, name in _BASIS_CONSTRUCTORS:
        construct = getattr(module, name)
        if not getattr(construct, "_gradwise_basis", False):
            wrapped = _recorded_basis(construct)
            wrapped._gradwise_basis = True  # type: ignore[attr-defined]
            setattr(module, name, wrapped)


def selecting_seeds(seeds: Iterable[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(physical seed, support) for each seed that is PyTorch's standard basis (``_BASES``, by identity: the plain
    tensor under its wrappers, a view of a remembered one): row i of such a seed selects output i (jacrev's,
    ``jacobian(vectorize=True)``'s and ``hessian(vectorize=True)``'s, batched or one row at a time with
    ``chunk_size=1``), so the gradient a row asks for is that of its output alone and the others are unused
    there: the basis's 0 is a structural zero, as a slice's backward makes for ``y[i]``. The support is where the
    basis is nonzero, a tensor op on the plain tensor with the transforms set aside (no value read, nothing decided
    by value). Every other seed is the caller's cotangent, a value (a user's ``vmap(vjp_fn)(torch.eye(n))`` too,
    as the eager ``gw.grad(y, x, e_i)`` keeps it)."""
    found = []
    if not _BASES:
        return found
    with temporarily_clear_interpreter_stack(), torch.no_grad():
        for t in seeds:
            if not isinstance(t, torch.Tensor):
                continue
            p = _plain(t)
            p = _legacy_physical(p) if is_legacy_batchedtensor(p) else p
            if p.layout == torch.strided and p.is_floating_point() and _root(p) in _BASES:
                found.append((p, p != 0))
    return found


# (what, fix) of the OpaqueBackwardWarning for a strong pass whose results' forward-mode tangents hold NaN/Inf
DUAL_TANGENTS = (
    "a backward taken under a forward-AD dual level (torch.autograd.functional.hessian(..., outer_jacobian_strategy="
    "'forward-mode'), jacfwd over an autograd.grad(create_graph=True)): the results' tangents are forward-mode "
    "derivatives of the forward's and the backward's formulas, which strong zeros do not follow (the forward's "
    "jvp of a max at a NaN maximum, of sqrt at 0 in a discarded branch)",
    "compute the Hessian in reverse mode (hessian(..., vectorize=True) with the default reverse outer Jacobian, or "
    "jacrev over gw.grad(create_graph=True))")


def tangents_finite(results: Iterable[Any]) -> bool:
    """Whether the forward-mode tangents (at the dual level active now) of ``results`` are finite, read under their
    wrappers (a jacfwd's batched tangents: every column at once)."""
    from torch.autograd.forward_ad import unpack_dual

    tangents = []
    for t in results:
        if isinstance(t, torch.Tensor):
            tangent = unpack_dual(t).tangent
            if tangent is not None:
                tangents.append(tangent)
    return all_finite(tangents)


def _legacy_physical(t: torch.Tensor) -> torch.Tensor:
    """The physical tensor under a legacy batched tensor (``is_grads_batched``'s vmap, ``torch._vmap_internals``):
    its batch dim removed at each legacy vmap level active now, innermost first (a level it is not batched at adds
    a dim of size 1). Its values unread, such a tensor refuses ``bool``: an OpaqueBackwardWarning was never given."""
    level = torch._C._vmapmode_increment_nesting() - 1  # the innermost level active now (no TLS change: level > 0)
    torch._C._vmapmode_decrement_nesting()
    while level > 0 and is_legacy_batchedtensor(t):
        t = torch._remove_batch_dim(t, level, 1, 0)
        level -= 1
    return t


def batched(tensors: Iterable[Any]) -> bool:
    """Whether some tensor of ``tensors`` is batched by vmap under its wrappers (its values are several samples', or
    several rows' seeds: jacrev's, is_grads_batched's legacy vmap)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and is_legacy_batchedtensor(t):
            return True
        while isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t):
            if is_batchedtensor(t):
                return True
            t = get_unwrapped(t)
    return False


def recorded(made: Iterable[Any]) -> bool:
    """Whether PyTorch's autograd below the transforms recorded some op of the pass (``made``: the mode's references
    to what its rules made): a tensor that requires grad there, captured by the transformed function, makes the
    backward's formulas part of a graph, as ``create_graph=True`` does in eager code."""
    for ref in made:
        t = ref()
        if t is not None and t.grad_fn is not None:
            return True
    return False


@functools.cache
def _node_readers() -> dict[str, Callable[[Any], bool]]:
    """Node type -> whether its rule would act on this node, for the rules that read the running node's saved
    tensors (``_rules._reads_nodes`` is False under transforms, so they run op by op there)."""
    from gradwise._strong_zeros._kernel_reads import ZERO_ALPHA_PRODUCTS
    from gradwise._strong_zeros._node_facts import _alpha_nonzero
    from gradwise._strong_zeros._rules_bilinear import _MASKED_WEIGHTS_NODES, reads_softmax_weights
    from gradwise._strong_zeros._rules_opdb import _LCSE
    from gradwise._strong_zeros._rules_pointwise import LOGADDEXP_NODES

    readers: dict[str, Callable[[Any], bool]] = dict.fromkeys((_LCSE, *LOGADDEXP_NODES), lambda node: True)
    readers.update(dict.fromkeys(ZERO_ALPHA_PRODUCTS, lambda node: not _alpha_nonzero(node)))
    # a masked softmax's weights times the values (attention, attention pooling): until 2026-12-07 not named, so a
    # padded value's 0 x inf stayed NaN under vmap(grad) without a word
    for name in (*_MASKED_WEIGHTS_NODES, "MulBackward0"):  # (addmm/baddbmm: alpha = 0, or a softmax's weights)
        other = readers.get(name)
        readers[name] = reads_softmax_weights if other is None else \
            lambda node, other=other: other(node) or reads_softmax_weights(node)
    return readers


def unhooked(outputs: Iterable[Any]) -> dict[str, str]:
    """The graph's nodes whose strong-zero treatment cannot run under transforms (it would read wrappers): a node
    hook (``TRIANGLE_READERS``: the unused triangle of a cholesky factor, of pinv's Hermitian input) or a rule that
    reads the node's saved tensors (``_node_readers``): (what, fix) for the OpaqueBackwardWarning given if the
    gradients end up holding NaN/Inf. Node types (and alpha, a number) only."""
    readers = _node_readers()
    named = [(type(n).__name__, n) for n in _walk(_root_nodes(tuple(outputs)))]
    names = {name for name, _ in named} & TRIANGLE_READERS.keys()
    lost = {f"the backward of {name} under a torch.func transform (a node hook cleans its unused triangle, and "
            "cannot run there)": "take this gradient outside the transform (gw.grad)"
            for name in sorted(names)}
    lost.update(_reads_saved(name for name, n in named if name in readers and readers[name](n)))
    if any(name == "CompiledFunctionBackward" for name, _ in named):  # (its strong variant is a node hook)
        lost["a torch.compile'd backward under a torch.func transform or is_grads_batched (its graph runs as "
             "compiled: the masks and zeros it saved from the forward are values to the rules there)"] = \
            "take each gradient apart (gw.grad per seed or sample), or run the model without torch.compile"
    return lost


def _reads_saved(names: Iterable[str]) -> dict[str, str]:
    """(what, fix) for the nodes ``names`` whose rules read their saved tensors (``_node_readers``)."""
    return {f"the backward of {name} under a torch.func transform (its rule reads the node's saved tensors, which "
            "are the transform's wrappers there)": "take this gradient outside the transform (gw.grad)"
            for name in sorted(set(names))}


def per_sample_lost(outputs: Iterable[Any]) -> dict[str, str]:
    """Under vmap where some sample's output is NaN/Inf (read whole, ``_STATE.outputs_batched``: the masked-weights
    rules, which need finite outputs, are not named by ``unhooked``): the nodes that multiply a softmax's weights
    (``follows_softmax_weights``), as ``unhooked`` names them, for ``name_per_sample`` to warn of where
    a sample whose own outputs are finite ends NaN/Inf (its own gw.grad gives a padded key's value the deleted key's
    0; a sample whose output is NaN keeps its NaN, as its own gw.grad does). Until 2026-12-07 not named: such a
    sample kept a padded key's 0 x inf = NaN without a word (test_review_sz34). Node types only."""
    from gradwise._strong_zeros._rules_bilinear import _MASKED_WEIGHTS_NODES, follows_softmax_weights

    outputs = tuple(outputs)
    if not any(_vmapped(t) for t in outputs):  # (rows of batched seeds, jacrev's: not per sample)
        return {}
    names = (*_MASKED_WEIGHTS_NODES, "MulBackward0")
    return _reads_saved(n.name() for n in _walk(_root_nodes(outputs))
                        if n.name() in names and follows_softmax_weights(n))


def _vmapped(t: Any) -> bool:
    """Whether ``t`` is batched by torch.func.vmap under its wrappers (not by is_grads_batched's legacy vmap)."""
    return isinstance(t, torch.Tensor) and not is_legacy_batchedtensor(t) and batched((t,))


def name_per_sample(lost: dict[str, str], outputs: Iterable[Any], results: Iterable[Any]) -> None:
    """An OpaqueBackwardWarning for each of ``lost`` (``per_sample_lost``'s) where some vmap sample whose outputs are
    all finite ends with NaN/Inf among ``results`` (its gradients)."""
    if _finite_sample_ends_nonfinite(tuple(outputs), tuple(results)):
        for what, fix in lost.items():
            _contract.warn_opaque(what, fix)


def _finite_sample_ends_nonfinite(outputs: tuple, results: tuple) -> bool:
    """Whether some vmap sample whose outputs are all finite has a NaN/Inf among ``results``: per sample, with
    tensor ops under the transforms (each sample's own reduction), read once at the end on the plain tensor under
    the wrappers with the transforms set aside, as ``all_finite`` reads (no value decides an op)."""
    def finite(ts: Iterable[Any]) -> list[torch.Tensor]:  # (each sample's: one bool, on the CPU)
        return [t.isfinite().all().cpu() for t in ts
                if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]

    with torch.no_grad():
        ok, ends = finite(outputs), finite(results)
        if not ends:
            return False
        flag = ~functools.reduce(torch.logical_and, ends)
        for o in ok:
            flag = flag & o
    with temporarily_clear_interpreter_stack(), torch.no_grad():
        return bool(_plain(flag).any())
