"""gradwise: gradients you can trust at kinks and next to values the output never uses.

Public API (see ``docs/`` for one page per capability)::

    gw.grad / gw.backward / gw.strong_zeros      values the output does not use cannot poison gradients
    gw.register_rule                             strong zeros through your own (custom / C++) ops
    gw.mark_unused                               declare what an opaque kernel skips (RNN-T padding)
    gw.compile_stats / gw.CompiledBackwardWarning how compiled backwards ran under strong zeros (docs/compile.md)
    gw.trace / gw.explain                        where every NaN/Inf and every kink came from
    gw.watch                                     near-free until the first NaN/Inf gradient, then gw.trace
    gw.gather_reports / gw.nonfinite_guard      the same under torch.distributed (DDP, FSDP2): which rank, a guard
    gw.directional_derivative / gw.generalized_grad / gw.subdifferential / gw.stationarity / gw.gradcheck
                                                 exact calculus at non-differentiable points
"""

from gradwise._distributed import (
    NonfiniteGradientError,
    NonfiniteGuard,
    SkipNonfiniteStep,
    ddp_nonfinite_hook,
    gather_reports,
    nonfinite_guard,
)
from gradwise._nonsmooth import (
    GradcheckError,
    GradcheckResult,
    NonsmoothError,
    Stationarity,
    Subdifferential,
    directional_derivative,
    generalized_backward,
    generalized_grad,
    gradcheck,
    stationarity,
    subdifferential,
)
from gradwise._strong_zeros import (
    CompiledBackwardWarning,
    GradwiseWarning,
    OpaqueBackwardWarning,
    PlainBackwardWarning,
    RuleHandle,
    Supports,
    UnusedReadError,
    backward,
    compile_stats,
    grad,
    mark_unused,
    register_rule,
    strong_zeros,
    unruled_ops,
)
from gradwise._trace import Finding, Report, explain, trace, watch

__version__ = "0.1.0"

__all__ = [
    "CompiledBackwardWarning",
    "Finding",
    "GradcheckError",
    "GradcheckResult",
    "GradwiseWarning",
    "NonfiniteGradientError",
    "NonfiniteGuard",
    "NonsmoothError",
    "OpaqueBackwardWarning",
    "PlainBackwardWarning",
    "Report",
    "RuleHandle",
    "SkipNonfiniteStep",
    "Stationarity",
    "Subdifferential",
    "Supports",
    "UnusedReadError",
    "backward",
    "compile_stats",
    "ddp_nonfinite_hook",
    "directional_derivative",
    "explain",
    "gather_reports",
    "generalized_backward",
    "generalized_grad",
    "grad",
    "gradcheck",
    "mark_unused",
    "nonfinite_guard",
    "register_rule",
    "stationarity",
    "strong_zeros",
    "subdifferential",
    "trace",
    "unruled_ops",
    "watch",
]
