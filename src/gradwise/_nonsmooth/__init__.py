"""Exact derivatives at kinks: one-sided directional derivatives, branch locking, generalized gradients.

How it works. ``f`` runs once under `_KinkMode` (a ``TorchFunctionMode``) inside a forward-AD dual level, every
input carrying a tangent: the direction. Smooth ops run exactly as PyTorch runs them. A kink op goes to its rule
in `KINK_RULES` (keyed by aten op). Where no element sits at a kink the rule calls the op itself, so away from
kinks everything is PyTorch's own computation. Where some elements tie, the rule ranks the competing branches
lexicographically: by value, then by tangent along the direction, then by the tangents of further directions
from earlier passes (Nesterov 2005; Khan & Barton 2013). It then rebuilds the op's output from the winning
branches with ``where``/``gather``. That *locked* output is an ordinary differentiable tensor: its tangent is the
exact one-sided directional derivative, and back-propagating through it gives the gradient of one smooth piece of
f that is active at x, an element of the Bouligand (hence Clarke) subdifferential (Kakade & Lee 2018).

Each tie that a rule resolves is recorded as a `Kink` (op, user line, candidate branches, the keys that ranked
them); `_stationarity` replays runs with chosen branches forced to enumerate the active pieces.

Modules (each imports only those above it in this list, plus torch, gradwise._masks and gradwise._ops)
--------------------------------------------------------------------------------------
``_errors``           ``NonsmoothError``.
``_lazy``             ``LazyTangent``: tangents computed where a kink rule reads them (generalized_grad's passes).
``_contexts``         the contexts around a pass (compile, checkpoint, hooks, custom ops, TorchScript watch).
``_records``          ``Kink``, ``NearKink``, the per-pass state ``_Run``, lexicographic ranking, ``_user_line``.
``_rules``            the rule table ``KINK_RULES`` (``kink_rule``, ``rule_for``, ``UNRULED``), helpers rules share.
``_rules_pointwise``  rules for elementwise switches, hinge losses, comparisons, piecewise-constant ops.
``_rules_division``   rules for rounded division and modulo (div with a rounding mode, floor_divide, fmod ...).
``_rules_select``     rules for max/min reductions, max-pool, sort/topk/kthvalue/median/mode, cummax/cummin.
``_rules_norms``      rules at singular points and for norms and distances (sqrt, pow, norms, cdist, std, ...).
``_rules_jvp``        ``JVP_RULES``: forward-mode rules for smooth ops with a slow PyTorch formula.
``_rules_aten``       rules for aten overloads called directly (``_ATEN_ROUTES``, ``_aten_rule``).
``_scatter``          rules for scatter_reduce / index_reduce with amax/amin and embedding_bag(max).
``_rules_grid``       the rule for bilinear grid_sample in the grid (pixel lines, clipped borders).
``_ports``            ``PORTS``: Python ports of C++ composites with kinks inside (quantile, renorm).
``_kink_watch``       ``_KinkWatch``: callables without a route, tested against ``gradwise._ops._kinks``
                      (``_SMOOTH_CALLS``, ``_SMOOTH_FOR`` per call signature).
``_kink_reads``       ``_KinkReads``: `_KinkMode`'s methods for values f reads into Python and indices of ties.
``_kink_mode``        ``_KinkMode``, the TorchFunctionMode that sends f's kink ops to their rules.
``_engine``           the passes, ``directional_derivative``, branch locking (``_LAST_TIE``), ``generalized_grad``,
                      ``generalized_backward``, ``kinks_hit``.
``_interval_rules``   ``INTERVAL_RULES`` / ``KINK_RULES``: how a tangent interval moves through each aten op.
``_bound``            ``lower_bound``: interval tangents bound every active piece's derivative along a direction,
                      a proved lower bound on the least norm however many ties.
``_bound_split``      ``Sources``: elements of that pass that read one input element, exact from their one-sided
                      slopes (relu(x) - relu(-x)).
``_stationarity``     ``subdifferential``, ``stationarity``.
``_gradcheck``        the kink-aware ``gradcheck``.

Other concerns do not import this package; it imports none of them (only gradwise._masks and the op facts,
gradwise._ops).
"""

# Importing the rule modules registers their rules in KINK_RULES / JVP_RULES, in this order (as before the split).
# isort: off
from gradwise._nonsmooth import _rules_pointwise, _rules_division, _rules_select, _rules_norms, _rules_jvp  # noqa: F401
from gradwise._nonsmooth import _rules_grid  # noqa: F401
from gradwise._nonsmooth import _rules_aten, _scatter  # noqa: F401

# isort: on
from gradwise._nonsmooth._engine import directional_derivative, generalized_backward, generalized_grad
from gradwise._nonsmooth._errors import NonsmoothError
from gradwise._nonsmooth._gradcheck import GradcheckError, GradcheckResult, gradcheck
from gradwise._nonsmooth._rules import KINK_RULES
from gradwise._nonsmooth._rules_jvp import JVP_RULES
from gradwise._nonsmooth._stationarity import Stationarity, Subdifferential, stationarity, subdifferential

_rules_pointwise.route_in_place_variants()  # (after every rule module registered)

__all__ = [
    "JVP_RULES",
    "KINK_RULES",
    "GradcheckError",
    "GradcheckResult",
    "NonsmoothError",
    "Stationarity",
    "Subdifferential",
    "directional_derivative",
    "generalized_backward",
    "generalized_grad",
    "gradcheck",
    "stationarity",
    "subdifferential",
]
