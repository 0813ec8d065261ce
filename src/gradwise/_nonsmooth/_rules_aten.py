"""Rules for aten overloads called directly (``_ATEN_ROUTES``, ``_aten_rule``) and the kink ops without a rule
(added to ``UNRULED``).

May import: torch, ``_rules`` and the rule modules it reads (``_rules_pointwise``, ``_rules_select``, ``_rules_norms``,
``_scatter``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gradwise._nonsmooth._rules import _ROUTES, KINK_RULES, UNRULED

# _ATEN_ROUTES reads these modules' rules from KINK_RULES: they must be registered first.
# isort: off
from gradwise._nonsmooth import _rules_pointwise, _rules_select, _rules_norms, _scatter  # noqa: F401
# isort: on

aten = torch.ops.aten


# aten overloads called directly (graphs from torch.export, torch.fx, torch.ops.aten.*): the rules whose signature
# is the aten schema's. Other aten kink ops go through the watch (an error at their kink).
_ATEN_ROUTES: dict[object, Callable] = {
    **{op: KINK_RULES[op] for op in (aten.relu, aten.abs, aten.maximum, aten.minimum, aten.clamp, aten.clamp_min,
                                     aten.clamp_max, aten.hardtanh, aten.leaky_relu, aten.threshold, aten.sort,
                                     aten.topk, aten.amax, aten.amin, aten.max, aten.min, aten.kthvalue, aten.median,
                                     aten.cummax, aten.cummin, aten.argmax, aten.argmin, aten.l1_loss,
                                     # comparisons and steps: the watch below knows no kink of theirs (a tie
                                     # changes a bool, a jump a value), so without these they took PyTorch's side
                                     aten.gt, aten.ge, aten.lt, aten.le, aten.eq, aten.ne, aten.sign, aten.floor,
                                     aten.ceil, aten.round, aten.trunc, aten.frac,
                                     # (div: every overload; true division passes through)
                                     aten.div, aten.floor_divide, aten.logit,
                                     # (exported MobileNets' ReLU6, shrinkages, modulo, scatter max/min)
                                     aten.relu6, aten.softshrink, aten.hardshrink, aten.remainder, aten.fmod,
                                     aten.scatter_reduce, aten.index_reduce,
                                     # (det: PyTorch's derivative is 0 at a singular matrix)
                                     aten.linalg_det)},
    # (KINK_RULES' binary_cross_entropy takes F's signature: size_average, reduce, reduction by name)
    aten.binary_cross_entropy: _rules_norms.binary_cross_entropy_enum,
    aten.max_pool1d: KINK_RULES[aten.max_pool1d],
    aten.max_pool2d: KINK_RULES[aten.max_pool2d_with_indices],
    aten.max_pool3d: KINK_RULES[aten.max_pool3d_with_indices],
}


def _aten_rule(func) -> Callable | None:
    """The rule for a directly called aten overload (or packet), if its schema matches the rule's signature."""
    packet = func.overloadpacket if isinstance(func, torch._ops.OpOverload) else func
    if func is aten.max_pool2d_with_indices.default or func is aten.max_pool3d_with_indices.default:
        return lambda run, f, x, *a, **k: KINK_RULES[packet](run, f, x, *a, return_indices=True, **k)
    return _ATEN_ROUTES.get(packet)


_ROUTES[torch._C._nn.binary_cross_entropy] = _rules_norms.binary_cross_entropy_enum  # (its schema is aten's)

# Kinky ops without a rule: a clear error when f reaches one with a direction, never a silent convention.
# (fractional_max_pool2d: a port, `_ports`)
UNRULED[F.fractional_max_pool3d] = "aten.fractional_max_pool3d"
