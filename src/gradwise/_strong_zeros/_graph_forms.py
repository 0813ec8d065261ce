"""AOTAutograd's backward graphs put back into the forms the eager rule table knows, for a compiled backward run
op by op under the strong-zero mode (``for_eager``), and the eager rule for ``prims.fma``, an op only those
graphs contain (``register_graph_ops``).

A compiled graph hides facts the eager rules read: a formula's own zeros arrive as constants or as a zeros
tensor saved from the forward, a formula's selection mask can arrive computed in the forward and saved, a fused op
arrives decomposed, and no autograd node tells which formula an op belongs to (AOTAutograd's node metadata does:
``seq_nr``, the forward op's sequence number; ``original_aten``; ``autograd_backward``). Each rewrite in
``_REWRITES`` restores one such fact, on a copy of the graph (AOTAutograd's own stays as it is), so that the one
rule table serves compiled graphs too, with no rule restated here.

May import: torch, and (inside functions, at call time) _compile_pass, _rules, _rules_opdb, _rules_pointwise,
_supports, _triangles.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


def for_eager(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` with every rewrite of ``_REWRITES`` applied (``module`` itself when none applies)."""
    from gradwise._strong_zeros._compile_pass import split_forward_zeros

    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    changed = split_forward_zeros(graph)  # (before the rewrites: they read targets)
    if changed:
        _as_forward_values(graph)
    for node in list(graph.nodes):
        changed |= any(rewrite(graph, module, node) for rewrite in _REWRITES)
    if not changed:
        return module
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph)


# -- the rewrites: each (graph, module, node) -> whether it changed the graph at node --------------------------


def _constant_zeros(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """A graph loaded from AOTAutograd's cache holds the backward formulas' ``full(0)`` as constant tensors
    (``get_attr``): made again by ``aten.zeros`` they are structural zeros to the eager mode, as they were."""
    const = getattr(module, node.target, None) if node.op == "get_attr" else None
    if not isinstance(const, torch.Tensor) or not const.is_floating_point() or const.numel() > 1 << 16 \
            or const.any():  # (NaN counts as nonzero)
        return False
    with graph.inserting_before(node):
        zeros = graph.call_function(aten.zeros.default, (list(const.shape),),
                                    {"dtype": const.dtype, "device": const.device})
    node.replace_all_uses_with(zeros)
    graph.erase_node(node)
    return True


# A zeros tensor the forward made (``full``/``zeros``) that the partitioner saved and the backward reuses
# (common-subexpression elimination joins it with the zeros a formula makes) arrives as a graph input named after
# that forward node; the placement ops whose base it is are the formulas that, run eagerly, make their own zeros
_ZEROS_NAME = re.compile(r"(full|full_default|zeros|new_zeros|zeros_like)(_\d+)?")
_PLACED_INTO = {aten.index_put.default, aten._unsafe_index_put.default, aten.slice_scatter.default,
                aten.select_scatter.default, aten.diagonal_scatter.default, aten.as_strided_scatter.default,
                aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.index_add.default}


# where a placement takes the values it places (``slice_scatter(base, src)``, ``index_put(base, idx, values)``)
_SOURCE_ARG = {aten.slice_scatter.default: 1, aten.select_scatter.default: 1, aten.diagonal_scatter.default: 1,
               aten.as_strided_scatter.default: 1, aten.index_put.default: 2, aten._unsafe_index_put.default: 2,
               aten.scatter.src: 3, aten.scatter_add.default: 3, aten.index_add.default: 3}


def _saved_zeros(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """A saved forward zeros tensor used as a placement's base, or as the values it places (``h[4:].zero_()``'s
    backward writes the forward's ``full_default`` into the sensitivity): made again at run time
    (``_zeros_again``)."""
    if node.op != "placeholder" or not _ZEROS_NAME.fullmatch(node.name):
        return False
    changed = False
    for user in list(node.users):
        if user.target not in _PLACED_INTO:
            continue
        for i in (0, _SOURCE_ARG.get(user.target)):
            if i is not None and i < len(user.args) and user.args[i] is node:
                with graph.inserting_before(user):
                    user.update_arg(i, graph.call_function(_zeros_again, (node,)))
                changed = True
    return changed


def _zeros_again(t: torch.Tensor) -> torch.Tensor:
    """``t`` made again by ``aten.zeros`` if it holds only zeros (structural zeros to the eager mode, as a
    formula's own are); anything else as it is."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.layout != torch.strided or bool(t.any()):
        return t
    return aten.zeros.default(list(t.shape), dtype=t.dtype, device=t.device)


def _logsumexp_node(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """logsumexp's backward, ``g * exp(x - result)``: an exp of a difference whose every use is a product runs
    as in logsumexp's node (``_logsumexp_weights``)."""
    if node.target is not aten.exp.default or not isinstance(node.args[0], fx.Node) or \
            node.args[0].target is not aten.sub.Tensor or not node.users or \
            not all(u.target is aten.mul.Tensor for u in node.users):
        return False
    node.target = _logsumexp_weights
    return True


def _logsumexp_weights(x: torch.Tensor) -> torch.Tensor:
    """``exp(x - result)`` of logsumexp's backward, run as in its node: the exp rule knows that an output of 0
    at a -inf input (a log(0) or masked entry) is a structural zero there."""
    with _formula_of("LogsumexpBackward0"):
        return aten.exp.default(x)


def _logaddexp_node(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """logaddexp's (logaddexp2's) backward, ``g / (1 + exp(b - a))`` (``pow(2, b - a)``) for each argument:
    the quotient runs as in logaddexp's node with a and b, the sub's operands (``_logaddexp_weights``). All four
    ops come from one forward op (``seq_nr``), are a backward formula's (``autograd_backward``), and the graph names
    logaddexp as the user's call that made them (``_called``: a custom Function's backward of that shape is not)."""
    if node.target is not aten.div.Tensor or len(node.args) != 2 or node.kwargs or \
            not isinstance(den := node.args[1], fx.Node) or den.target not in (aten.add.Scalar, aten.add.Tensor) or \
            len(den.args) != 2 or den.args[1] != 1 or den.kwargs or not isinstance(power := den.args[0], fx.Node):
        return False
    if power.target is aten.exp.default and len(power.args) == 1:
        name, diff = "LogaddexpBackward0", power.args[0]
    elif power.target is aten.pow.Scalar and len(power.args) == 2 and power.args[0] == 2:
        name, diff = "Logaddexp2Backward0", power.args[1]
    else:
        return False
    if not isinstance(diff, fx.Node) or diff.target is not aten.sub.Tensor or len(diff.args) != 2 or diff.kwargs:
        return False
    chain = (node, den, power, diff)
    seq = node.meta.get("seq_nr")
    if seq is None or any(n.meta.get("seq_nr") != seq or not n.meta.get("autograd_backward") for n in chain):
        return False
    if not _called(node, "logaddexp"):
        return False
    node.target = _logaddexp_weights
    node.args = (*node.args, name, *diff.args)
    return True


def _logaddexp_weights(g: torch.Tensor, den: torch.Tensor, name: str, b: Any, a: Any) -> torch.Tensor:
    """``g / (1 + exp(b - a))`` of logaddexp's backward, run as in its node ``name`` with its arguments: the div
    rule knows that a quotient of exactly 0 at a -inf argument (an unreachable log-space state) is a structural
    zero (``_rules_pointwise._logaddexp_weight_div``)."""
    both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    with _formula_of(name, (a, b) if both else None):  # (not both: PyTorch's quotient)
        return aten.div.Tensor(g, den)


def _called(node: fx.Node, name: str) -> bool:
    """Whether the graph names the user's call that made ``node``'s forward op (``fwd_source_fn_stack``, dynamo's
    node name: ``logaddexp``, ``cholesky_solve_1``) and it is ``name``'s. A custom Function's backward carries
    ``seq_nr`` and ``autograd_backward`` as a derivative formula does, but no such name: its ops are the user's
    formula, which no rule of PyTorch's formula may read (in eager its node is the custom one)."""
    call = _torch_call(node)
    return call is not None and name in call


def _torch_call(node: fx.Node) -> str | None:
    """Dynamo's name for the user's call that made ``node``'s forward op (``fwd_source_fn_stack``: ``exp``,
    ``addmm_1``), where that call is PyTorch's own op (``_torchs``); None otherwise."""
    source = node.meta.get("fwd_source_fn_stack")
    return str(source[-1][0]) if source and _torchs(source[-1][1]) else None


def _torchs(target: Any) -> bool:
    """Whether dynamo's call target is PyTorch's own op (``torch.exp``, the method ``'exp'``, ``aten.exp``), not
    a user's custom op or function that shares its name (``torch.ops.mylib.exp``: its backward is the user's)."""
    if isinstance(target, str):  # (a method of a tensor)
        return True
    if isinstance(target, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        packet = target if isinstance(target, torch._ops.OpOverloadPacket) else target.overloadpacket
        return str(packet._qualified_op_name).startswith("aten::")
    name = getattr(target, "__name__", None)
    return isinstance(name, str) and any(getattr(m, name, None) is target for m in
                                         (torch, torch.Tensor, torch.special, torch.linalg, torch.nn.functional))


@contextlib.contextmanager
def _formula_of(node_name: str, saved: tuple | None = None) -> Iterator[None]:
    """Ops run in the block as in the backward formula of that autograd node (which the graph does not tell the
    eager rules: ``_rules_pointwise._in_node``), with ``saved``, the node's saved arguments a rule reads."""
    from gradwise._strong_zeros._supports import _STATE

    prior = _STATE.formula_of, _STATE.formula_saved
    _STATE.formula_of, _STATE.formula_saved = node_name, saved
    try:
        yield
    finally:
        _STATE.formula_of, _STATE.formula_saved = prior


def _unused_triangle(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """cholesky_solve's backward (``_triangles._cholesky_solve_factor``): ``g.cholesky_solve(L)``, which reads one
    triangle of L, then ``-(common @ L)``, which reads all of it. The factor's other uses in that formula (same
    ``seq_nr``, a backward formula's: the product, an mm or matmul's expand/view/bmm) read it as the eager hook
    does (``_factor_read``): the triangle the forward never read as 0 in the matrices where it holds NaN/Inf. Only
    where the graph names cholesky_solve as the call (``_called``): a custom Function's backward may solve with a
    matrix its forward reads whole."""
    if node.target is not aten.cholesky_solve.default or not node.meta.get("autograd_backward") or \
            not _called(node, "cholesky_solve") or len(node.args) < 2 or \
            not isinstance(factor := node.args[1], fx.Node):
        return False
    upper = node.args[2] if len(node.args) > 2 else node.kwargs.get("upper", False)
    seq = node.meta.get("seq_nr")
    users = [u for u in factor.users if u is not node and seq is not None and u.meta.get("seq_nr") == seq
             and u.meta.get("autograd_backward") and u.target is not aten.cholesky_solve.default]
    if not isinstance(upper, bool) or not users:
        return False
    first = next(n for n in graph.nodes if n in users)  # (placeholders stay together at the top)
    with graph.inserting_before(first):
        read = graph.call_function(_factor_read, (factor, upper))
    for user in users:
        user.replace_input_with(factor, read)
    return True


def _factor_read(factor: torch.Tensor, upper: bool) -> torch.Tensor:
    """The Cholesky factor as cholesky_solve's forward read it where its unused triangle holds NaN/Inf (that
    triangle 0, per matrix of a batch: ``_triangles._triangular``), as it is elsewhere: a value of the program,
    computed outside the strong-zero mode, as the eager hook computes it."""
    from torch.utils._python_dispatch import _disable_current_modes

    from gradwise._strong_zeros._triangles import _matrices

    with _disable_current_modes():
        bad = _matrices(~(factor.tril(-1) if upper else factor.triu(1)).isfinite())
        return torch.where(bad, factor.triu() if upper else factor.tril(), factor)


def _saved_mask(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """A bool mask a backward formula computed (nan_to_num's ``isfinite(self)``), moved into the forward by the
    partitioner and saved: a graph input to the eager rules, whose zeros would be values. AOTAutograd marks the
    nodes it traced in the backward (``meta['autograd_backward']``), moved or not: such a mask is made again
    in the graph (``_mask_again``)."""
    val = node.meta.get("val")
    if node.op != "placeholder" or not node.meta.get("autograd_backward") or \
            getattr(val, "dtype", None) is not torch.bool or not node.users:
        return False
    users = list(node.users)
    with graph.inserting_after(node):
        again = graph.call_function(_mask_again, (node,))
    for user in users:
        user.replace_input_with(node, again)
    return True


def _mask_again(mask: torch.Tensor) -> torch.Tensor:
    """``mask == True``, which the comparison rule records as a formula's selection, meaningful everywhere. The
    formula's own comparison (max's ``self == result``, hardsigmoid's ``(x > -3) & (x < 3)``) means nothing where
    its operands are NaN; the saved mask cannot tell those places, so it is meaningful everywhere only while the
    outputs being differentiated are finite (a NaN result then reaches them through a structural zero alone,
    which annihilates it either way). Otherwise it is meaningful where it is True only: a formula's mask is an
    and/or of orderings and equalities, which are False at a NaN, so a True was decided and a False may be a NaN's
    (a where then unites both branches there; a product takes no structural zero from it). The pass reads a saved
    mask the same way (``_compile_rules._undecided``)."""
    from gradwise._strong_zeros._mode import outputs_finite, running_mode

    out = aten.eq.Scalar(mask, True)
    if not outputs_finite():  # (the pass's, on whichever engine thread runs this node)
        mode = running_mode()
        if mode is not None:
            mode.supports.selections[out] = mask
    return out


_ALIASES = {aten.detach.default, aten.alias.default}


def _exp_node(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """exp's backward, ``g * result``, with the result saved from the forward (or recomputed): a product with a
    value to the eager rules. AOTAutograd tags each node with the sequence number of the forward op it belongs to
    (``meta['seq_nr']``) and the op that made a saved value (``meta['original_aten']``): a product of exp's output
    in exp's own backward formula runs as in exp's node (``_exp_weights``), where an output of exactly 0 (exp of a
    -inf logit) is a structural zero. Any other product of exp's output stays a product with a value."""
    if node.target is not aten.mul.Tensor or node.kwargs or len(node.args) != 2:
        return False
    seq = node.meta.get("seq_nr")
    for i, arg in enumerate(node.args):
        src = arg
        while isinstance(src, fx.Node) and src.target in _ALIASES:
            src = src.args[0]
        # (by name: the meta's OpOverload can be a copy that compares unequal to aten.exp.default)
        if seq is not None and isinstance(src, fx.Node) and src.meta.get("seq_nr") == seq and \
                (str(src.meta.get("original_aten")) == "aten.exp.default" or _saved_detached(src, node, "exp")):
            node.target = _exp_weights
            node.args = (node.args[1 - i], arg)  # the rule reads the result as the second factor, as in eager
            return True
    return False


def _saved_detached(src: fx.Node, node: fx.Node, call: str) -> bool:
    """Whether ``src`` is the formula's detach of its saved result, moved into the forward by the partitioner
    (a graph input made by ``detach`` in the backward, ``meta['autograd_backward']``), in the formula of the user's
    call ``call`` that made ``node`` (``fwd_source_fn_stack``: ``exp``, ``exp_1``, not ``logaddexp``)."""
    return src.op == "placeholder" and bool(src.meta.get("autograd_backward")) and \
        str(src.meta.get("original_aten")) in ("aten.detach.default", "aten.alias.default") and \
        (made := _torch_call(node)) is not None and re.fullmatch(rf"{call}(_\d+)?", made) is not None


def _exp_weights(g: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``g * result`` of exp's backward, run as in its node (``_exp_node``)."""
    with _formula_of("ExpBackward0"):
        return aten.mul.Tensor(g, result)


_FLIPS = {"aten.flip.default", "prims.rev.default"}


def _logcumsumexp_node(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """logcumsumexp's backward (FunctionsManual.cpp), decomposed in the graph: ``exp(rlcse(where(g > 0,
    log|g|, lowest) - result) + self) - exp(rlcse(where(g < 0, ...) - result) + self)``, rlcse a flipped
    logcumsumexp. Put back together as ``gradwise::logcumsumexp_backward``, whose rule leaves the structural terms
    of g out (the pieces cannot: a structural g is ``lowest`` in log space, which meets a NaN result)."""
    if node.target is not aten.sub.Tensor or len(node.args) != 2 or node.kwargs:
        return False
    found = [_lcse_branch(a, sign) for a, sign in zip(node.args, ("aten.gt.Scalar", "aten.lt.Scalar"), strict=True)]
    if None in found or found[0] != found[1]:
        return False
    with graph.inserting_before(node):
        whole = graph.call_function(torch.ops.gradwise.logcumsumexp_backward.default, found[0])
    node.replace_all_uses_with(whole)
    graph.erase_node(node)
    return True


def _lcse_branch(node: Any, sign: str) -> tuple | None:
    """(g, self, result, dim) of one branch ``exp(flip(logcumsumexp(flip(where(g <sign> 0, log|g|, lowest) -
    result))) + self)``, or None where ``node`` is not one."""

    def op(n: Any, *names: str) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_function" and str(n.target) in names

    if not op(node, "aten.exp.default") or not op(add := node.args[0], "aten.add.Tensor"):
        return None
    back, x = add.args
    if not op(back, *_FLIPS) or not op(lc := back.args[0], "aten.logcumsumexp.default") or \
            not op(front := lc.args[0], *_FLIPS) or not op(diff := front.args[0], "aten.sub.Tensor"):
        return None
    where, result = diff.args
    if not op(where, "aten.where.self") or not op(cmp := where.args[0], sign) or cmp.args[1] != 0 or \
            not op(log := where.args[1], "aten.log.default") or not op(absolute := log.args[0], "aten.abs.default"):
        return None
    g, dim = cmp.args[0], lc.args[1]
    if absolute.args[0] is not g or list(back.args[1]) != [dim] or list(front.args[1]) != [dim]:
        return None
    return g, x, result, dim


@torch.library.custom_op("gradwise::logcumsumexp_backward", mutates_args=())
def _logcumsumexp_backward(grad: torch.Tensor, self: torch.Tensor, result: torch.Tensor, dim: int) -> torch.Tensor:
    """logcumsumexp's backward for real inputs, as FunctionsManual.cpp computes it (the graph's own pieces): the
    rule's formula with every term of g kept."""
    from gradwise._strong_zeros._rules_opdb import _logcumsumexp_grad

    return _logcumsumexp_grad(grad, torch.ones_like(grad, dtype=torch.bool), self, result, dim)[0]


def _softmax_whole(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """Inductor's decomposition of ``_softmax_backward_data(g, y, dim)``, ``fma(-y, sum(g * y, dim, keepdim=True),
    g * y)`` (torch/_inductor/decomposition.py), put back together: the eager rule for the whole op knows that a
    softmax output of exactly 0 is a structural zero, which the pieces, a product with a saved value, cannot
    know (the op computes the same formula; only its rounding may differ from the fma's)."""
    if node.target is not torch.ops.prims.fma.default or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    neg, total, prod = node.args
    if neg.target is not aten.neg.default or prod.target is not aten.mul.Tensor or \
            total.target is not aten.sum.dim_IntList or total.args[0] is not prod:
        return False
    y = neg.args[0]
    dims, keepdim = total.args[1], total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim")
    g = prod.args[1] if prod.args[0] is y else prod.args[0] if prod.args[1] is y else None
    if g is None or keepdim is not True or len(dims) != 1 or prod.kwargs or total.kwargs.get("dtype"):
        return False
    with graph.inserting_before(node):
        whole = graph.call_function(_softmax_backward, (g, y, dims[0]))
    node.replace_all_uses_with(whole)
    graph.erase_node(node)
    return True


def _softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    if g.dtype != y.dtype or g.shape != y.shape:  # not the op's form after all: the pieces, as the graph had them
        gy = g * y
        return gy - y * gy.sum(dim, keepdim=True)
    return aten._softmax_backward_data.default(g, y, dim, g.dtype)


def _as_forward_values(graph: fx.Graph) -> None:
    """A forward zeros tensor recomputed in the backward and multiplied into a sensitivity is a value, not a
    formula's structural zero (``_compile_pass.split_forward_zeros`` marks the copy those multiplications read):
    it runs as a forward op (``_as_forward``), as a checkpoint's recomputation does."""
    from gradwise._strong_zeros._compile_pass import FORWARD_VALUE

    for n in graph.nodes:
        if n.meta.get(FORWARD_VALUE) and isinstance(n.target, torch._ops.OpOverload):
            n.args = (n.target, *n.args)
            n.target = _as_forward


def _as_forward(op: Any, *args: Any, **kwargs: Any) -> Any:
    from gradwise._strong_zeros._supports import _STATE

    prior, _STATE.recomputing = _STATE.recomputing, True
    try:
        return op(*args, **kwargs)
    finally:
        _STATE.recomputing = prior


def _forward_comparison(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """A forward comparison the partitioner recomputes in the backward (``partitioner_tag == 'is_forward'``: the
    condition of a user's ``where(x > 0, sqrt(x), 0)``) selected in the forward, NaN or not: it runs as a forward
    op (``_as_forward``), not as a formula's selection, which decides nothing at a NaN (``_rules_pointwise.
    _comparison``), as the pass reads it (``_compile_rules._undecided``)."""
    from gradwise._ops._zeros import zero_fact

    fact = zero_fact(node.target) if node.op == "call_function" else None
    if fact is None or fact.kind != "compares" or node.meta.get("partitioner_tag") != "is_forward":
        return False
    node.args = (node.target, *node.args)
    node.target = _as_forward
    return True


_FILLS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}


def _forward_fill(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """A forward ``masked_fill`` the partitioner recomputes in the backward (aot_eager's default partition does
    too) computes a forward value: it runs as a forward op (``_as_forward``). Under the mode as a formula's fill
    its 0 would be structural, and a recomputed forward op reading it (``xlogy(0, NaN)``, NaN in the forward)
    would give another value than the forward's: a genuine NaN hidden. (The forward's zeros tensors:
    ``_compile_pass.split_forward_zeros``; its comparisons: ``_forward_comparison``.)"""
    if node.op != "call_function" or node.meta.get("partitioner_tag") != "is_forward" or node.target not in _FILLS:
        return False
    node.args = (node.target, *node.args)
    node.target = _as_forward
    return True


def _guarded_division(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """``(x / n).masked_fill(n == 0, 0)``, the 2-norm's backward (``norm_backward``) decomposed in the graph: the
    fill is PyTorch's subgradient value where the norm is 0, a value of the derivative, no structural zero
    (``_rules_pointwise.FILLS_A_VALUE``, which names the eager nodes): it runs as ``_masked_fill_value``."""
    if node.target is not aten.masked_fill.Scalar or len(node.args) != 3 or node.args[2] != 0:
        return False
    quotient, mask = node.args[0], node.args[1]
    if not (isinstance(quotient, fx.Node) and quotient.target is aten.div.Tensor and isinstance(mask, fx.Node)
            and mask.target is aten.eq.Scalar and mask.args[1] == 0 and mask.args[0] is quotient.args[1]):
        return False
    node.target = _masked_fill_value
    return True


def _masked_fill_value(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``masked_fill`` of a guarded division (``_guarded_division``), run as in the formula that fills a value."""
    from gradwise._strong_zeros._rules_pointwise import GUARDED_DIVISION

    with _formula_of(GUARDED_DIVISION):
        return aten.masked_fill.Scalar(x, mask, value)


# torch._refs' xlogy / xlog1py, ``where(isnan(y), nan, where(x == 0, 0, x * log(y)))``: the log op, the whole op
_XLOG = {"aten.log.default": aten.xlogy.Tensor, "aten.log1p.default": aten.special_xlog1py.default}


def _xlogy_whole(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """xlogy (xlog1py) decomposed in the graph (a backward's ``xlogy(g, other)``, the entropy's, under inductor's
    decompositions), put back together: the eager rule for the whole op knows ``x`` as the product's sensitivity,
    whose structural zeros meet a NaN ``y`` as 0; the pieces write the NaN with a ``where`` on ``isnan(y)`` (the
    partitioner may save that mask: the decomposition defines it, it is not read). The op computes the same."""
    def op(n: Any, *names: str) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_function" and str(n.target) in names

    if not op(node, "aten.where.self") or len(node.args) != 3 or not _is_const(node.args[1], "nan") or \
            not op(inner := node.args[2], "aten.where.self") or len(inner.args) != 3 or \
            not op(cmp := inner.args[0], "aten.eq.Scalar") or cmp.args[1] != 0 or \
            not _is_const(inner.args[1], 0) or not op(prod := inner.args[2], "aten.mul.Tensor") or \
            prod.args[0] is not cmp.args[0] or not op(log := prod.args[1], *_XLOG) or \
            str(node.meta.get("original_aten")) not in ("aten.xlogy.Tensor", "aten.special_xlog1py.default"):
        return False
    with graph.inserting_before(node):
        whole = graph.call_function(_XLOG[str(log.target)], (cmp.args[0], log.args[0]))
    node.replace_all_uses_with(whole)
    graph.erase_node(node)
    return True


def _is_const(n: Any, value: Any) -> bool:
    """Whether ``n`` is that number, or a 0-d tensor of it (``"nan"``: a NaN): ``scalar_tensor(v)`` (torch._refs),
    ``full([], v)`` (inductor's graphs)."""
    if isinstance(n, fx.Node):
        if str(n.target) == "aten.scalar_tensor.default" and n.args:
            n = n.args[0]
        elif str(n.target) == "aten.full.default" and len(n.args) == 2 and list(n.args[0]) == []:
            n = n.args[1]
        else:
            return False
    if not isinstance(n, (int, float)):
        return False
    return n != n if value == "nan" else n == value


# the user's call (dynamo's node name, ``_called``) of an op whose backward scales by alpha: its autograd node
_ZERO_ALPHA_CALLS = {"addmm": "AddmmBackward0", "addmv": "AddmvBackward0", "addbmm": "AddbmmBackward0",
                     "baddbmm": "BaddbmmBackward0", "addr": "AddrBackward0"}
_ZERO_ALPHA_CALL = re.compile(rf"({'|'.join(_ZERO_ALPHA_CALLS)})(_\d+)?")


def _zero_alpha_node(graph: fx.Graph, module: fx.GraphModule, node: fx.Node) -> bool:
    """The backward of addmm & co. with alpha = 0 (or beta = 0) scales by a literal 0 (``mul(mm(g, b.t()), 0)``):
    the product runs as in that op's node, with the formula's saved operands, the graph inputs its ops read
    (``_zero_alpha_scale``; the rule: ``_rules_bilinear._zero_alpha_mul``). Only where all come from one forward op
    (``seq_nr``) of a backward formula (``autograd_backward``) and the graph names the user's call as that op
    (``fwd_source_fn_stack``; a custom Function's backward is not one)."""
    if node.target not in (aten.mul.Scalar, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs or \
            node.args[1].__class__ not in (int, float) or node.args[1] != 0 or not node.meta.get("autograd_backward"):
        return False
    seq, made = node.meta.get("seq_nr"), _torch_call(node)
    call = _ZERO_ALPHA_CALL.fullmatch(made) if seq is not None and made is not None else None
    if call is None:
        return False
    formula = {n for n in graph.nodes if n.op == "call_function" and n.meta.get("seq_nr") == seq and
               n.meta.get("autograd_backward")}  # (an operand the partitioner moved to the forward is an input)
    saved = {a: None for n in formula for a in n.all_input_nodes if a not in formula and
             ((a.op == "placeholder" and not a.name.startswith("tangents")) or
              (a.op == "call_function" and not a.meta.get("autograd_backward")))}
    node.args = (node.target, *node.args, _ZERO_ALPHA_CALLS[call.group(1)], *saved)
    node.target = _zero_alpha_scale
    return True


def _zero_alpha_scale(op: Any, x: torch.Tensor, zero: Any, name: str, *saved: Any) -> torch.Tensor:
    """``x * 0`` of an alpha = 0 product's backward (``_zero_alpha_node``), run as in its node ``name``."""
    with _formula_of(name, saved):
        return op(x, zero)


_REWRITES: tuple[Callable[[fx.Graph, fx.GraphModule, fx.Node], bool], ...] = (
    _constant_zeros, _saved_zeros, _saved_mask, _logsumexp_node, _logaddexp_node, _logcumsumexp_node, _exp_node,
    _softmax_whole, _forward_comparison, _guarded_division, _unused_triangle, _zero_alpha_node, _xlogy_whole,
    _forward_fill)


# -- an op only these graphs contain ----------------------------------------------------------------------------


def _fma(func: Any, args: tuple, kwargs: dict, sup: Any) -> Any:
    """prims.fma(a, b, c) = a * b + c, met in decomposed backward graphs (softmax's): the product and the sum
    through their own rules."""
    from gradwise._strong_zeros._rules import lookup

    a, b, c = args
    mul, add = aten.mul.Tensor, aten.add.Tensor
    return lookup(add)(add, (lookup(mul)(mul, (a, b), {}, sup), c), {}, sup)


def register_graph_ops() -> None:
    """Eager rules for ops that only AOTAutograd's graphs contain (one rule table: _rules.RULES)."""
    from gradwise._strong_zeros._rules import RULES, lookup
    from gradwise._strong_zeros._rules_opdb import logcumsumexp_backward

    RULES.setdefault(torch.ops.prims.fma.default, _fma)
    RULES.setdefault(torch.ops.prims.rev.default, lookup(aten.flip.default))  # inductor's flip
    RULES.setdefault(torch.ops.gradwise.logcumsumexp_backward.default, logcumsumexp_backward)
