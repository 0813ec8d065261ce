"""The trace: `gw.trace()` / `gw.explain()` / `gw.watch()` explain NaN/Inf and kinks in a forward and backward pass.

How it works
------------

How it works. A `TorchDispatchMode` sees every aten op below autograd, forward and backward (the backward ones
run while `torch._C._current_autograd_node()` is set). Per op it does one cheap reduction of each float output
(``sum`` is finite iff every element is) and only digs in when that is not finite, so the finite path costs a
fused reduction and a few dictionary look-ups per op. Digging in records where a NaN/Inf was *born* (the first
op whose inputs were finite, or held no NaN, and whose output was not) and carries that provenance along.

In the backward, tensors derived from the incoming gradient (sensitivities) are tracked by identity
(held weakly, `_ByIdentity`). A non-finite gradient element appears where a sensitivity first meets a non-finite
value (a saved forward value, or one a backward formula made, like 0/0): if the sensitivity is a *structural*
zero there the output never used the value (**contamination**, which strong zeros remove), otherwise it is
**genuine**. The backward is the user's own. Structural is decided as strong zeros decide it: when the step's
forward met a NaN/Inf or a singular point, each backward op also runs under the strong-zero rules on the
*shadows* of its arguments (``_shadow``), and the shadow says what strong zeros keep (genuine) and annihilate
(contamination). Backward nodes are tied to the forward op (and source line) that created them through autograd
sequence numbers.

Kinks are found by the shared op facts (``gradwise._ops._kinks``: where each aten op kinks, PyTorch's convention
there), run on the forward ops that create autograd nodes.

Modules (each imports only those above it, plus torch, gradwise._masks, gradwise._ops and gradwise._strong_zeros)
-------------------------------------------------------------------------------------------------------------
``_report``       ``Finding`` / ``Report``: what the trace found, rendered as text (rich) and JSON (imports rich only).
``_kinds``        which tensors the trace can read (plain, functorch-wrapped, forward-AD duals).
``_common``       settings (``_MAX_NODES``, ``_DEFER_ON_CPU``: read and patched as ``_common.<name>``), user frames and
                  locations, tensor helpers, ``_ByIdentity``, the per-node records ``_Node`` / ``_KinkGroup``.
``_store``        births and incidents interned per site (``Store``, ``Birth``, ``Incident``).
``_causes``       findings grouped by root cause; what strong zeros removed.
``_facts``        op-fact tables: discards/selects, steps, comparisons, literals, products, bilinear, row-mixing, ...
``_advice``       why a NaN/Inf was born (``_EXPLAIN`` and its explainers) and the fix texts of findings.
``_kinks``        ``kink_detector``: the shared kink facts as detectors (``_Hit``), and where on a comparison's tie.
``_checking``     ``_Checks``: output checks (immediate or batched), what the strong-zero mode ran.
``_received``     ``_Received``: collectives, and the NaN/Inf a gradient received from another rank (its finding).
``_shadow``       ``_Shadow``: gw.strong_zeros()' pass beside a backward that may meet NaN/Inf (supports, not values).
``_shadow_reads`` ``_ShadowReads``: what the trace asks of that pass (annihilated, kept here, kept of a part).
``_roots``        ``_Roots``: the gradients a backward starts from; a gradient's NaN/Inf no recorded op explains.
``_flow``         ``_Flow``: the backward's flow around a meeting: which node made a zero, split provenance
                  through views and mixing ops, an op rerun under the strong-zero rules, leaves reached.
``_incidents``    ``_Incidents``: where a sensitivity meets a NaN/Inf; contamination or genuine.
``_met``          ``_Met``: which elements a nonzero sensitivity meets there, and whose births (indicators, probes).
``_saved_meets``  ``_SavedMeets``: a NaN/Inf sensitivity meeting a saved value, or annihilated by a structural zero.
``_leaf_names``   ``_LeafNames``: the names of the leaves a gradient reaches; which findings reach a gradient.
``_provenance``   ``_Provenance``: births of NaN/Inf, provenance along forward ops.
``_origins``      ``_Origins``: births no recorded op made (data that arrived non-finite, values moved unread).
``_gradient_births`` ``_GradientBirths``: a NaN/Inf gradient used as a forward value (an optimizer step) born again.
``_kink_checks``  ``_KinkChecks``: kink checks of forward ops and the sensitivities that reach them.
``_findings``     ``Findings``: a report's findings by key with the births explaining them; each kind's wording.
``_assembly``     ``_Assembly``: the ``Report`` from what was recorded.
``_forward_ops``  ``_ForwardOps``: a forward op recorded (a new step, its node, leaves' names, kinks, NaN/Inf births).
``_backward_ops`` ``_BackwardOps``: a backward op recorded (sensitivities and their nodes, accumulation, what
                  gw.strong_zeros()' pass undid of a plain pass).
``_tracer``       ``_Tracer``, the TorchDispatchMode recorder built from the parts above (its state and dispatch);
                  ``_op_info``.
``_session``      ``trace``, ``snapshot``, ``explain``; per-thread tracers and the wrapped autograd entry points
                  (the rebound ``_installed`` and the tables ``_TRACERS`` / ``_WATCHERS``: read as ``_session.<name>``).
``_watching``     ``watch``: near-zero cost until the first non-finite gradient, then the full trace.
``_watch_leaves`` the watch's check of a backward's gradients, and the leaves' .grad from before (``_StaleGrads``).

Other concerns import from here (gradwise._distributed: ``_report``; gradwise._strong_zeros._engine:
``_tracer._Tracer``, lazily); the trace imports strong zeros as ``from gradwise import _strong_zeros`` and
reads ``_strong_zeros.<name>``.
"""

from gradwise._trace._kinks import kink_detector
from gradwise._trace._report import Finding, Report
from gradwise._trace._session import explain, snapshot, trace
from gradwise._trace._watching import watch

__all__ = ["Finding", "Report", "explain", "kink_detector", "snapshot", "trace", "watch"]
