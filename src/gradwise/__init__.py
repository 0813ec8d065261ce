"""gradwise: gradients you can trust at kinks and next to values the output never uses.

Public API (see ``docs/`` for one page per capability)::

    gw.grad / gw.backward / gw.strong_zeros      values the output does not use cannot poison gradients
    gw.trace / gw.explain                        where every NaN/Inf and every kink came from
    gw.directional_derivative / gw.generalized_grad / gw.subdifferential / gw.stationarity / gw.gradcheck
                                                 exact calculus at non-differentiable points
"""

from gradwise._strong_zeros import backward, grad, strong_zeros, unruled_ops

# -- explanation (trace) --

# -- nonsmooth calculus --

__version__ = "0.1.0"

__all__ = [
    "backward",
    "grad",
    "strong_zeros",
    "unruled_ops",
]
