"""Strong zeros: a structurally-zero sensitivity annihilates whatever it meets, NaN and Inf included.

How it works (docs/strong-zeros-design.md)
------------------------------------------
Before every backward under strong zeros, ``_plan`` walks the graph. Contamination needs a structural zero
(born where a backward pads, selects or has a flat region: slice, where, relu, ...) to meet a NaN/Inf from a
saved tensor or a singular point (x / 0). When none can meet, plain PyTorch runs untouched (bitwise). When one
can, the backward runs once under ``_StrongZeroMode``: a TorchDispatchMode that keeps, for every tensor the
backward writes, its *support* (the elements that may be nonzero; the others are structural zeros). The rules
in ``RULES`` say how supports arise and travel (views share their storage's mask, ``add`` unites, ``mul``
intersects), and they annihilate NaN/Inf wherever an element outside the support multiplies it. Graphs with
nodes gradwise knows nothing about (custom Functions, rarer ops) run once under the mode as well: the
strong-zero result differs from PyTorch's only where PyTorch computed 0 x NaN, 0 x Inf or 0 / 0, which is NaN,
and that NaN either reaches a gradient or is dropped by a later selection, where both agree. Backwards the mode
cannot read or follow (torch.func transforms, batched gradients, sparse/mkldnn/nested tensors) run as
plain PyTorch with a warning (_contract.py).

Modules (each imports only those above it in this list, plus torch and gradwise._masks / gradwise._checks)
-----------------------------------------------------------------------------------------------------
``_traced``          whether tensors are traced (FakeTensor, FunctionalTensor): graphs, not numbers to check.
``_contract``        what the mode can read and follow; the plain-PyTorch fallbacks and their warnings.
``_script``          scripted code that takes a gradient itself (TorchScript's builtin grad): said, once.
``_supports``        ``_Supports`` (one bool mask per storage) and the per-thread pass state ``_STATE``.
``_rules``           the rule table ``RULES``: ``_register``, ``lookup``, the helpers rules share, ``unruled_ops``.
``_rules_pointwise`` one rule per kind of the shared facts (``gradwise._ops._zeros``: creation, masks,
                    products, sums, where, placement), registered from that table; copy, exp, glu.
``_rules_bilinear``  rules for mm/bmm, mv and convolution_backward.
``_kernel_reads``    whether addmm-family kernels read the product at alpha = 0 / the input at beta = 0.
``_rules_backward``  rules for single fused backwards (softmax, nll, solves, cdist, grid_sampler, CTC, ...).
``_hooks``           user gradient hooks that compute outside torch ops (their results' supports), ``HOOKED``.
``_mode``            ``_StrongZeroMode``, the TorchDispatchMode that applies the rules; ``DECOMPOSED``.
``_node_facts``      facts per autograd node name (``NODE_FACTS``, ``MAKES_NO_ZEROS``, ``FUSED_BACKWARDS``, ...).
``_autograd_graph``  walking an autograd graph: ``_walk``, ``_root_nodes``, ``_leaves``, ``_graph_parts``,
                     ``_release``, ``_saved_toward``.
``_planning``        the pre-backward plan: ``_plan``, ``_zero_reach``; saved tensors are checked by
                     ``gradwise._masks.all_finite``.
``_compile_rules``   one graph rule per kind of the same facts, over AOTAutograd's backward graphs.
``_compile_pass``    the engine applying them to a backward graph (``rewrite_backward``).
``_graph_forms``     those graphs put back into the forms the eager rules know, for their op-by-op run.
``_compile``         compiled backwards under strong zeros: the pass, the runtime check, ``compile_stats``.
``_compile_recompute`` a non-reentrant checkpoint's recomputation (a forward) run outside the strong-zero mode.
``_engine``          the engine hook, the strong pass, ``strong_zeros()``, ``grad``, ``backward`` (and the rebound
                     globals ``_installed``, ``_original_engine_run``, ``_process_wide``: read as ``_engine.<name>``).
``_rules_attention`` rules for the fused attention backwards (sdpa) and their node facts.
``_rules_registry``  ``register_rule`` / ``Supports`` / ``RuleHandle``: rules for ops gradwise does not know.
``_rules_opdb``      rules for the backwards the op_db sweep and the reported cases found contaminated.
``_unused``         ``mark_unused``: a forward declaration of elements nothing after it reads (opaque kernels).

Other concerns (trace, watch, distributed, cli) import from this package's modules; nothing here imports them.
"""

# Importing the rule modules registers their rules in RULES, in this order (RULES' order as before the split).
# isort: off
from gradwise._strong_zeros import _rules_pointwise, _rules_bilinear, _rules_backward  # noqa: F401
from gradwise._strong_zeros import _rules_attention, _rules_opdb  # noqa: F401
from gradwise._strong_zeros import _compile_recompute  # noqa: F401  (wraps checkpoint's recomputation)
# isort: on
# What the other concerns read of strong zeros as ``_strong_zeros.<name>`` (gradwise._trace: _STATE, in_pass, lookup,
# _decomposition, _StrongZeroMode, WHOLE_FORMULAS, may_make_structural_zeros; gradwise._trace._watching: _root_nodes,
# _graph_parts, _release,
# _saved_toward, _walk, _all_finite; gradwise._distributed: _register). None of these names is ever rebound, so
# these are the very objects the modules below use. A name that is rebound or monkeypatched (_engine._plan,
# _engine._process_wide) is not here.
from gradwise._strong_zeros._autograd_graph import _graph_parts as _graph_parts
from gradwise._strong_zeros._autograd_graph import _leaves as _leaves
from gradwise._strong_zeros._autograd_graph import _release as _release
from gradwise._strong_zeros._autograd_graph import _root_nodes as _root_nodes
from gradwise._strong_zeros._autograd_graph import _saved_toward as _saved_toward
from gradwise._strong_zeros._autograd_graph import _walk as _walk
from gradwise._strong_zeros._compile import CompiledBackwardWarning, compile_stats
from gradwise._strong_zeros._contract import GradwiseWarning, OpaqueBackwardWarning, PlainBackwardWarning
from gradwise._strong_zeros._engine import backward, grad, strong_zeros, strong_zeros_process_wide
from gradwise._strong_zeros._mode import _decomposition as _decomposition
from gradwise._strong_zeros._mode import _StrongZeroMode as _StrongZeroMode
from gradwise._strong_zeros._mode import in_pass as in_pass
from gradwise._strong_zeros._node_facts import may_make_structural_zeros as may_make_structural_zeros
from gradwise._strong_zeros._planning import _all_finite as _all_finite
from gradwise._strong_zeros._rules import RULES, unruled_ops
from gradwise._strong_zeros._rules import _register as _register
from gradwise._strong_zeros._rules import lookup as lookup
from gradwise._strong_zeros._rules_opdb import WHOLE_FORMULAS as WHOLE_FORMULAS
from gradwise._strong_zeros._rules_registry import RuleHandle, Supports, register_rule
from gradwise._strong_zeros._supports import _STATE as _STATE
from gradwise._strong_zeros._unused import UnusedReadError, mark_unused

__all__ = [
    "RULES",
    "CompiledBackwardWarning",
    "GradwiseWarning",
    "OpaqueBackwardWarning",
    "PlainBackwardWarning",
    "RuleHandle",
    "Supports",
    "UnusedReadError",
    "backward",
    "compile_stats",
    "grad",
    "mark_unused",
    "register_rule",
    "strong_zeros",
    "strong_zeros_process_wide",
    "unruled_ops",
]
